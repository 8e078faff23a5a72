"""Stanford CS336 (assignment 5)'s functions with CS336's own signatures and return types, so that a
student's ``adapters.py`` is one import::

    from sft_collate.cs336 import (
        tokenize_prompt_and_output, compute_entropy, get_response_log_probs,
        masked_normalize, sft_microbatch_train_step,
    )

Semantics are CS336's: prompts and outputs tokenized separately without special tokens, right padding
with the pad token, labels shifted by one and padded with the pad token (not -100), ``response_mask``
true where the label is an output token. ``compute_entropy`` and ``get_response_log_probs`` run the
fused kernel on CUDA tensors and the f64 oracle on CPU tensors; log-probs carry gradients, entropies do
not (CS336 computes them without gradient)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ._api import tokenize_prompt_and_output as _tokenize
from ._loss import masked_cross_entropy


def tokenize_prompt_and_output(
    prompt_strs: Sequence[str], output_strs: Sequence[str], tokenizer: Any
) -> Dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` (int64) and ``response_mask`` (bool), ``(batch, max_len - 1)``."""
    return _tokenize(prompt_strs, output_strs, tokenizer)


def _per_position(logits: torch.Tensor, labels: torch.Tensor, return_log_probs: bool, return_entropy: bool):
    mask = torch.ones(labels.shape, dtype=torch.bool, device=logits.device)
    _, extras = masked_cross_entropy(
        logits,
        labels,
        mask,
        reduction="none",
        return_log_probs=return_log_probs,
        return_entropy=return_entropy,
    )
    return extras


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of the next-token distribution at every position of ``logits [..., V]``."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return _per_position(logits, labels, False, True)["entropy"].to(logits.dtype)


def get_response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
) -> Dict[str, torch.Tensor]:
    """``log_probs`` ``(batch, seq)`` of ``labels`` under ``model(input_ids).logits`` (with gradients),
    and ``token_entropy`` when asked."""
    logits = model(input_ids).logits
    extras = _per_position(logits, labels, True, return_token_entropy)
    out = {"log_probs": extras["log_probs"]}
    if return_token_entropy:
        out["token_entropy"] = extras["entropy"]
    return out


def masked_normalize(
    tensor: torch.Tensor,
    mask: torch.Tensor,
    normalize_constant: float,
    dim: Optional[int] = None,
) -> torch.Tensor:
    """``sum(tensor * mask, dim) / normalize_constant`` (``dim=None`` sums everything)."""
    masked = tensor * mask
    summed = masked.sum() if dim is None else masked.sum(dim=dim)
    return summed / normalize_constant


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``loss = -sum(log_probs · mask) / (normalize_constant · batch · gradient_accumulation_steps)``;
    calls ``loss.backward()`` and returns ``(loss, metadata)``, as CS336's does."""
    batch = policy_log_probs.shape[0]
    loss = -masked_normalize(policy_log_probs, response_mask, normalize_constant) / (
        batch * gradient_accumulation_steps
    )
    loss.backward()
    return loss, {"masked_tokens": response_mask.sum().detach()}
