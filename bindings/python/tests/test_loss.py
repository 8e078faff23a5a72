"""The masked cross-entropy against PyTorch's own, its gradients (also by gradcheck in float64), every
option, and the CS336 companions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, needs_cuda

import sft_collate
from sft_collate import cs336


def case(rows=12, vocab=97, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    mask = (torch.rand(rows, generator=g) > 0.3).to(device)
    return logits, labels, mask


def reference(logits, labels, mask, reduction="mean", weights=None):
    per = F.cross_entropy(logits.float(), labels, reduction="none")
    w = mask.float() if weights is None else mask.float() * weights
    if reduction == "none":
        return per * w
    total = (per * w).sum()
    return total / mask.sum().clamp(min=1) if reduction == "mean" else total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradient_match_pytorch(device, reduction):
    logits, labels, mask = case(device=device)
    weights = torch.rand(labels.shape, device=device)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = sft_collate.masked_cross_entropy(ours_in, labels, mask, reduction=reduction, weights=weights)
    ref = reference(ref_in, labels, mask, reduction, weights)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    upstream = torch.rand_like(ours) + 0.5
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert torch.allclose(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_without_a_mask_and_bf16(device):
    logits, labels, mask = case(rows=33, vocab=1000, dtype=torch.bfloat16, device=device)
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    x = logits.clone().requires_grad_()
    loss = sft_collate.masked_cross_entropy(x, labels)
    ref_x = logits.float().clone().requires_grad_()
    ref = F.cross_entropy(ref_x, labels, ignore_index=-100)
    assert torch.allclose(loss, ref, rtol=1e-5)
    loss.backward()
    ref.backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.float(), ref_x.grad, rtol=1e-2, atol=1e-5)


def test_gradcheck_in_float64():
    logits, labels, mask = case(rows=5, vocab=7, dtype=torch.float64)
    weights = torch.rand(5)
    for reduction in ("mean", "sum", "none"):
        fn = lambda x: sft_collate.masked_cross_entropy(x, labels, mask, reduction=reduction, weights=weights)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),))
    lp = lambda x: sft_collate.masked_cross_entropy(x, labels, mask, return_log_probs=True)[1]["log_probs"]  # noqa: E731
    assert torch.autograd.gradcheck(lp, (logits.clone().requires_grad_(),))
    cs = lambda x: sft_collate.masked_cross_entropy(x, labels, mask, normalization=(2.0, 4, 3))  # noqa: E731
    assert torch.autograd.gradcheck(cs, (logits.clone().requires_grad_(),))


@pytest.mark.parametrize("device", DEVICES)
def test_log_probs_and_entropy(device):
    logits, labels, mask = case(device=device)
    x = logits.clone().requires_grad_()
    _, extras = sft_collate.masked_cross_entropy(x, labels, mask, return_log_probs=True, return_entropy=True)
    logp = torch.log_softmax(logits.float(), -1)
    want_lp = logp.gather(-1, labels[:, None])[:, 0] * mask
    want_h = -(logp.exp() * logp).sum(-1) * mask
    assert torch.allclose(extras["log_probs"], want_lp, atol=1e-5)
    assert torch.allclose(extras["entropy"], want_h, atol=1e-5)
    # Log-probs carry gradients: d sum(log_probs) / d logits = mask · (onehot - softmax).
    extras["log_probs"].sum().backward()
    want = (F.one_hot(labels, logits.shape[-1]) - logp.exp()) * mask[:, None]
    assert torch.allclose(x.grad, want, atol=1e-6)


def textbook(logits, labels, mask, z_loss=0.0, label_smoothing=0.0, softcap=None):
    """Token-mean loss by PyTorch's own ops: softcap, F.cross_entropy with label smoothing, the z-loss."""
    x = logits.float()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    per = F.cross_entropy(x, labels, reduction="none", label_smoothing=label_smoothing)
    per = per + z_loss * torch.logsumexp(x, -1) ** 2
    return (per * mask).sum() / mask.sum().clamp(min=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1),
        dict(label_smoothing=1.0),
        dict(z_loss=1e-3),
        dict(softcap=2.5),
        dict(z_loss=1e-4, label_smoothing=0.2, softcap=30.0),
    ],
)
def test_options_match_pytorch_with_gradients(device, options):
    logits, labels, mask = case(rows=40, vocab=501, device=device)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = sft_collate.masked_cross_entropy(ours_in, labels, mask, **options)
    ref = textbook(ref_in, labels, mask, **options)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours, ref)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours_in.grad, ref_in.grad, rtol=1e-4, atol=1e-7)


def test_options_gradcheck_in_float64_and_accuracy():
    logits, labels, mask = case(rows=5, vocab=7, dtype=torch.float64)
    fn = lambda x: sft_collate.masked_cross_entropy(  # noqa: E731
        x, labels, mask, z_loss=0.01, label_smoothing=0.3, softcap=2.0, reduction="none"
    )
    assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),))
    loss, extras = sft_collate.masked_cross_entropy(logits, labels, mask, z_loss=0.01, return_accuracy=True)
    want_argmax = torch.where(mask, logits.argmax(-1), torch.full_like(labels, -1))
    assert torch.equal(extras["argmax"], want_argmax)
    assert int(extras["correct"]) == int(((logits.argmax(-1) == labels) & mask).sum())
    assert int(extras["count"]) == int(mask.sum())
    z = (0.01 * torch.logsumexp(logits, -1) ** 2 * mask).sum()
    assert torch.allclose(extras["z_loss"], z)


def test_bad_labels_raise_on_the_cpu_and_torch_compile_keeps_the_op():
    logits, labels, mask = case()
    labels[0], mask[0] = 500, True
    with pytest.raises(ValueError, match="outside"):
        sft_collate.masked_cross_entropy(logits, labels, mask)
    logits, labels, mask = case()
    compiled = torch.compile(
        lambda x: sft_collate.masked_cross_entropy(x, labels, mask), backend="aot_eager", fullgraph=True
    )
    x = logits.clone().requires_grad_()
    compiled(x).backward()
    ref = logits.clone().requires_grad_()
    reference(ref, labels, mask).backward()
    assert torch.allclose(x.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_nan_poisons_its_row_as_in_pytorch():
    logits, labels, mask = case()
    logits[2, 5] = float("nan")
    mask[2] = True
    assert torch.isnan(sft_collate.masked_cross_entropy(logits, labels, mask))
    mask[2] = False
    assert torch.isfinite(sft_collate.masked_cross_entropy(logits, labels, mask))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_equals_the_cpu_oracle(dtype):
    logits, labels, mask = case(rows=64, vocab=32003, dtype=dtype)
    cpu = sft_collate.masked_cross_entropy(logits.clone().requires_grad_(), labels, mask)
    x = logits.cuda().requires_grad_()
    gpu = sft_collate.masked_cross_entropy(x, labels.cuda(), mask.cuda())
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-5)
    gpu.backward()
    assert x.grad.dtype == dtype


# ---- CS336's functions against CS336's vectors.


def floats(values):
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in values])


def test_cs336_compute_entropy(fixture_json):
    fx = fixture_json("cs336/compute_entropy.json")
    logits = torch.tensor(fx["logits"]).reshape(fx["logits_shape"])
    got = cs336.compute_entropy(logits)
    want = torch.tensor(fx["expected"]).reshape(got.shape)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-2)


def test_cs336_masked_normalize_and_train_step(fixture_json):
    fx = fixture_json("cs336/sft_microbatch_train_step.json")
    mask = torch.tensor(fx["response_mask"])
    for name, c in fx["cases"].items():
        log_probs = torch.tensor(fx["policy_log_probs"], requires_grad=True)
        # The 10-step case accumulates .grad in place over the steps, every loss the same.
        steps = c.get("steps", 1)
        losses = [
            cs336.sft_microbatch_train_step(log_probs, mask, fx["gradient_accumulation_steps"], c["normalize_constant"])[0]
            for _ in range(steps)
        ]
        want_losses = c["loss"] if isinstance(c["loss"], list) else [c["loss"]]
        for loss, want in zip(losses, want_losses):
            assert torch.allclose(loss, torch.tensor(want), rtol=1e-4, atol=1e-2), name
        want_grad = torch.tensor(c["policy_log_probs_grad"])
        if want_grad.dim() == 3:  # a list of references to the one accumulated .grad
            want_grad = want_grad[-1]
        assert torch.allclose(log_probs.grad, want_grad, rtol=1e-4, atol=1e-2), name


def test_cs336_get_response_log_probs():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 50)

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.embed(input_ids)})()

    model = Model()
    input_ids = torch.randint(0, 50, (2, 6))
    labels = torch.randint(0, 50, (2, 6))
    out = cs336.get_response_log_probs(model, input_ids, labels, return_token_entropy=True)
    logits = model(input_ids).logits
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(out["log_probs"], want, atol=1e-5)
    assert out["token_entropy"].shape == (2, 6)
    out["log_probs"].sum().backward()
    assert model.embed.weight.grad is not None
