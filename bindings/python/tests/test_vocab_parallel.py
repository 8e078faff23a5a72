"""The vocabulary-parallel loss from Python: ranks as threads (a barrier-based all_gather) and as
processes under torch.distributed (gloo, launched by torchrun), against the unsplit masked_cross_entropy
and autograd."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

torch = pytest.importorskip("torch")

import sft_collate  # noqa: E402


class ThreadGroup:
    """All-gather among threads: each rank's bytes, concatenated in rank order."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size

    def all_gather(self, rank):
        def gather(b):
            self.slots[rank] = bytes(b)
            self.barrier.wait()
            out = b"".join(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before every rank has read
            return out

        return gather


def run_split(logits, labels, mask, cuts, **options):
    """Each rank's (loss, gradient of its columns), ranks as threads."""
    vocab = logits.shape[1]
    bounds = [0, *cuts, vocab]
    size = len(bounds) - 1
    group = ThreadGroup(size)
    results = [None] * size
    errors = []

    def rank_main(rank):
        try:
            shard = logits[:, bounds[rank] : bounds[rank + 1]].clone().requires_grad_(True)
            loss = sft_collate.vocab_parallel_cross_entropy(
                shard,
                labels,
                mask,
                vocab_start=bounds[rank],
                vocab_size=vocab,
                all_gather=group.all_gather(rank),
                rank=rank,
                world_size=size,
                **options,
            )
            (loss * 0.5).backward()
            results[rank] = (loss.detach(), shard.grad)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, bounds


@pytest.mark.parametrize("cuts", [[5], [1, 9, 30], [17, 18]])
@pytest.mark.parametrize(
    "options",
    [{}, {"z_loss": 1e-3, "label_smoothing": 0.1, "softcap": 7.5}, {"reduction": "sum"}],
)
def test_threads_equal_the_unsplit_loss_and_gradient(cuts, options):
    g = torch.Generator().manual_seed(len(cuts) * 7 + len(options))
    logits = torch.randn(6, 40, generator=g) * 3
    labels = torch.randint(0, 40, (6,), generator=g)
    mask = torch.tensor([True, False, True, True, True, False])
    whole = logits.clone().requires_grad_(True)
    want = sft_collate.masked_cross_entropy(whole, labels, mask, **options)
    (want * 0.5).backward()
    results, bounds = run_split(logits, labels, mask, cuts, **options)
    for rank, (loss, grad) in enumerate(results):
        torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, whole.grad[:, bounds[rank] : bounds[rank + 1]], rtol=1e-5, atol=1e-7)


def test_ignore_index_labels_without_a_mask():
    logits = torch.randn(4, 12)
    labels = torch.tensor([3, -100, 11, 0])
    want = sft_collate.masked_cross_entropy(logits, labels)
    results, _ = run_split(logits, labels, None, [6])
    for loss, _grad in results:
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


def test_a_bad_label_raises_on_every_rank_and_a_bad_gather_is_an_error():
    logits = torch.randn(3, 10)
    labels = torch.tensor([1, 10, 2])  # 10 is outside the vocabulary
    with pytest.raises(ValueError):
        run_split(logits, labels, None, [4])
    with pytest.raises(Exception, match="all_gather"):
        sft_collate.vocab_parallel_cross_entropy(
            logits[:, :4],
            torch.tensor([1, 2, 3]),
            vocab_start=0,
            vocab_size=10,
            all_gather=lambda b: b"",  # returns nothing
            rank=0,
            world_size=2,
        )


RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    import sft_collate

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def all_gather(b):
        t = torch.frombuffer(bytearray(b), dtype=torch.uint8)
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return b"".join(p.numpy().tobytes() for p in parts)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=g)
    labels = torch.randint(0, 50, (8,), generator=g)
    bounds = [0, 20, 50]
    shard = logits[:, bounds[rank] : bounds[rank + 1]].clone().requires_grad_(True)
    loss = sft_collate.vocab_parallel_cross_entropy(
        shard, labels, vocab_start=bounds[rank], vocab_size=50,
        all_gather=all_gather, rank=rank, world_size=world, label_smoothing=0.1)
    loss.backward()
    whole = logits.clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(whole, labels, label_smoothing=0.1)
    want.backward()
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({
            "loss": loss.item(), "want": want.item(),
            "grad_err": (shard.grad - whole.grad[:, bounds[rank] : bounds[rank + 1]]).abs().max().item(),
        }, f)
    dist.destroy_process_group()
    """
)


def test_torch_distributed_gloo_under_torchrun(tmp_path):
    """The README's recipe: two processes, torch.distributed's all_gather over gloo, each rank's loss and
    gradient against PyTorch's own cross_entropy on the unsplit logits."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert abs(r["loss"] - r["want"]) < 1e-5, r
        assert r["grad_err"] < 1e-6, r
