//! # sft-collate
//!
//! Turn (prompt, output) text pairs into the three tensors supervised fine-tuning trains on:
//!
//! ```text
//! prompt  "What is 2+2?"    → [10, 20, 30, 40]   tokenized separately,
//! output  "The answer is 4" → [50, 60, 70, 80]   no special tokens
//!
//! position        0   1   2   3   4   5   6
//! input_ids      10  20  30  40  50  60  70      padded[:, :L-1]
//! labels         20  30  40  50  60  70  80      padded[:, 1:]
//! response_mask   F   F   F   T   T   T   T      label is an output token (from prompt_len - 1)
//! ```
//!
//! The semantics are those of Stanford CS336's `tokenize_prompt_and_output`; shorter rows are right-padded
//! with `pad_id` and their padded positions are masked out.
//!
//! ## CPU ↔ GPU
//!
//! | concept | CPU (the oracle) | CUDA (feature `cuda`) | emulation (feature `emulation`) |
//! | --- | --- | --- | --- |
//! | where it runs | [`Device::cpu`] | [`Device::new`]`(`[`DeviceChoice::Cuda`]`(n))`, or the caller's stream | `Device::emulated()` |
//! | a batch to collate | [`RaggedBatch`] | one pinned copy up | host slices |
//! | padded tensors | [`Device::collate`] → [`Batch`] | device buffers, [`Placed::to_host`] | [`Batch`] |
//! | padding-free pack | [`Device::collate_pack`] → [`Pack`] | device buffers | [`Pack`] |
//! | masked cross-entropy | [`Device::cross_entropy`] (f64 oracle, rounded once) | the fused kernel | the fused kernel |
//!
//! [`Device`] is the one place a backend is chosen (`auto | cpu | cuda[:N] | emulated`), and the one
//! interface all three are used through, so every test runs the same case on each and compares. The
//! kernels in `kernels/*.cu` are the same source on the GPU and (compiled as C++) in the emulator, their
//! arguments written once in `kernels/abi.cuh` ([`backend::abi`]).
//!
//! ## Walkthrough (modules in data-flow order)
//! 1. [`input`]: JSONL lines become rows of segments: a (prompt, output) pair, or a conversation.
//! 2. [`tokenize`]: a [`Tokenizer`] (a `tokenizer.json` or a built-in: `o200k_base`, `cl100k_base`).
//!    Byte-level BPE tokenizers run on the crate's fast encoder (the ids Hugging Face `tokenizers`
//!    gives, many times faster), anything else on `tokenizers`; [`Tokenizer::engine`] says which.
//!    [`tokenize_pairs`] / [`tokenize_rows`] give a [`RaggedBatch`].
//! 3. [`ragged`]: [`RaggedBatch`], tokens row after row with `row_offsets`, `prompt_lens` and per-token
//!    trainable flags: the compact form a backend takes.
//!    [`store`]: the rows tokenized once and kept (sharded Arrow files), read back memory-mapped.
//! 4. [`schedule`]: which rows go together: length bucketing, padding-free packing plans.
//! 5. [`collate`]: [`CollateSpec`] (pad id, `max_len` and [`Truncation`], `pad_to_multiple_of`,
//!    [`LabelFormat`], [`IdDtype`]) and the results, [`Batch`] and [`Pack`].
//! 6. [`loss`]: the masked cross-entropy's types; [`backend::cpu::loss`] holds the oracle and CS336's
//!    companions (entropy, log-probs, `masked_normalize`, `masked_mean`, the SFT microbatch loss).
//! 7. [`backend`]: [`Device`], and the cpu, cuda and emulation backends.
//! 8. [`dataset`]: the streamed job from a JSONL file (or a store) to a directory of batch files and a
//!    manifest, committed atomically (what `sft-collate collate` runs); [`loader`]: a training loop's
//!    batches from a store, every epoch, every rank, resumable.
//!
//! [`tokenize_prompt_and_output`] does 2–5 in one call, as CS336's function. `docs/ARCHITECTURE.md`
//! maps every module and says where to add a backend, a kernel, a tokenizer engine or an output format.
//!
//! ```
//! use sft_collate::{tokenize_prompt_and_output, CollateSpec, LabelFormat, Tokenizer};
//! let tokenizer = Tokenizer::load("o200k_base")?;
//! let spec = CollateSpec { label_format: LabelFormat::IGNORE_INDEX, ..Default::default() };
//! let batch = tokenize_prompt_and_output(&["Hello,"], &[" world!"], &tokenizer, &spec)?;
//! let labels = batch.labels.to_i64();
//! // Only the response is trained on; every other label is -100.
//! for (label, trained) in labels.iter().zip(&batch.response_mask) {
//!     assert_eq!(*trained, *label != -100);
//! }
//! # Ok::<(), sft_collate::Error>(())
//! ```

// Modules in data-flow order (docs/ARCHITECTURE.md); each depends only on those above it (checked by
// tests/architecture.rs).
pub mod error;
pub mod io;
mod names;

// Text rows → (a ragged batch of) tokens. The ragged batch comes first: the tokenizer stage makes one.
pub mod input;

pub mod ragged;

pub mod tokenize;

// Tokenized rows kept: the token store.
pub mod store;

// Which rows go together, then the tensors and the loss.
pub mod schedule;

pub mod collate;

pub mod loss;

// Where it runs: one Device, three backends, the kernels they share.
pub mod kernels;

pub mod backend;

// What is built from all of it: CS336's one call, the dataset job, the loss of a file, the show table.
pub mod cs336;

pub mod dataset;

/// Token stores exported to other trainers' formats (Megatron-Bridge's packed Parquet).
pub mod export;
pub mod loader;

pub mod loss_file;

pub mod show;

pub use backend::{CeRowKernel, Device, DeviceChoice, DeviceKind, Placed};
pub use collate::{Batch, BatchStats, CollateSpec, IdDtype, IdTensor, LabelFormat, Pack};
pub use cs336::tokenize_prompt_and_output;
pub use error::{Error, Result};
pub use ragged::{LengthLimit, RaggedBatch, Truncation};
pub use tokenize::{
    tokenize_pairs, tokenize_rows, CacheUse, Encodings, Engine, EngineChoice, LoadCache, Tokenizer,
    BUILTIN_TOKENIZERS,
};

/// The README's Rust examples run as doc tests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
