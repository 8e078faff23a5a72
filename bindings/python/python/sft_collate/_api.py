"""The Python API: arguments mapped to the native module, tensors allocated with torch (or numpy) and
handed over by address. Every behaviour lives in the Rust library; this layer checks devices, dtypes
and shapes, allocates outputs, and turns results into tensors."""

from __future__ import annotations

import json
import numbers
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native

try:  # torch is optional: without it, results are numpy arrays
    import torch
except ImportError:  # pragma: no cover - exercised where torch is absent
    torch = None  # type: ignore[assignment]

_ID_DTYPES = {"int32": "i32", "int64": "i64"}


def _require_torch(what: str) -> None:
    if torch is None:
        raise ImportError(f"{what} needs PyTorch (pip install torch)")


# ---- arguments


def _texts(name: str, texts: Any) -> List[str]:
    """A list of the strings of any sequence of them. A single string is refused: iterating it would make
    each of its characters a row."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name}: expected a list of strings, got one {type(texts).__name__} (wrap it: [text])")
    return list(texts)


def _conversations(conversations: Any) -> List[List[Any]]:
    """A list of conversations, each a list of messages; a string or a single dict where a list belongs is
    refused before it is taken apart."""
    if isinstance(conversations, (str, bytes, dict)):
        raise TypeError(
            f"conversations: expected a list of conversations (each a list of messages), "
            f"got one {type(conversations).__name__}"
        )
    out = []
    for i, conversation in enumerate(conversations):
        if isinstance(conversation, (str, bytes, dict)):
            raise TypeError(
                f"conversation {i}: expected a list of messages ({{'role', 'content'}} dicts), "
                f"got one {type(conversation).__name__}"
            )
        out.append(list(conversation))
    return out


def _int(name: str, value: Any, low: int, high: Optional[int] = None) -> Optional[int]:
    """``value`` as an int in ``[low, high)`` (``None`` passes): what the native call cannot even take
    (a negative count, a float) named in the error rather than an overflow. What the values mean (``0`` is
    no length) the library checks."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r}: expected an int")
    value = int(value)
    if value < low or (high is not None and value >= high):
        bound = f"at least {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name}={value}: must be {bound}")
    return value


# ---- tokenizers


def load_tokenizer(tokenizer: Any, engine: str = "auto") -> Tuple[_native.Tokenizer, Optional[int]]:
    """A native tokenizer and the pad id the given one configures (``None``: the tokenizer's own
    default). Takes what users already have: a :class:`sft_collate.Tokenizer`, a path to a
    ``tokenizer.json`` (or a directory holding one), a built-in name (``o200k_base``, ``cl100k_base``),
    a ``tokenizers.Tokenizer``, or a ``transformers`` fast tokenizer (its ``backend_tokenizer``, and its
    ``pad_token_id``)."""
    if isinstance(tokenizer, _native.Tokenizer):
        return tokenizer, None
    if isinstance(tokenizer, (str, os.PathLike)):
        return _native.Tokenizer(os.fspath(tokenizer), engine), None
    pad_id = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # transformers' PreTrainedTokenizerFast
        pad_id = getattr(tokenizer, "pad_token_id", None)
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        tokenizer = backend
    else:
        name = "tokenizers.Tokenizer"
    to_str = getattr(tokenizer, "to_str", None)
    if to_str is None:
        raise TypeError(
            "tokenizer: expected a path, a built-in name, sft_collate.Tokenizer, tokenizers.Tokenizer "
            f"or a transformers fast tokenizer, not {type(tokenizer).__name__}"
        )
    return _native.Tokenizer.from_json(to_str(), str(name), engine), pad_id


# ---- devices and tensors


def _device(device: Any) -> Tuple[str, int]:
    """("cpu", 0) or ("cuda", index) for None, a string or a torch.device."""
    if device is None:
        return "cpu", 0
    text = str(device)
    if text == "cpu":
        return "cpu", 0
    if text == "cuda" or text.startswith("cuda:"):
        _require_torch("a CUDA device")
        index = torch.device(text).index
        if index is None:
            index = torch.cuda.current_device()
        return "cuda", index
    raise ValueError(f"device {device!r}: cpu, cuda or cuda:N")


def _stream(kind: str, index: int) -> int:
    """Torch's current stream on the device: the kernels run there, after the work already queued."""
    if kind != "cuda":
        return 0
    return int(torch.cuda.current_stream(index).cuda_stream)


def _empty(shape: Sequence[int], dtype: str, kind: str, index: int) -> Any:
    if torch is None:
        return np.empty(tuple(shape), dtype=np.dtype(dtype))
    device = torch.device("cuda", index) if kind == "cuda" else torch.device("cpu")
    return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=device)


def _ptr(tensor: Any) -> int:
    if tensor is None:
        return 0
    if torch is not None and isinstance(tensor, torch.Tensor):
        return int(tensor.data_ptr()) if tensor.numel() else 0
    return int(tensor.ctypes.data) if tensor.size else 0


def _id_dtype(dtype: Any) -> str:
    if dtype is None:
        return "int64"
    name = str(dtype).replace("torch.", "")
    if name not in _ID_DTYPES:
        raise ValueError(f"dtype {dtype!r}: torch.int32 or torch.int64")
    return name


def _labels(labels: str, ignore_index: int) -> Optional[int]:
    if labels == "pad":
        return None
    if labels == "ignore_index":
        return int(ignore_index)
    raise ValueError(f"labels={labels!r}: 'pad' (CS336) or 'ignore_index'")


# ---- collation


def _collate(
    ragged: _native.Ragged,
    pad_id: int,
    device: Any,
    pad_to_multiple_of: Optional[int],
    labels: str,
    ignore_index: int,
    dtype: Any,
    attention_mask: bool,
) -> Dict[str, Any]:
    kind, index = _device(device)
    id_dtype = _id_dtype(dtype)
    ignore = _labels(labels, ignore_index)
    code = _ID_DTYPES[id_dtype]
    pad_to_multiple_of = _int("pad_to_multiple_of", pad_to_multiple_of, 0)
    rows, width = ragged.padded_shape(pad_id, pad_to_multiple_of, ignore, code, attention_mask)
    out = {
        "input_ids": _empty((rows, width), id_dtype, kind, index),
        "labels": _empty((rows, width), id_dtype, kind, index),
        "response_mask": _empty((rows, width), "bool", kind, index),
    }
    if attention_mask:
        out["attention_mask"] = _empty((rows, width), "bool", kind, index)
    ragged.collate(
        kind,
        index,
        _stream(kind, index),
        pad_id,
        pad_to_multiple_of,
        ignore,
        code,
        attention_mask,
        _ptr(out["input_ids"]),
        _ptr(out["labels"]),
        _ptr(out["response_mask"]),
        _ptr(out.get("attention_mask")),
    )
    return out


def _pad_id(tokenizer: _native.Tokenizer, configured: Optional[int], explicit: Optional[int]) -> int:
    explicit = _int("pad_id", explicit, 0, 2**32)
    for candidate in (explicit, configured, tokenizer.pad_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("no pad token: pass pad_id (the tokenizer configures none and has no <|endoftext|>)")


def tokenize_prompt_and_output(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    tokenizer: Any,
    *,
    device: Any = None,
    max_len: Optional[int] = None,
    truncation: str = "error",
    pad_to_multiple_of: Optional[int] = None,
    labels: str = "pad",
    ignore_index: int = -100,
    dtype: Any = None,
    pad_id: Optional[int] = None,
    attention_mask: bool = False,
    engine: str = "auto",
) -> Dict[str, Any]:
    """CS336's ``tokenize_prompt_and_output``: prompts and outputs tokenized separately (no special
    tokens), concatenated, right-padded with the pad id, shifted by one. Returns ``input_ids``,
    ``labels`` (``(B, L-1)``, int64 unless ``dtype`` says int32) and ``response_mask`` (bool: the label is
    an output token), and ``attention_mask`` on request. ``labels="ignore_index"`` writes
    ``ignore_index`` wherever the mask is false. On a CUDA ``device`` the collation kernel runs on
    torch's current stream and writes straight into the returned tensors; nothing waits."""
    prompts, outputs = _texts("prompt_strs", prompt_strs), _texts("output_strs", output_strs)
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    native, configured = load_tokenizer(tokenizer, engine)
    ragged = _native.tokenize_pairs(native, prompts, outputs, _int("max_len", max_len, 0), truncation)
    return _collate(
        ragged,
        _pad_id(native, configured, pad_id),
        device,
        pad_to_multiple_of,
        labels,
        ignore_index,
        dtype,
        attention_mask,
    )


def _role_names(role_names: Optional[Dict[str, str]]) -> List[Tuple[str, str]]:
    """``{"human": "user", ...}`` as the native calls take it, checked."""
    if role_names is None:
        return []
    if not isinstance(role_names, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in role_names.items()
    ):
        raise TypeError(f"role_names must be a dict of str to str, e.g. {{'human': 'user'}}, not {role_names!r}")
    return list(role_names.items())


def _conversation_ragged(
    conversations: Sequence[Sequence[Dict[str, str]]],
    native: _native.Tokenizer,
    message_template: Optional[str],
    train_roles: Sequence[str],
    max_len: Optional[int],
    truncation: str,
    role_key: str,
    content_key: str,
    role_names: Optional[Dict[str, str]],
) -> _native.Ragged:
    rows = _native.conversation_segments(
        [json.dumps(c) for c in _conversations(conversations)],
        message_template,
        _texts("train_roles", train_roles),
        role_key,
        content_key,
        _role_names(role_names),
    )
    return _native.tokenize_rows(native, rows, _int("max_len", max_len, 0), truncation)


def tokenize_conversations(
    conversations: Sequence[Sequence[Dict[str, str]]],
    tokenizer: Any,
    *,
    message_template: Optional[str] = None,
    train_roles: Sequence[str] = ("assistant",),
    role_key: str = "role",
    content_key: str = "content",
    role_names: Optional[Dict[str, str]] = None,
    device: Any = None,
    max_len: Optional[int] = None,
    truncation: str = "error",
    pad_to_multiple_of: Optional[int] = None,
    labels: str = "pad",
    ignore_index: int = -100,
    dtype: Any = None,
    pad_id: Optional[int] = None,
    attention_mask: bool = False,
    engine: str = "auto",
) -> Dict[str, Any]:
    """Conversations (lists of ``{"role", "content"}``) rendered message by message by
    ``message_template`` (``{role}``, ``{content}``; what precedes ``{content}`` is never trained), each
    piece tokenized separately; the messages of ``train_roles`` are trained. The same tensors as
    :func:`tokenize_prompt_and_output`. Messages spelled otherwise are read by naming their keys and
    renaming their roles: ShareGPT's ``{"from": "human", "value": ...}`` is ``role_key="from",
    content_key="value", role_names={"human": "user", "gpt": "assistant"}``."""
    native, configured = load_tokenizer(tokenizer, engine)
    ragged = _conversation_ragged(
        conversations, native, message_template, train_roles, max_len, truncation, role_key, content_key, role_names
    )
    return _collate(
        ragged,
        _pad_id(native, configured, pad_id),
        device,
        pad_to_multiple_of,
        labels,
        ignore_index,
        dtype,
        attention_mask,
    )


def pack(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    tokenizer: Any,
    max_tokens: int,
    *,
    strategy: str = "exact-fill",
    overflow: str = "error",
    device: Any = None,
    max_len: Optional[int] = None,
    truncation: str = "error",
    pad_to_multiple_of: Optional[int] = None,
    labels: str = "pad",
    ignore_index: int = -100,
    dtype: Any = None,
    pad_id: Optional[int] = None,
    engine: str = "auto",
) -> List[Dict[str, Any]]:
    """Padding-free packing: whole (prompt, output) documents into packs of at most ``max_tokens``
    tokens, each pack ``[1, T]`` tensors ``input_ids``, ``labels``, ``response_mask``, ``position_ids``
    (restarting per document) and what flash-attention's varlen API takes: ``cu_seqlens`` (int32) and
    ``max_seqlen``; plus ``rows``, the input rows in the pack. The shift is done per document, so no token
    is trained to predict the next document."""
    prompts, outputs = _texts("prompt_strs", prompt_strs), _texts("output_strs", output_strs)
    max_tokens = _int("max_tokens", max_tokens, 0)
    native, configured = load_tokenizer(tokenizer, engine)
    ragged = _native.tokenize_pairs(native, prompts, outputs, _int("max_len", max_len, 0), truncation)
    documents, source = _native.pack_documents(ragged, max_tokens, overflow, truncation)
    plan = _native.pack_plan(documents.row_lens(), max_tokens, strategy)
    kind, index = _device(device)
    id_dtype = _id_dtype(dtype)
    code = _ID_DTYPES[id_dtype]
    ignore = _labels(labels, ignore_index)
    resolved_pad = _pad_id(native, configured, pad_id)
    pad_to_multiple_of = _int("pad_to_multiple_of", pad_to_multiple_of, 0)
    packs = []
    for docs in plan:
        out = _collate_pack(documents.select(docs), resolved_pad, kind, index, pad_to_multiple_of, ignore, id_dtype)
        out["rows"] = [source[d] for d in docs]
        packs.append(out)
    return packs


def _collate_pack(
    one: _native.Ragged,
    pad_id: int,
    kind: str,
    index: int,
    pad_to_multiple_of: Optional[int],
    ignore: Optional[int],
    id_dtype: str,
) -> Dict[str, Any]:
    """The documents of ``one`` as one pack, ``[1, T]`` tensors on the device (in place, torch's stream)."""
    total, entries = one.pack_shape(pad_to_multiple_of)
    out = {
        "input_ids": _empty((1, total), id_dtype, kind, index),
        "labels": _empty((1, total), id_dtype, kind, index),
        "response_mask": _empty((1, total), "bool", kind, index),
        "position_ids": _empty((1, total), id_dtype, kind, index),
        "cu_seqlens": _empty((entries,), "int32", kind, index),
    }
    max_seqlen, _, _ = one.collate_pack(
        kind,
        index,
        _stream(kind, index),
        pad_id,
        pad_to_multiple_of,
        ignore,
        _ID_DTYPES[id_dtype],
        _ptr(out["input_ids"]),
        _ptr(out["labels"]),
        _ptr(out["response_mask"]),
        _ptr(out["position_ids"]),
        _ptr(out["cu_seqlens"]),
    )
    out["max_seqlen"] = max_seqlen
    return out


class Loader:
    """A training loop's batches from a token store (``sft-collate tokenize`` or :func:`tokenize_to_store`),
    epoch after epoch: iterate it for one epoch's steps (from where it is), each a dict of tensors on
    ``device`` — ``input_ids``, ``labels``, ``response_mask`` (and for packs ``position_ids``,
    ``cu_seqlens``, ``max_seqlen``) — with ``rows`` (the store rows), ``epoch`` and ``step``.

    Exactly one of ``batch_rows`` (padded steps of that many rows), ``batch_tokens`` (padded steps of at
    most that many positions, rows of similar length together) or ``pack_tokens`` (padding-free packs by
    ``strategy``) says how rows become steps. ``rank`` / ``world_size`` deal the steps to data-parallel
    ranks: every rank the same number of steps, every row once per epoch across them (a rank may get an
    empty last step). ``state_dict()`` / ``load_state_dict()`` resume exactly. Rows are gathered on a
    background thread ``prefetch`` steps ahead; on a CUDA ``device`` each step is collated by the kernel on
    torch's current stream."""

    def __init__(
        self,
        store: Union[str, "os.PathLike[str]"],
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
        device: Any = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        pad_id: Optional[int] = None,
    ) -> None:
        self._native = _native.Loader(
            os.fspath(store),
            _int("batch_rows", batch_rows, 0),
            _int("batch_tokens", batch_tokens, 0),
            _int("pack_tokens", pack_tokens, 0),
            _int("window", window, 0),
            strategy,
            overflow,
            _int("max_len", max_len, 0),
            truncation,
            _int("pad_to_multiple_of", pad_to_multiple_of, 0),
            shuffle,
            _int("seed", seed, 0, 2**64),
            _int("rank", rank, 0),
            _int("world_size", world_size, 0),
            _int("prefetch", prefetch, 0),
            _int("pad_id", pad_id, 0, 2**32),
        )
        self._packed = pack_tokens is not None
        self._device = device
        self._kind, self._index = _device(device)
        self._dtype = dtype
        self._id_dtype = _id_dtype(dtype)
        self._labels, self._ignore_index = labels, ignore_index
        self._ignore = _labels(labels, ignore_index)
        self._pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return self._native.steps_per_epoch()

    def state_dict(self) -> Dict[str, int]:
        epoch, step = self._native.state()
        return {"epoch": epoch, "step": step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._native.set_state(int(state["epoch"]), int(state["step"]))

    def next_step(self) -> Dict[str, Any]:
        """The next step (crossing into the next epoch when this one is done)."""
        epoch, step, rows, ragged = self._native.next_rows()
        pad = self._native.pad_id
        if self._packed:
            out = _collate_pack(ragged, pad, self._kind, self._index, self._pad_to_multiple_of, self._ignore, self._id_dtype)
        else:
            out = _collate(
                ragged, pad, self._device, self._pad_to_multiple_of, self._labels, self._ignore_index, self._dtype, False
            )
        out.update(rows=rows, epoch=epoch, step=step)
        return out

    def __iter__(self):
        """The rest of the current epoch."""
        epoch = self._native.state()[0]
        while self._native.state()[0] == epoch:
            yield self.next_step()


def tokenize_to_store(
    input: Union[str, "os.PathLike[str]"],
    store: Union[str, "os.PathLike[str]"],
    tokenizer: Any,
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
) -> Dict[str, Any]:
    """Tokenize a JSONL file, a JSON array, or a Parquet or Arrow table (a Hugging Face dataset's
    ``.parquet`` or ``.arrow`` file; the text formats also gzip- or zstd-compressed) once into a token
    store (what ``sft-collate tokenize`` does): shard ``(i, n)`` takes the rows on input lines (table
    rows, array elements) ``l`` (from 0) with ``l % n == i``, so ``n`` processes write the whole
    store. The store's shards are Arrow IPC files (``pyarrow.ipc.open_file``, Polars
    ``read_ipc``) with columns ``input_ids``, ``prompt_len``, ``trainable`` and ``source_row``;
    ``template`` is the prompt template's text; conversations are read as by
    :func:`tokenize_conversations` (``role_key``, ``content_key``, ``role_names``). Returns the shard's
    manifest."""
    native, _ = load_tokenizer(tokenizer, engine)
    index, count = shard
    text = _native.write_store(
        native,
        os.fspath(input),
        os.fspath(store),
        _int("shard[0]", index, 0),
        _int("shard[1]", count, 0),
        prompt_key,
        output_key,
        template,
        messages_key,
        message_template,
        list(train_roles),
        role_key,
        content_key,
        _role_names(role_names),
        bool(skip_bad_lines),
        bool(overwrite),
    )
    return json.loads(text)


def export_megatron(
    store: Union[str, "os.PathLike[str]"],
    output: Union[str, "os.PathLike[str]"],
    pack_size: int,
    *,
    truncation: str = "error",
    window: int = 4096,
    packs_per_file: int = 100_000,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Export a token store as Megatron-Bridge packed-sequence Parquet (what ``sft-collate export`` does):
    ``output/part-NNNNN.idx.parquet`` with ``input_ids``, ``seq_start_id`` and ``loss_mask`` (already
    shifted onto the labels, as Megatron-Bridge stores it), and ``pack_metadata.json``. A pack's documents
    take ``sum(len - 1) <= pack_size`` positions; a longer document is an error unless ``truncation`` cuts
    it. Point ``GPTSFTPackedParquetDataset`` (or ``packed_train_data_path``) at ``output``. Returns the
    summary (packs, documents, positions, trained labels, Megatron-Bridge's packing metadata)."""
    text = _native.export_megatron(
        os.fspath(store),
        os.fspath(output),
        _int("pack_size", pack_size, 0),
        truncation,
        _int("window", window, 0),
        _int("packs_per_file", packs_per_file, 0),
        bool(overwrite),
    )
    return json.loads(text)


def bucket_order(lengths: Sequence[int], window: int, seed: int = 0) -> List[int]:
    """Length bucketing: a seeded shuffle of the row indices, then each window of ``window`` rows sorted
    by length, so consecutive batches hold rows of similar length."""
    return _native.bucket_order(
        [_int("lengths[]", n, 0) for n in lengths], _int("window", window, 0), _int("seed", seed, 0, 2**64)
    )


Tensor = Any
Normalization = Union[str, Tuple[str, float, int, int]]
