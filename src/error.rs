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

    /// A sequence is longer than a limit: `max_len` under [`crate::Truncation::Error`], or a pack's
    /// `max_tokens` under [`crate::schedule::Overflow::Error`]. `limit` names the option (`max_len`,
    /// `pack`). Which row it is comes from [`Error::At`] around it.
    #[error("{len} tokens (prompt {prompt_len} + output {output_len}) exceed {limit} {max_len}")]
    SequenceTooLong {
        len: usize,
        prompt_len: usize,
        output_len: usize,
        max_len: usize,
        limit: &'static str,
    },

    /// An error about one row or line of the input.
    #[error("{at}: {source}")]
    At {
        at: Location,
        #[source]
        source: Box<Error>,
    },

    /// A batch would be larger in memory than allowed (`max_batch_bytes`): `rows × width` positions at
    /// `bytes_per_position` bytes (ids, labels and masks).
    #[error(
        "{what} would be {rows} rows x {width} positions = {} MB, over the {} MB allowed (max_batch_bytes); \
         lower batch_size or pad_to_multiple_of, or set max_len",
        bytes / 1_000_000,
        limit / 1_000_000
    )]
    BatchTooLarge {
        what: String,
        rows: usize,
        width: usize,
        bytes: u64,
        limit: u64,
    },

    /// A run produced no rows (every line bad, or an empty input) and an empty result was not allowed.
    #[error("{0}")]
    Empty(String),

    /// Another run holds the output directory's lock.
    #[error("{}: another sft-collate run is writing it{} (wait for it, or pass wait_for_lock)", path.display(), owner.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    OutputBusy { path: PathBuf, owner: Option<u32> },

    /// A token id (or the pad id, or the ignore index) does not fit the chosen id dtype.
    #[error("id {id} does not fit the id dtype {dtype}")]
    IdOverflow { id: i64, dtype: &'static str },

    /// No pad id was given, the tokenizer configures none and its vocabulary has no `<|endoftext|>`.
    #[error("no pad token: pass pad_id explicitly (the tokenizer configures none and has no <|endoftext|>)")]
    NoPadToken,

    /// An option has a value that makes no sense (`pad_to_multiple_of = 0`, `max_len = 0`, ...).
    #[error("invalid option {name}: {reason}")]
    InvalidOption { name: &'static str, reason: String },

    /// A [`crate::RaggedBatch`] whose offsets, lengths or sizes are inconsistent.
    #[error("invalid packed batch: {0}")]
    InvalidBatch(String),

    /// Tensor shapes that do not agree (loss functions and companions).
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// An exchange between ranks failed (a rank left, ranks disagreed on what they exchange) or another
    /// rank's input was refused ([`crate::loss::parallel`]).
    #[error("collective: {0}")]
    Collective(String),

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

    /// A bad line of JSONL input, or a bad row of a table (malformed JSON, missing key, non-string field,
    /// template placeholder without a value). `line` counts from 1 (a table's row number from 1).
    #[error("{path}:{line}: {reason}")]
    BadInput {
        path: String,
        line: usize,
        reason: String,
    },

    /// An input file that cannot be read as rows: a Parquet or Arrow file that is damaged, cannot be
    /// read as it is given (a pipe), or has none of the columns the row format reads.
    #[error("{path}: {reason}")]
    Input { path: String, reason: String },

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

    /// An operation this device's backend does not have (yet); the message says where it runs.
    #[error("{0}")]
    Unsupported(String),

    /// A CUDA driver call failed, or the device returned something impossible.
    #[error("CUDA: {0}")]
    Cuda(String),

    /// A kernel failed to compile with NVRTC at run time; `log` is the compiler's.
    #[error("kernel {kernel} failed to compile: {log}")]
    KernelCompile { kernel: String, log: String },

    /// Serializing a batch to safetensors failed.
    #[error("safetensors: {0}")]
    Safetensors(String),

    /// A token store that cannot be written or read as it is (shards missing or disagreeing, a file
    /// that is not one of ours).
    #[error("token store {path}: {reason}")]
    Store { path: String, reason: String },
}

/// Where in the input an error is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// Row `n` of a batch given in memory, counting from 0.
    Row(usize),
    /// Line `line` (from 1) of a file.
    Line { path: String, line: usize },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Row(n) => write!(f, "row {n}"),
            Location::Line { path, line } => write!(f, "{path}:{line}"),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// This error, said to be about `at`.
    pub fn at(self, at: Location) -> Self {
        Error::At {
            at,
            source: Box::new(self),
        }
    }

    /// The error inside any [`Error::At`] wrappers.
    pub fn innermost(&self) -> &Error {
        match self {
            Error::At { source, .. } => source.innermost(),
            other => other,
        }
    }

    /// Attach a path to an I/O error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
