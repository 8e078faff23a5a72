//! `manifest.json`: what a dataset directory holds, written last and read by one type.
//!
//! Schema (`format: "sft-collate/2"`): totals (`rows`, `batches`, `tokens`, `response_tokens`,
//! `padding_fraction`, `empty_response_rows`), the input (`input`, `skipped_lines`, the first
//! [`MAX_RECORDED_BAD_LINES`] `bad_lines`), the tokenizer (`tokenizer`, `tokenizer_engine`,
//! `tokenizer_cache`), `device`, the `layout` (`kind: "padded"` with `batch_size` and, when bucketed,
//! `bucket_window` and `seed`; or `kind: "packed"` with `max_tokens`, `strategy`, `overflow`, `window` and
//! `slack_fraction`), the `options` that shaped the rows and tensors, the `tensors` every file holds
//! (name → dtype), and `files`, one entry per file in order.

use std::collections::BTreeMap;
use std::path::Path;

use crate::collate::{BatchStats, CollateSpec};
use crate::input::FormatInfo;
use crate::schedule::{Overflow, PackStrategy};
use crate::tokenize::CacheStats;
use crate::{Error, Result};

/// The format this version writes and reads.
pub const FORMAT: &str = "sft-collate/2";
/// Bad lines recorded with their reasons (all are counted).
pub use crate::input::{BadLine, MAX_RECORDED_BAD_LINES};
/// The manifest's file name inside a dataset directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A dataset directory's manifest.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The input file (`-` for standard input).
    pub input: String,
    pub rows: usize,
    pub batches: usize,
    /// Real tokens (prompt + output, after truncation).
    pub tokens: usize,
    pub response_tokens: usize,
    /// Padding over all files, as a fraction of all positions.
    pub padding_fraction: f64,
    pub empty_response_rows: usize,
    pub skipped_lines: usize,
    pub bad_lines: Vec<BadLine>,
    pub tokenizer: String,
    pub tokenizer_engine: String,
    pub tokenizer_cache: Option<CacheReport>,
    pub device: String,
    pub layout: LayoutInfo,
    pub options: Options,
    /// Tensor name → dtype, for every file.
    pub tensors: BTreeMap<String, String>,
    pub files: Vec<FileEntry>,
}

/// The fast encoder's cache counters over the run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheReport {
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
}

impl From<CacheStats> for CacheReport {
    fn from(c: CacheStats) -> Self {
        CacheReport {
            hits: c.hits,
            misses: c.misses,
            hit_rate: c.hit_rate(),
        }
    }
}

/// How rows became files.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayoutInfo {
    Padded {
        batch_size: usize,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        bucket_window: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        seed: Option<u64>,
    },
    Packed {
        max_tokens: usize,
        strategy: PackStrategy,
        overflow: Overflow,
        window: usize,
        /// The share of the packs' token budget left empty.
        slack_fraction: f64,
    },
}

/// The options that shaped the rows and the tensors.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Options {
    #[serde(flatten)]
    pub format: FormatInfo,
    pub spec: CollateSpec,
}

/// One file of the dataset.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub rows: usize,
    pub width: usize,
    pub tokens: usize,
    pub response_tokens: usize,
    pub padding_fraction: f64,
    pub empty_response_rows: usize,
    /// The input rows (counting from 0) in this file, when they are not consecutive rows in input order
    /// (bucketing, packing).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub input_rows: Option<Vec<usize>>,
}

impl FileEntry {
    pub(crate) fn new(name: String, stats: &BatchStats, input_rows: Option<Vec<usize>>) -> Self {
        FileEntry {
            name,
            rows: stats.rows,
            width: stats.width,
            tokens: stats.tokens,
            response_tokens: stats.response_tokens,
            padding_fraction: stats.padding_fraction,
            empty_response_rows: stats.empty_response_rows.len(),
            input_rows,
        }
    }
}

impl Manifest {
    /// Totals over `files`.
    pub(crate) fn totals(files: &[FileEntry]) -> (usize, usize, usize, f64, usize) {
        let sum = |f: fn(&FileEntry) -> usize| files.iter().map(f).sum::<usize>();
        let slots: usize = files.iter().map(|f| f.rows * f.width).sum();
        let pad_slots: f64 = files
            .iter()
            .map(|f| f.padding_fraction * (f.rows * f.width) as f64)
            .sum();
        (
            sum(|f| f.rows),
            sum(|f| f.tokens),
            sum(|f| f.response_tokens),
            if slots == 0 {
                0.0
            } else {
                pad_slots / slots as f64
            },
            sum(|f| f.empty_response_rows),
        )
    }

    /// The manifest of the dataset in `dir`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::io(&path, std::io::Error::other(format!("not a manifest: {e}"))))?;
        let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if format != FORMAT {
            return Err(Error::io(
                &path,
                std::io::Error::other(format!(
                    "manifest format {format:?}; this version reads {FORMAT:?}"
                )),
            ));
        }
        serde_json::from_value(value)
            .map_err(|e| Error::io(&path, std::io::Error::other(format!("bad manifest: {e}"))))
    }

    /// Its JSON, as written to `manifest.json`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        bytes.push(b'\n');
        bytes
    }
}
