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
//! | concept | CPU (the oracle) | CUDA (`cuda`, feature `cuda`) | emulation (feature `emulation`) |
//! | --- | --- | --- | --- |
//! | a batch to collate | [`PackedBatch`] | one pinned copy → `DevicePackedBatch` | host slices |
//! | padded tensors | [`cpu::collate()`] → [`Batch`] | `CudaCollator::collate` → `DeviceBatch` | `EmulatedCollator::collate` |
//! | padding-free pack | [`cpu::collate_packed`] → [`PackedLayout`] | `CudaCollator::collate_packed` | `EmulatedCollator::collate_packed` |
//! | masked cross-entropy | [`cpu::loss::masked_cross_entropy`] (f64) | `MaskedCrossEntropy` | `EmulatedMaskedCrossEntropy` |
//! | results | host `Vec`s | `CudaSlice`s on the caller's stream, `to_host()` | host `Vec`s |
//!
//! The three backends share one API, so every test runs the same case on each and compares; the kernels
//! in `kernels/*.cu` are the same source on the GPU and (compiled as C++) in the emulator.
//!
//! ## Walkthrough
//! 1. A [`Tokenizer`]: a `tokenizer.json` path or a built-in name (`o200k_base`, `cl100k_base`). Byte-level
//!    BPE tokenizers run on the crate's fast encoder (the ids Hugging Face `tokenizers` gives, many times
//!    faster), anything else on `tokenizers`; [`Tokenizer::engine`] says which.
//! 2. A [`CollateSpec`]: pad id, `max_len` and [`Truncation`], `pad_to_multiple_of`, [`LabelFormat`],
//!    [`IdDtype`], optional attention mask.
//! 3. [`tokenize_and_pack`] (pairs) or [`tokenize_rows`] (segments: conversations) gives a
//!    [`PackedBatch`] (tokens row after row, `row_offsets`, `prompt_lens`, per-token trainable flags for
//!    multi-segment rows): the compact form a backend takes.
//! 4. [`cpu::collate()`] turns it into a [`Batch`] (row-major tensors and [`BatchStats`]);
//!    [`cpu::collate_packed`] into the padding-free [`PackedLayout`] (`position_ids`, `cu_seqlens`);
//!    [`pack::plan_packs`] and [`pack::bucket_order`] decide which rows go together.
//!    [`tokenize_prompt_and_output`] does 1–4 in one call, as CS336's function.
//! 5. [`cpu::loss`] holds the CS336 companions (entropy, log-probs, `masked_normalize`, `masked_mean`,
//!    the SFT microbatch loss and its gradient) and the masked cross-entropy oracle, in f64; [`loss`]
//!    the types the cross-entropy backends share.
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

pub mod batch;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emulation")]
pub mod emulation;
pub mod error;
pub mod input;
pub mod kernels;
pub mod loss;
pub mod pack;
pub mod packed;
pub mod pipeline;
pub mod plan;
pub mod spec;
pub mod tokenize;

pub use batch::{Batch, BatchStats, IdTensor, PackedLayout};
pub use error::{Error, Result};
pub use packed::PackedBatch;
pub use pipeline::{tokenize_and_pack, tokenize_prompt_and_output, tokenize_rows};
pub use spec::{CollateSpec, IdDtype, LabelFormat, Truncation};
pub use tokenize::{Engine, EngineChoice, Tokenizer, BUILTIN_TOKENIZERS};

/// The README's Rust examples run as doc tests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
