from os import PathLike
from typing import Callable, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._native import BUILTIN_TOKENIZERS as BUILTIN_TOKENIZERS
from ._native import Tokenizer as Tokenizer
from ._native import __version__ as __version__

try:
    import torch

    Tensor = Union[torch.Tensor, np.ndarray]
except ImportError:
    Tensor = np.ndarray

TokenizerLike = Union[Tokenizer, str, PathLike, Any]
Device = Union[None, str, Any]

def cuda_available() -> bool: ...

class Loader:
    def __init__(
        self,
        store: Union[str, PathLike],
        *,
        batch_rows: Optional[int] = None,
        batch_tokens: Optional[int] = None,
        pack_tokens: Optional[int] = None,
        window: int = 4096,
        strategy: str = "exact-fill",
        overflow: str = "error",
        max_len: Optional[int] = None,
        truncation: str = "error",
        pad_to_multiple_of: Optional[int] = None,
        labels: str = "pad",
        ignore_index: int = -100,
        dtype: Any = None,
        device: Device = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        pad_id: Optional[int] = None,
    ) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Any: ...
    def next_step(self) -> Dict[str, Any]: ...
    def state_dict(self) -> Dict[str, int]: ...
    def load_state_dict(self, state: Dict[str, int]) -> None: ...
def tokenize_to_store(
    input: Union[str, PathLike],
    store: Union[str, PathLike],
    tokenizer: TokenizerLike,
    *,
    shard: Tuple[int, int] = (0, 1),
    prompt_key: str = "prompt",
    output_key: str = "output",
    template: Optional[str] = None,
    messages_key: str = "messages",
    message_template: Optional[str] = None,
    train_roles: Sequence[str] = ("assistant",),
    role_key: str = "role",
    content_key: str = "content",
    role_names: Optional[Dict[str, str]] = None,
    skip_bad_lines: bool = False,
    overwrite: bool = False,
    engine: str = "auto",
) -> Dict[str, Any]: ...
def export_megatron(
    store: Union[str, PathLike],
    output: Union[str, PathLike],
    pack_size: int,
    *,
    truncation: str = "error",
    window: int = 4096,
    packs_per_file: int = 100_000,
    overwrite: bool = False,
) -> Dict[str, Any]: ...
def load_tokenizer(tokenizer: TokenizerLike, engine: str = "auto") -> Tuple[Tokenizer, Optional[int]]: ...
def tokenize_prompt_and_output(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    tokenizer: TokenizerLike,
    *,
    device: Device = None,
    max_len: Optional[int] = None,
    truncation: str = "error",
    pad_to_multiple_of: Optional[int] = None,
    labels: str = "pad",
    ignore_index: int = -100,
    dtype: Any = None,
    pad_id: Optional[int] = None,
    attention_mask: bool = False,
    engine: str = "auto",
) -> Dict[str, Tensor]: ...
def tokenize_conversations(
    conversations: Sequence[Sequence[Dict[str, str]]],
    tokenizer: TokenizerLike,
    *,
    message_template: Optional[str] = None,
    train_roles: Sequence[str] = ("assistant",),
    role_key: str = "role",
    content_key: str = "content",
    role_names: Optional[Dict[str, str]] = None,
    device: Device = None,
    max_len: Optional[int] = None,
    truncation: str = "error",
    pad_to_multiple_of: Optional[int] = None,
    labels: str = "pad",
    ignore_index: int = -100,
    dtype: Any = None,
    pad_id: Optional[int] = None,
    attention_mask: bool = False,
    engine: str = "auto",
) -> Dict[str, Tensor]: ...
def pack(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    tokenizer: TokenizerLike,
    max_tokens: int,
    *,
    strategy: str = "exact-fill",
    overflow: str = "error",
    device: Device = None,
    max_len: Optional[int] = None,
    truncation: str = "error",
    pad_to_multiple_of: Optional[int] = None,
    labels: str = "pad",
    ignore_index: int = -100,
    dtype: Any = None,
    pad_id: Optional[int] = None,
    engine: str = "auto",
) -> List[Dict[str, Any]]: ...
def bucket_order(lengths: Sequence[int], window: int, seed: int = 0) -> List[int]: ...
def masked_cross_entropy(
    logits: Any,
    labels: Any,
    response_mask: Any = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalization: Optional[Tuple[float, int, int]] = None,
    weights: Any = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    return_log_probs: bool = False,
    return_entropy: bool = False,
    return_accuracy: bool = False,
) -> Any: ...
def linear_cross_entropy(
    hidden: Any,
    weight: Any,
    labels: Any,
    response_mask: Any = None,
    *,
    bias: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalization: Optional[Tuple[float, int, int]] = None,
    weights: Any = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    chunk_rows: Optional[int] = None,
    return_log_probs: bool = False,
) -> Any: ...
def vocab_parallel_cross_entropy(
    logits: Any,
    labels: Any,
    response_mask: Any = None,
    *,
    vocab_start: int,
    vocab_size: int,
    all_gather: Callable[[bytes], bytes],
    rank: int,
    world_size: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
) -> Any: ...
