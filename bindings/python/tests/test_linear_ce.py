"""The fused linear cross-entropy against PyTorch's unfused one (``hidden @ weight.T + bias``, then
``F.cross_entropy`` and autograd), every option, the upstream gradient, gradcheck in float64, and bad
input refused in the user's terms. On CUDA (when present) the chunked cuBLAS path against the same."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, needs_cuda

import sft_collate


def case(rows=24, hidden=16, vocab=97, dtype=torch.float32, device="cpu", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(dtype).to(device)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).to(device)
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).to(device) if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    mask = (torch.rand(rows, generator=g) > 0.3).to(device)
    return h, w, b, labels, mask


def unfused(h, w, b, labels, mask, reduction="mean", weights=None, z_loss=0.0, label_smoothing=0.0, softcap=None):
    """PyTorch's own: the whole logits, softcap, F.cross_entropy with label smoothing, the z-loss."""
    x = h.double() @ w.double().T
    if b is not None:
        x = x + b.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    per = F.cross_entropy(x, labels, reduction="none", label_smoothing=label_smoothing)
    per = per + z_loss * torch.logsumexp(x, -1) ** 2
    m = mask.double() if weights is None else mask.double() * weights.double()
    total = (per * m).sum()
    return total / mask.sum().clamp(min=1) if reduction == "mean" else total


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(reduction="sum"),
        dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0),
        dict(weights=True),
    ],
)
def test_loss_and_every_gradient_match_the_unfused_loss(device, options):
    h, w, b, labels, mask = case(device=device)
    if options.get("weights"):
        options = dict(options, weights=torch.rand(labels.shape, device=device))
    ours_in, ref_in = leaves(h, w, b), leaves(h, w, b)
    # Chunks of 5 rows: several chunks, the last one partial.
    ours = sft_collate.linear_cross_entropy(*ours_in[:2], labels, mask, bias=ours_in[2], chunk_rows=5, **options)
    ref = unfused(*ref_in, labels, mask, **options)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6), (ours, ref)
    ours.backward()
    ref.backward()
    for name, a, r in zip(("hidden", "weight", "bias"), ours_in, ref_in):
        assert a.grad is not None and a.grad.dtype == a.dtype, name
        assert torch.allclose(a.grad.double(), r.grad.double(), rtol=1e-4, atol=1e-6), name


def test_upstream_gradient_scales_every_gradient_and_ignore_index():
    h, w, b, labels, mask = case(bias=False)
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    ours_in, ref_in = leaves(h, w), leaves(h, w)
    ours = sft_collate.linear_cross_entropy(*ours_in, labels)
    ref = unfused(*ref_in, None, labels.clamp(min=0), mask)
    (ours * 3.0).backward()
    (ref * 3.0).backward()
    assert torch.allclose(ours.double(), ref, rtol=1e-5)
    for a, r in zip(ours_in, ref_in):
        assert torch.allclose(a.grad.double(), r.grad.double(), rtol=1e-4, atol=1e-6)


def test_gradcheck_in_float64_with_every_option():
    h, w, b, labels, mask = case(rows=6, hidden=3, vocab=7, dtype=torch.float64)

    def fn(h, w, b):
        return sft_collate.linear_cross_entropy(
            h, w, labels, mask, bias=b, z_loss=0.01, label_smoothing=0.2, softcap=2.0, chunk_rows=4
        )

    assert torch.autograd.gradcheck(fn, tuple(leaves(h, w, b)))


def test_only_the_gradients_asked_for_and_the_extras(monkeypatch):
    h, w, b, labels, mask = case()
    w_in = w.clone().requires_grad_()
    loss, extras = sft_collate.linear_cross_entropy(h, w_in, labels, mask, bias=b, return_log_probs=True)
    loss.backward()
    assert w_in.grad is not None
    logits = h.double() @ w.double().T + b.double()
    want = torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0]
    assert torch.allclose(extras["log_probs"][mask].double(), want[mask], atol=1e-5)
    assert torch.allclose(extras["row_loss"][mask].double(), -want[mask], atol=1e-5)
    assert int(extras["count"]) == int(mask.sum())
    # In evaluation no gradient is computed, though the weight requires one.
    computed = []
    native = sft_collate._native.linear_cross_entropy
    spy = lambda *a: computed.append([p != 0 for p in a[-3:]]) or native(*a)  # noqa: E731
    monkeypatch.setattr(sft_collate._native, "linear_cross_entropy", spy)
    with torch.no_grad():
        assert torch.allclose(sft_collate.linear_cross_entropy(h, w_in, labels, mask, bias=b), loss)
    assert computed == [[False, False, False]]
    # Leading dimensions as in a trainer: [B, T, H] hidden states, [B, T] labels.
    batched = sft_collate.linear_cross_entropy(h.reshape(4, 6, -1), w, labels.reshape(4, 6), mask.reshape(4, 6), bias=b)
    assert torch.allclose(batched, loss)


def test_float32_master_weights_get_float32_gradients_without_rounding():
    h, w, b, labels, mask = case()
    h = h.to(torch.bfloat16)
    ours_in = leaves(h, w, b)  # bfloat16 hidden states, float32 weight and bias
    loss = sft_collate.linear_cross_entropy(ours_in[0], ours_in[1], labels, mask, bias=ours_in[2])
    loss.backward()
    # PyTorch in float64 on what was computed: the weight and bias rounded to bfloat16.
    ref_in = leaves(h.double(), w.to(torch.bfloat16).double(), b.to(torch.bfloat16).double())
    unfused(*ref_in, labels, mask).backward()
    assert ours_in[1].grad.dtype == ours_in[2].grad.dtype == torch.float32
    for a, r in zip(ours_in[1:], ref_in[1:]):
        # Within float32's rounding, not bfloat16's (about 4e-3).
        assert torch.allclose(a.grad.double(), r.grad.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weight=torch.zeros(97, 15)), "hidden sizes differ"),
        (dict(labels=torch.zeros(23, dtype=torch.long)), "labels"),
        (dict(bias=torch.zeros(96)), "bias"),
        (dict(weight=torch.zeros(97, 16, dtype=torch.float64)), "the same dtype"),
        (dict(reduction="none"), "reduction"),
        (dict(chunk_rows=0), "chunk_rows"),
        (dict(label_smoothing=2.0), "label_smoothing"),
        (dict(labels=torch.full((24,), 97)), "label"),
    ],
)
def test_bad_input_is_refused_in_the_users_terms(change, message):
    h, w, b, labels, mask = case()
    args = dict(hidden=h, weight=w, labels=labels, response_mask=mask, bias=b)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        sft_collate.linear_cross_entropy(**args)


@needs_cuda
@pytest.mark.parametrize(
    "dtype, master",
    [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)],
)
def test_cuda_equals_the_cpu_oracle(dtype, master):
    h, w, b, labels, mask = case(rows=300, hidden=64, vocab=1000, dtype=dtype)
    if master:
        w, b = w.float(), b.float()  # float32 master weights beside bfloat16 hidden states
    cpu_in = leaves(h, w, b)
    gpu_in = leaves(h.cuda(), w.cuda(), b.cuda())
    want = sft_collate.linear_cross_entropy(*cpu_in[:2], labels, mask, bias=cpu_in[2])
    got = sft_collate.linear_cross_entropy(*gpu_in[:2], labels.cuda(), mask.cuda(), bias=gpu_in[2], chunk_rows=64)
    want.backward()
    got.backward()
    # Relative to the largest element: the mean's gradients are small (about 1/300 of a probability).
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.cpu(), want, rtol=tol), (got, want)
    for name, a, r in zip(("hidden", "weight", "bias"), gpu_in, cpu_in):
        assert a.grad.dtype == r.grad.dtype, name
        error = (a.grad.cpu().double() - r.grad.double()).abs().max()
        assert error <= tol * r.grad.double().abs().max(), (name, error)
