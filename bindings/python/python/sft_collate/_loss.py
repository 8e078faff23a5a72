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
    options: Tuple[float, float, float],
    with_entropy: bool,
    with_argmax: bool,
    grad: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, ...]:
    """One call of the native operator: (scalars [sum, loss, z_sum], row_loss, log_probs, entropy,
    counts [trained, correct, documents], argmax). `options` = (z_loss, label_smoothing, softcap or 0).
    Outputs not asked for are empty tensors (the kernels then skip their work)."""
    rows, vocab = logits.shape
    device = logits.device
    out_dtype = _out_dtype(logits)
    new = lambda n, dtype=out_dtype: torch.empty(n, dtype=dtype, device=device)  # noqa: E731
    z_loss, label_smoothing, softcap = options
    row_loss, log_probs, scalars = new(rows), new(rows), new(3)
    entropy = new(rows if with_entropy else 0)
    argmax = new(rows if with_argmax else 0, torch.int32)
    row_z = new(rows if z_loss != 0.0 else 0, torch.float32)
    count, flag = new(3, torch.int32), new(1, torch.int32)
    kind, index, stream = _launch(device)
    address = lambda t: t.data_ptr() if t.numel() > 0 else 0  # noqa: E731
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
        float(z_loss),
        float(label_smoothing),
        float(softcap),
        address(row_loss),
        address(row_z),
        address(log_probs),
        address(entropy),
        0,
        address(argmax),
        scalars.data_ptr(),
        count.data_ptr(),
        flag.data_ptr(),
        grad.data_ptr() if grad is not None else 0,
        grad.stride(0) if grad is not None and rows > 1 else vocab,
    )
    return scalars, row_loss, log_probs, entropy, count, argmax


def _targets(
    labels: torch.Tensor,
    response_mask: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    ignore_index: int,
    device: torch.device,
    what: str,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The labels, the trained positions (``response_mask``, else ``labels != ignore_index``) and the
    weights, flat and contiguous, checked against the labels' shape and ``device`` (that of ``what``)."""
    lead = labels.shape
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
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, the {what} on {device}")
    return flat_labels, mask, flat_weights


def _reduction(
    reduction: str, normalization: Optional[Tuple[float, int, int]], allow_none: bool
) -> Tuple[str, Tuple[float, int, int]]:
    """The native normalization's name and (constant, batch size, accumulation steps)."""
    if normalization is not None:
        nc, batch_size, gas = normalization
        return "cs336", (float(nc), int(batch_size), int(gas))
    if reduction == "mean":
        return "mean", (1.0, 1, 1)
    if reduction == "sum" or (reduction == "none" and allow_none):
        return "sum", (1.0, 1, 1)
    raise ValueError(f"reduction={reduction!r}: mean, sum" + (" or none" if allow_none else ""))


def _options(z_loss: float, label_smoothing: float, softcap: Optional[float]) -> Tuple[float, float, float]:
    """(z_loss, label_smoothing, softcap or 0), checked."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: in [0, 1]")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"softcap={softcap}: a positive number")
    return float(z_loss), float(label_smoothing), float(softcap or 0.0)


def _launch(device: torch.device) -> Tuple[str, int, int]:
    """The native call's device kind, index and stream (torch's current stream on CUDA)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "cuda", index, int(torch.cuda.current_stream(index).cuda_stream)
    return "cpu", 0, 0


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
    z_loss: float,
    label_smoothing: float,
    softcap: float,
    with_entropy: bool,
    with_argmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scalars, row_loss, log_probs, entropy, count, argmax = _run(
        logits, labels, mask, weights, normalization, normalize_constant, batch_size,
        gradient_accumulation_steps, (z_loss, label_smoothing, softcap), with_entropy, with_argmax, None,
    )
    return scalars[1].clone(), row_loss, log_probs, entropy, count, argmax, scalars[2].clone()


@_masked_ce.register_fake
def _(logits, labels, mask, weights, normalization, normalize_constant, batch_size, gradient_accumulation_steps,
      z_loss, label_smoothing, softcap, with_entropy, with_argmax):
    rows = logits.shape[0]
    dtype = _out_dtype(logits)
    return (
        logits.new_empty((), dtype=dtype),
        logits.new_empty((rows,), dtype=dtype),
        logits.new_empty((rows,), dtype=dtype),
        logits.new_empty((rows if with_entropy else 0,), dtype=dtype),
        logits.new_empty((3,), dtype=torch.int32),
        logits.new_empty((rows if with_argmax else 0,), dtype=torch.int32),
        logits.new_empty((), dtype=dtype),
    )


@torch.library.custom_op("sft_collate::masked_ce_backward", mutates_args=())
def _masked_ce_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    row_weights: torch.Tensor,
    z_loss: float,
    label_smoothing: float,
    softcap: float,
) -> torch.Tensor:
    """d/dlogits of Σ_r row_weights[r] · ℓ_r over the trained rows (ℓ the row's loss term)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _run(logits, labels, mask, row_weights, "sum", 1.0, 1, 1, (z_loss, label_smoothing, softcap), False, False,
         grad)
    return grad


@_masked_ce_backward.register_fake
def _(logits, labels, mask, row_weights, z_loss, label_smoothing, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, mask, weights, normalization, nc, batch_size, gas, z_loss, smoothing, softcap, _, _ = inputs
    ctx.save_for_backward(logits, labels, mask, weights, output[4])
    ctx.normalization = normalization
    ctx.denominator = float(nc) * batch_size * gas
    ctx.options = (z_loss, smoothing, softcap)


def _backward(ctx, grad_loss, grad_row_loss, grad_log_probs, grad_entropy, grad_count, grad_argmax, grad_z):
    """Every upstream gradient as one weight per row: loss = Σ w·ℓ / D, row_loss = w·ℓ and, without
    options, log_probs = -ℓ (ℓ = -log p), so d/dlogits = Σ_r (g·w_r/D + h_r·w_r - q_r) · dℓ_r. D stays on
    the device. The entropy, argmax and z-loss outputs carry no gradient (nor the log-probs when an option
    makes ℓ differ from -log p: the public function returns them detached then)."""
    logits, labels, mask, weights, count = ctx.saved_tensors
    w = weights.float() if weights is not None else torch.ones(labels.shape, device=logits.device)
    if ctx.normalization == "mean":
        denominator = count[0].float().clamp(min=1.0)
    elif ctx.normalization == "cs336":
        denominator = ctx.denominator
    else:
        denominator = 1.0
    e = torch.zeros_like(w)
    if grad_loss is not None:
        e = e + grad_loss.float() * w / denominator
    if grad_row_loss is not None:
        e = e + grad_row_loss.float() * w
    if grad_log_probs is not None and ctx.options == (0.0, 0.0, 0.0):
        e = e - grad_log_probs.float()
    grad = _masked_ce_backward(logits, labels, mask, e.float().contiguous(), *ctx.options)
    return (grad,) + (None,) * 12


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
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    return_log_probs: bool = False,
    return_entropy: bool = False,
    return_accuracy: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Cross-entropy of ``logits [..., V]`` against ``labels [...]`` over the trained positions only,
    fused: one read of each trained row forward, the gradient computed in f32 and rounded once to the
    logits' dtype.

    The trained positions are ``response_mask`` (bool, ``[...]``) when given, else ``labels !=
    ignore_index`` (PyTorch's convention). ``reduction``: ``"mean"`` over trained tokens (0 when there are
    none), ``"sum"``, or ``"none"`` (a loss per position, 0 where untrained). ``normalization=(nc, B,
    gas)`` divides the sum by ``nc · B · gas`` instead (CS336's ``sft_microbatch_train_step``).
    ``weights [...]`` (float32) weight each position's term (not differentiated).

    Options, in the same pass and in the gradient: ``z_loss=s`` adds ``s · logsumexp²`` per trained
    position (PaLM), ``label_smoothing=ε`` is
    PyTorch's (``(1-ε)·nll + ε·mean_j(-log p_j)``), ``softcap=C`` replaces the logits by ``C·tanh(x/C)``
    first (Gemma 2).

    With ``return_log_probs`` / ``return_entropy`` / ``return_accuracy``, also the per-position
    log-probability of the label, the entropy (0 where untrained), the argmax of the logits
    (``extras["argmax"]``, int64, -1 where untrained) with the number of trained positions it gets right
    (``extras["correct"]``) and of trained positions (``extras["count"]``), as ``(loss, extras)``; with a
    z-loss, extras also hold its part of the sum (``extras["z_loss"]``). The
    log-probs carry gradients unless an option is set (they are returned detached then); the entropy,
    argmax and counts never do. Non-finite logits behave as in PyTorch (a NaN poisons its row). A label outside
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
    flat_labels, mask, flat_weights = _targets(labels, response_mask, weights, ignore_index, logits.device, "logits")
    kind, args = _reduction(reduction, normalization, allow_none=True)
    options = _options(z_loss, label_smoothing, softcap)
    loss, row_loss, log_probs, entropy, counts, argmax, z_sum = _masked_ce(
        logits2d, flat_labels, mask, flat_weights, kind, *args, *options, return_entropy, return_accuracy
    )
    if reduction == "none" and normalization is None:
        loss = row_loss.reshape(lead)
    if not (return_log_probs or return_entropy or return_accuracy):
        return loss
    extras = {}
    if return_log_probs:
        log_probs = log_probs.reshape(lead)
        extras["log_probs"] = log_probs if options == (0.0, 0.0, 0.0) else log_probs.detach()
    if return_entropy:
        extras["entropy"] = entropy.detach().reshape(lead)
    if return_accuracy:
        extras["argmax"] = argmax.detach().reshape(lead).long()
        extras["correct"] = counts[1].detach()
        extras["count"] = counts[0].detach()
    if z_loss != 0.0:
        extras["z_loss"] = z_sum.detach()  # Σ w · s · lse², before the reduction
    return loss, extras


class _LinearCE(torch.autograd.Function):
    """The fused linear cross-entropy: forward computes the loss and, for the inputs that need them, its
    gradients (as Liger's and Cut Cross-Entropy's do: the logits never exist whole, so there is nothing
    to keep for a later backward); backward scales them by the upstream gradient, on the device."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, mask, weights, kind, args, options, chunk_rows, log_probs_wanted,
                wants):
        rows, hidden_size = hidden.shape
        vocab = weight.shape[0]
        device = hidden.device
        out_dtype = _out_dtype(hidden)
        grad_hidden = torch.empty_like(hidden) if wants[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=out_dtype, device=device) if wants[1] else None
        grad_bias = torch.zeros(vocab, dtype=out_dtype, device=device) if bias is not None and wants[2] else None
        row_loss = torch.empty(rows, dtype=out_dtype, device=device)
        log_probs = torch.empty(rows if log_probs_wanted else 0, dtype=out_dtype, device=device)
        scalars = torch.empty(3, dtype=out_dtype, device=device)
        count = torch.empty(3, dtype=torch.int32, device=device)
        flag = torch.empty(1, dtype=torch.int32, device=device)
        # float32 master weights with half-precision hidden states: computed in the hidden states' dtype,
        # `d weight` and `d bias` handed back in float32 as accumulated, never rounded to half precision.
        weight_in, bias_in = weight.to(hidden.dtype), bias.to(hidden.dtype) if bias is not None else None
        kind_, index, stream = _launch(device)
        address = lambda t: t.data_ptr() if t is not None and t.numel() > 0 else 0  # noqa: E731
        _native.linear_cross_entropy(
            kind_, index, stream, _DTYPES[hidden.dtype], rows, hidden_size, vocab,
            hidden.data_ptr(), weight_in.data_ptr(), address(bias_in), labels.data_ptr(), labels.dtype == torch.int64,
            mask.data_ptr(), address(weights), kind, *args, *options, int(chunk_rows or 0),
            row_loss.data_ptr(), address(log_probs), scalars.data_ptr(), count.data_ptr(), flag.data_ptr(),
            address(grad_hidden), address(grad_weight), address(grad_bias),
        )
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(row_loss, log_probs, count, scalars)
        return scalars[1].clone(), row_loss, log_probs, count, scalars

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = lambda g, dtype: None if g is None else (g * grad_loss.to(g.dtype)).to(dtype)  # noqa: E731
        return (
            scale(grad_hidden, ctx.dtypes[0]),
            scale(grad_weight, ctx.dtypes[1]),
            scale(grad_bias, ctx.dtypes[2]),
        ) + (None,) * 9


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    response_mask: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalization: Optional[Tuple[float, int, int]] = None,
    weights: Optional[torch.Tensor] = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    chunk_rows: Optional[int] = None,
    return_log_probs: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """The masked cross-entropy of ``hidden [..., H] @ weight.T (+ bias)`` (an LM head: ``weight [V, H]``
    as ``nn.Linear`` stores it) without the ``[N, V]`` logits in memory: on CUDA the rows go a chunk at a
    time through cuBLAS (f32 accumulation) and the fused kernels, on torch's current stream, and the
    gradients of ``hidden``, ``weight`` and ``bias`` are computed in the same pass (``d weight`` and
    ``d bias`` accumulated in f32, then cast to the parameters' dtype). float32 master weights with
    bfloat16 or float16 hidden states are taken as they are: the product runs in the hidden states'
    dtype, and their gradients come back in float32 as accumulated, never rounded to half precision. On
    CPU tensors the library's f64 oracle runs unfused (for small shapes and checking; float64 inputs give
    float64 results, so ``gradcheck`` works).

    Targets and options as :func:`masked_cross_entropy`: ``response_mask`` or ``labels != ignore_index``,
    ``reduction`` ``"mean"`` or ``"sum"`` (a per-position loss with gradients would need the logits
    again: use :func:`masked_cross_entropy`), ``normalization=(nc, B, gas)``, ``weights``, ``z_loss``,
    ``label_smoothing``, ``softcap``. ``chunk_rows`` overrides the rows per chunk (default: about N / ⌈V /
    H⌉, as Liger, capped at a quarter of the free GPU memory). The gradients are computed only for the
    inputs that require them, and are scaled by the upstream gradient on the device (no host sync).

    With ``return_log_probs``, also ``(loss, extras)`` with the per-position log-probability of the label
    (``extras["log_probs"]``, detached), the per-position loss term (``extras["row_loss"]``, detached)
    and the number of trained positions (``extras["count"]``). A label outside ``[0, V)`` at a trained
    position raises on CPU tensors and makes the loss NaN on CUDA tensors, as in
    :func:`masked_cross_entropy`."""
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"hidden must be [..., H] and weight [V, H], not {tuple(hidden.shape)} and {tuple(weight.shape)}")
    vocab, hidden_size = weight.shape
    if hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: the hidden sizes differ")
    lead = hidden.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden of {hidden.dtype}: float32, float16, bfloat16 (or float64 on the CPU)")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias {tuple(bias.shape)}: [V] = ({vocab},)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        master = t.dtype == torch.float32 and hidden.dtype in (torch.bfloat16, torch.float16)
        if t.dtype != hidden.dtype and not master:
            raise ValueError(
                f"{name} of {t.dtype}, hidden of {hidden.dtype}: the same dtype, or float32 master weights with "
                "bfloat16 or float16 hidden states"
            )
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: at least 1")
    flat_labels, mask, flat_weights = _targets(labels, response_mask, weights, ignore_index, hidden.device, "hidden")
    kind, args = _reduction(reduction, normalization, allow_none=False)
    options = _options(z_loss, label_smoothing, softcap)
    hidden2d = hidden.reshape(-1, hidden_size).contiguous()
    # The gradients to compute: none in evaluation (`torch.no_grad`), where a parameter still requires one.
    wants = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, row_loss, log_probs, counts, _ = _LinearCE.apply(
        hidden2d, weight.contiguous(), bias.contiguous() if bias is not None else None, flat_labels, mask,
        flat_weights, kind, args, options, chunk_rows, return_log_probs, wants,
    )
    if not return_log_probs:
        return loss
    return loss, {
        "log_probs": log_probs.reshape(lead),
        "row_loss": row_loss.reshape(lead),
        "count": counts[0],
    }


class _VocabParallelCE(torch.autograd.Function):
    """The loss of one rank's vocabulary columns; backward scales the gradient computed in forward."""

    @staticmethod
    def forward(ctx, logits, labels, mask, start, vocab, ignore_index, rank, size, all_gather, kind, options):
        rows, width = logits.shape
        x = logits.detach().to(torch.float32).contiguous()
        row_loss = torch.empty(rows, dtype=torch.float32)
        grad = torch.empty(rows, width, dtype=torch.float32) if logits.requires_grad else None
        loss, _total, _count = _native.vocab_parallel_cross_entropy(
            rows,
            width,
            start,
            vocab,
            x.data_ptr(),
            labels.data_ptr(),
            labels.dtype == torch.int64,
            0 if mask is None else mask.data_ptr(),
            ignore_index,
            rank,
            size,
            all_gather,
            kind,
            *options,
            row_loss.data_ptr(),
            0 if grad is None else grad.data_ptr(),
        )
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        return torch.tensor(loss, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # The loss is linear in the upstream gradient: the one computed with upstream 1, scaled.
        return (grad * grad_output).to(ctx.dtype), *([None] * 10)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    response_mask: Optional[torch.Tensor] = None,
    *,
    vocab_start: int,
    vocab_size: int,
    all_gather: Any,
    rank: int,
    world_size: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """The cross-entropy over a vocabulary split across ranks (a tensor-parallel LM head): ``logits
    [N, W]`` are this rank's columns ``vocab_start .. vocab_start + W`` of ``vocab_size``, ``labels [N]``
    ids in the whole vocabulary (the same on every rank, as the mask). ``all_gather(bytes) -> bytes``
    returns every rank's bytes concatenated in rank order: with ``torch.distributed``::

        def all_gather(b):
            t = torch.frombuffer(bytearray(b), dtype=torch.uint8)
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, t)
            return b"".join(p.numpy().tobytes() for p in parts)

    Every rank gets the whole vocabulary's loss (one exchange of 64 bytes per trained row, after one of
    the shards), and backward the gradient of its own columns. CPU tensors (float32; others are
    converted); ``reduction`` ``"mean"`` or ``"sum"``; the options as :func:`masked_cross_entropy`'s.
    Bad input on any rank raises on every rank."""
    if logits.dim() != 2:
        raise ValueError("logits must be [N, W]: this rank's columns")
    if logits.device.type != "cpu":
        raise ValueError(f"logits on {logits.device}: the vocabulary-parallel loss takes CPU tensors")
    rows = logits.shape[0]
    if labels.shape != (rows,) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be [{rows}] int32 or int64, not {tuple(labels.shape)} {labels.dtype}")
    mask = None
    if response_mask is not None:
        if response_mask.shape != (rows,):
            raise ValueError(f"response_mask {tuple(response_mask.shape)} does not match labels [{rows}]")
        mask = response_mask.to(torch.bool).contiguous()
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: mean or sum")
    options = (float(z_loss), float(label_smoothing), float(softcap or 0.0))
    return _VocabParallelCE.apply(
        logits,
        labels.contiguous(),
        mask,
        int(vocab_start),
        int(vocab_size),
        int(ignore_index),
        int(rank),
        int(world_size),
        all_gather,
        reduction,
        options,
    )
