"""The fused masked cross-entropy as PyTorch operators (``torch.library.custom_op``, so autograd and
``torch.compile`` keep it): the forward reads each trained row of the logits once; the backward runs the
forward+backward kernel with every upstream gradient folded into per-row weights, read on the device
(no host synchronization anywhere). On CUDA tensors the kernels run on torch's current stream; on CPU
tensors the library's f64 oracle runs (float64 logits give float64 results, so ``gradcheck`` works)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import _native

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _run(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    weights: Optional[torch.Tensor],
    normalization: str,
    normalize_constant: float,
    batch_size: int,
    gradient_accumulation_steps: int,
    grad: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One call of the native operator: (scalars [sum, loss], row_loss, log_probs, entropy, count)."""
    rows, vocab = logits.shape
    device = logits.device
    out_dtype = _out_dtype(logits)
    new = lambda n, dtype=out_dtype: torch.empty(n, dtype=dtype, device=device)  # noqa: E731
    row_loss, log_probs, entropy, scalars = new(rows), new(rows), new(rows), new(2)
    count, flag = new(1, torch.int32), new(1, torch.int32)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = int(torch.cuda.current_stream(index).cuda_stream)
        kind = "cuda"
    else:
        index, stream, kind = 0, 0, "cpu"
    _native.masked_cross_entropy(
        kind,
        index,
        stream,
        _DTYPES[logits.dtype],
        rows,
        vocab,
        logits.stride(0) if rows > 1 else vocab,
        logits.data_ptr(),
        labels.data_ptr(),
        labels.dtype == torch.int64,
        mask.data_ptr(),
        weights.data_ptr() if weights is not None else 0,
        normalization,
        float(normalize_constant),
        int(batch_size),
        int(gradient_accumulation_steps),
        1.0,
        0,
        row_loss.data_ptr(),
        log_probs.data_ptr(),
        entropy.data_ptr(),
        0,
        scalars.data_ptr(),
        count.data_ptr(),
        flag.data_ptr(),
        grad.data_ptr() if grad is not None else 0,
        grad.stride(0) if grad is not None and rows > 1 else vocab,
    )
    return scalars, row_loss, log_probs, entropy, count


@torch.library.custom_op("sft_collate::masked_ce", mutates_args=())
def _masked_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    weights: Optional[torch.Tensor],
    normalization: str,
    normalize_constant: float,
    batch_size: int,
    gradient_accumulation_steps: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scalars, row_loss, log_probs, entropy, count = _run(
        logits, labels, mask, weights, normalization, normalize_constant, batch_size,
        gradient_accumulation_steps, None,
    )
    return scalars[1].clone(), row_loss, log_probs, entropy, count[0].clone()


@_masked_ce.register_fake
def _(logits, labels, mask, weights, normalization, normalize_constant, batch_size, gradient_accumulation_steps):
    rows = logits.shape[0]
    dtype = _out_dtype(logits)
    return (
        logits.new_empty((), dtype=dtype),
        logits.new_empty((rows,), dtype=dtype),
        logits.new_empty((rows,), dtype=dtype),
        logits.new_empty((rows,), dtype=dtype),
        logits.new_empty((), dtype=torch.int32),
    )


@torch.library.custom_op("sft_collate::masked_ce_backward", mutates_args=())
def _masked_ce_backward(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor:
    """d/dlogits of Σ_r row_weights[r] · (-log p(label_r)) over the trained rows."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _run(logits, labels, mask, row_weights, "sum", 1.0, 1, 1, grad)
    return grad


@_masked_ce_backward.register_fake
def _(logits, labels, mask, row_weights):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, mask, weights, normalization, nc, batch_size, gas = inputs
    ctx.save_for_backward(logits, labels, mask, weights, output[4])
    ctx.normalization = normalization
    ctx.denominator = float(nc) * batch_size * gas


def _backward(ctx, grad_loss, grad_row_loss, grad_log_probs, grad_entropy, grad_count):
    """Every upstream gradient as one weight per row: loss = Σ w·ℓ / D, row_loss = w·ℓ, log_probs = -ℓ
    (ℓ = -log p), so d/dlogits = Σ_r (g·w_r/D + h_r·w_r - q_r) · dℓ_r. D stays on the device. The entropy
    output carries no gradient (treated as a constant)."""
    logits, labels, mask, weights, count = ctx.saved_tensors
    w = weights.float() if weights is not None else torch.ones(labels.shape, device=logits.device)
    if ctx.normalization == "mean":
        denominator = count.float().clamp(min=1.0)
    elif ctx.normalization == "cs336":
        denominator = ctx.denominator
    else:
        denominator = 1.0
    e = torch.zeros_like(w)
    if grad_loss is not None:
        e = e + grad_loss.float() * w / denominator
    if grad_row_loss is not None:
        e = e + grad_row_loss.float() * w
    if grad_log_probs is not None:
        e = e - grad_log_probs.float()
    grad = _masked_ce_backward(logits, labels, mask, e.float().contiguous())
    return grad, None, None, None, None, None, None, None


_masked_ce.register_autograd(_backward, setup_context=_setup_context)


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    response_mask: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalization: Optional[Tuple[float, int, int]] = None,
    weights: Optional[torch.Tensor] = None,
    return_log_probs: bool = False,
    return_entropy: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Cross-entropy of ``logits [..., V]`` against ``labels [...]`` over the trained positions only,
    fused: one read of each trained row forward, the gradient computed in f32 and rounded once to the
    logits' dtype.

    The trained positions are ``response_mask`` (bool, ``[...]``) when given, else ``labels !=
    ignore_index`` (PyTorch's convention). ``reduction``: ``"mean"`` over trained tokens (0 when there are
    none), ``"sum"``, or ``"none"`` (a loss per position, 0 where untrained). ``normalization=(nc, B,
    gas)`` divides the sum by ``nc · B · gas`` instead (CS336's ``sft_microbatch_train_step``).
    ``weights [...]`` (float32) weight each position's term (not differentiated). With
    ``return_log_probs`` / ``return_entropy``, also the per-position log-probability of the label and
    the entropy (0 where untrained; the entropy carries no gradient), as ``(loss, {"log_probs": ...,
    "entropy": ...})``. Non-finite logits behave as in PyTorch (a NaN poisons its row). A label outside
    ``[0, V)`` at a trained position raises on CPU tensors; on CUDA tensors it makes its row (and so the
    loss) NaN, since raising would wait for the GPU."""
    if logits.dim() < 1:
        raise ValueError("logits must be [..., V]")
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits of {logits.dtype}: float32, float16, bfloat16 (or float64 on the CPU)")
    if labels.shape != lead:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    logits2d = logits.reshape(-1, vocab)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    flat_labels = labels.reshape(-1)
    if flat_labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels of {labels.dtype}: int32 or int64")
    flat_labels = flat_labels.contiguous()
    if response_mask is None:
        mask = (flat_labels != ignore_index).contiguous()
    else:
        if response_mask.shape != lead:
            raise ValueError(f"response_mask {tuple(response_mask.shape)} does not match labels {tuple(lead)}")
        mask = response_mask.reshape(-1).to(torch.bool).contiguous()
    flat_weights = None
    if weights is not None:
        if weights.shape != lead:
            raise ValueError(f"weights {tuple(weights.shape)} do not match labels {tuple(lead)}")
        flat_weights = weights.reshape(-1).to(torch.float32).contiguous()
    for name, t in (("labels", flat_labels), ("response_mask", mask), ("weights", flat_weights)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, the logits on {logits.device}")
    if normalization is not None:
        nc, batch_size, gas = normalization
        kind, args = "cs336", (float(nc), int(batch_size), int(gas))
    elif reduction == "mean":
        kind, args = "mean", (1.0, 1, 1)
    elif reduction in ("sum", "none"):
        kind, args = "sum", (1.0, 1, 1)
    else:
        raise ValueError(f"reduction={reduction!r}: mean, sum or none")
    loss, row_loss, log_probs, entropy, _count = _masked_ce(logits2d, flat_labels, mask, flat_weights, kind, *args)
    if reduction == "none" and normalization is None:
        loss = row_loss.reshape(lead)
    if not (return_log_probs or return_entropy):
        return loss
    extras = {}
    if return_log_probs:
        extras["log_probs"] = log_probs.reshape(lead)
    if return_entropy:
        extras["entropy"] = entropy.detach().reshape(lead)
    return loss, extras
