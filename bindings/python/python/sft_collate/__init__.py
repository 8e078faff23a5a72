"""sft-collate: CS336's ``tokenize_prompt_and_output`` (and conversations, packing, bucketing) and a fused
masked cross-entropy, in Rust and CUDA, for PyTorch.

- :func:`tokenize_prompt_and_output`, :func:`tokenize_conversations`, :func:`pack`, :func:`bucket_order`
- :func:`tokenize_to_store`: a JSONL, JSON, Parquet or Arrow file tokenized once into Arrow files (sharded across processes);
  :class:`Loader`: a training loop's batches from it, every epoch, every rank, resumable;
  :func:`export_megatron`: it as Megatron-Bridge packed-sequence Parquet
- :func:`masked_cross_entropy` (autograd; on CUDA the fused kernel on torch's current stream)
- :func:`linear_cross_entropy`: the loss of an LM head's output without the ``[N, V]`` logits in memory
  (autograd; on CUDA chunks through cuBLAS and the fused kernel)
- :func:`vocab_parallel_cross_entropy`: the same loss over a vocabulary split across ranks (CPU tensors)
- :class:`Tokenizer`, :func:`load_tokenizer` (a path, a built-in, ``tokenizers`` or ``transformers``)
- :mod:`sft_collate.cs336`: CS336's functions with CS336's signatures
"""

from . import _native
from ._api import (
    Loader,
    bucket_order,
    export_megatron,
    load_tokenizer,
    pack,
    tokenize_conversations,
    tokenize_prompt_and_output,
    tokenize_to_store,
)
from ._native import BUILTIN_TOKENIZERS, Tokenizer, __version__


def cuda_available() -> bool:
    """Whether this build can use a CUDA device here (driver, device), without touching torch."""
    return _native.cuda_status()[0]


def __getattr__(name):
    # The cross-entropy needs torch; importing it lazily keeps `import sft_collate` working without.
    import importlib

    if name in ("masked_cross_entropy", "linear_cross_entropy", "vocab_parallel_cross_entropy"):
        return getattr(importlib.import_module("._loss", __name__), name)
    if name == "cs336":
        return importlib.import_module(".cs336", __name__)
    raise AttributeError(f"module 'sft_collate' has no attribute {name!r}")


__all__ = [
    "BUILTIN_TOKENIZERS",
    "Loader",
    "Tokenizer",
    "__version__",
    "bucket_order",
    "cuda_available",
    "export_megatron",
    "linear_cross_entropy",
    "load_tokenizer",
    "masked_cross_entropy",
    "pack",
    "tokenize_conversations",
    "tokenize_prompt_and_output",
    "tokenize_to_store",
    "vocab_parallel_cross_entropy",
]
