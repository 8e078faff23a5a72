//! The one error type of the crate. Every fallible public function returns [`Result`], and callers can
//! match on the variant instead of parsing a message.

use std::path::PathBuf;

/// Everything that can go wrong, as data a caller can match on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `prompts` and `outputs` (or any two inputs that must pair up) have different lengths.
    #[error("{what}: {left} vs {right} (they must have the same length)")]
    LengthMismatch {
        what: &'static str,
        left: usize,
        right: usize,
    },

    /// A sequence is longer than `max_len` under [`crate::Truncation::Error`].
    #[error("row {row}: {len} tokens (prompt {prompt_len} + output {output_len}) exceed max_len {max_len}")]
    SequenceTooLong {
        row: usize,
        len: usize,
        prompt_len: usize,
        output_len: usize,
        max_len: usize,
    },

    /// A token id (or the pad id, or the ignore index) does not fit the chosen id dtype.
    #[error("id {id} does not fit the id dtype {dtype}")]
    IdOverflow { id: i64, dtype: crate::IdDtype },

    /// No pad id was given, the tokenizer configures none and its vocabulary has no `<|endoftext|>`.
    #[error("no pad token: pass pad_id explicitly (the tokenizer configures none and has no <|endoftext|>)")]
    NoPadToken,

    /// An option has a value that makes no sense (`pad_to_multiple_of = 0`, `max_len = 0`, ...).
    #[error("invalid option {name}: {reason}")]
    InvalidOption { name: &'static str, reason: String },

    /// A [`crate::PackedBatch`] whose offsets, lengths or sizes are inconsistent.
    #[error("invalid packed batch: {0}")]
    InvalidPackedBatch(String),

    /// Tensor shapes that do not agree (loss functions and companions).
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A label outside `[0, vocab)` on a row that is read.
    #[error("label {label} at row {row} is outside [0, {vocab})")]
    LabelOutOfRange {
        row: usize,
        label: i64,
        vocab: usize,
    },

    /// An unknown built-in tokenizer name, or a tokenizer file that cannot be loaded.
    #[error("tokenizer {name}: {reason}")]
    Tokenizer { name: String, reason: String },

    /// A bad line of JSONL input (malformed JSON, missing key, non-string field, template placeholder
    /// without a value). `line` counts from 1.
    #[error("{path}:{line}: {reason}")]
    BadInput {
        path: String,
        line: usize,
        reason: String,
    },

    /// A template file that cannot be parsed.
    #[error("template: {0}")]
    Template(String),

    /// An I/O error, with the path it concerns.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The cross-entropy kernel found a label outside `[0, vocab)` on a masked row (reported through its
    /// device-side flag; the row was not read).
    #[error("a masked row has a label outside [0, vocab): the kernel skipped it")]
    DeviceLabelOutOfRange,

    /// No usable CUDA device: no driver library, no device, or the driver refused to initialize.
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// A CUDA driver call failed, or the device returned something impossible.
    #[error("CUDA: {0}")]
    Cuda(String),

    /// A kernel failed to compile with NVRTC at run time; `log` is the compiler's.
    #[error("kernel {kernel} failed to compile: {log}")]
    KernelCompile { kernel: String, log: String },

    /// Serializing a batch to safetensors failed.
    #[error("safetensors: {0}")]
    Safetensors(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Attach a path to an I/O error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
