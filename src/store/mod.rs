//! The token store: text rows tokenized once and kept, so that training reads tokens, not text, for as
//! many epochs, layouts and machines as it likes.
//!
//! A store is a directory of shards. Shard `I` of `N` holds the rows whose 0-based input line `l` has
//! `l % N == I`, so `N` processes (on `N` machines: a Slurm array, Ray or Spark tasks, anything that
//! runs a command) together write every row exactly once. Each shard is two files:
//!
//! - `shard-IIIII-of-NNNNN.arrow`: an Arrow IPC file (memory-mapped when read; readable by pyarrow,
//!   Hugging Face `datasets`, Polars, DuckDB) with one row per text row: `input_ids` (list of uint32:
//!   the prompt then the output, or every segment of a conversation, untruncated), `prompt_len`
//!   (uint32: the leading untrained run), `trainable` (list of bool, one per token; null for a
//!   (prompt, output) pair, whose `prompt_len` says it all) and `source_row` (uint64: the 0-based
//!   input line).
//! - `shard-IIIII-of-NNNNN.json`: its [`ShardManifest`] (written last, so a shard without one is
//!   incomplete): the tokenizer (name, fingerprint, pad id, engine), the text options, and counts.
//!
//! Rows are stored as tokenized, before any `max_len`: the length limit and every layout are applied when
//! the store is read ([`Store::ragged`]), by the same rule as when text is tokenized
//! ([`crate::RaggedBatch::push_limited`]), so `collate --from STORE` writes the same batches as
//! `collate --input` with the same options.

mod read;
mod table;

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

pub use read::{Store, StoreRow};

use crate::input::{read_rows, BadLine, FormatInfo, ReadReport, RowChunk, RowFormat, Source};
use crate::io::{write_atomically, Progress};
use crate::ragged::LengthLimit;
use crate::{tokenize_rows, Error, Result, Tokenizer};

/// The `format` of a shard manifest.
pub const FORMAT: &str = "sft-collate-store/1";

/// Rows read and tokenized together; each chunk becomes one Arrow record batch (or more, for rows of
/// over 2^31 tokens in all).
const CHUNK_ROWS: usize = 4096;

/// Which part of the input a process tokenizes: shard `index` of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole input in one shard.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count` (`index < count`).
    pub fn new(index: usize, count: usize) -> Result<Shard> {
        if count == 0 {
            return Err(Error::InvalidOption {
                name: "shard",
                reason: format!("{index}/0: the count must be at least 1"),
            });
        }
        if index >= count {
            return Err(Error::InvalidOption {
                name: "shard",
                reason: format!(
                    "{index}/{count}: the index must be below the count (0/{count} to {}/{count})",
                    count - 1
                ),
            });
        }
        Ok(Shard { index, count })
    }

    /// Whether the row on 0-based input line `line` is this shard's.
    pub fn holds(&self, line: u64) -> bool {
        line % self.count as u64 == self.index as u64
    }

    /// The shard's file name without extension: `shard-00002-of-00008`.
    pub fn stem(&self) -> String {
        format!("shard-{:05}-of-{:05}", self.index, self.count)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;
    /// `I/N`.
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || Error::InvalidOption {
            name: "shard",
            reason: format!("{s:?} is not I/N (shard I of N, from 0)"),
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (i, n) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        Shard::new(i, n)
    }
}

/// The tokenizer a store was made with, as its manifests record it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerInfo {
    pub name: String,
    /// What identifies its ids ([`Tokenizer::fingerprint`]): shards with different ones do not mix.
    pub fingerprint: String,
    pub engine: String,
    pub vocab_size: usize,
    /// The pad id the tokenizer itself configures (`None`: it has none; give one when collating).
    pub pad_id: Option<u32>,
}

impl TokenizerInfo {
    pub fn of(tokenizer: &Tokenizer) -> Result<Self> {
        Ok(TokenizerInfo {
            name: tokenizer.name().to_string(),
            fingerprint: tokenizer.fingerprint()?,
            engine: tokenizer.engine().to_string(),
            vocab_size: tokenizer.vocab_size(),
            pad_id: tokenizer.resolve_pad_id(None).ok(),
        })
    }
}

/// One shard's description, `shard-IIIII-of-NNNNN.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardManifest {
    /// [`FORMAT`].
    pub format: String,
    pub shard: Shard,
    /// The input it was read from, as given.
    pub input: String,
    /// The Arrow file's name, and its size in bytes.
    pub file: String,
    pub bytes: u64,
    pub rows: usize,
    pub tokens: u64,
    /// Tokens that are labels of trained positions in some layout: the output (and trained segments).
    pub trained_tokens: u64,
    pub max_row_len: usize,
    /// Lines skipped as bad (all shards skip the same lines: each reads the whole input).
    pub skipped_lines: usize,
    pub bad_lines: Vec<BadLine>,
    pub tokenizer: TokenizerInfo,
    /// How text became rows.
    pub text: FormatInfo,
}

impl ShardManifest {
    /// Bytes of the Arrow file per token: what the store costs.
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes as f64 / self.tokens.max(1) as f64
    }
}

/// What `sft-collate tokenize` runs.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The input: JSONL, a JSON array, Parquet or Arrow, maybe compressed ([`crate::input::Source`]);
    /// `-` reads standard input.
    pub input: PathBuf,
    /// The store directory (made when missing).
    pub output: PathBuf,
    pub rows: RowFormat,
    pub shard: Shard,
    /// Skip (and count) malformed lines instead of failing.
    pub skip_bad_lines: bool,
    /// Replace this shard when the store already has it.
    pub overwrite: bool,
}

impl StoreConfig {
    /// `input` → `output` in one shard, pairs under `prompt` / `output`.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        StoreConfig {
            input: input.into(),
            output: output.into(),
            rows: RowFormat::default(),
            shard: Shard::WHOLE,
            skip_bad_lines: false,
            overwrite: false,
        }
    }
}

fn store_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Store {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Tokenize this process's shard of the input into the store: read every line (the shard's rows are
/// chosen by line), tokenize the shard's rows on all cores, write them as Arrow record batches, then the
/// shard's manifest. Nothing is visible in the store until the shard is complete: the Arrow file is
/// written under a temporary name and renamed, the manifest written after it.
pub fn write_store(
    config: &StoreConfig,
    tokenizer: &Tokenizer,
    progress: &dyn Progress,
) -> Result<ShardManifest> {
    let shard = Shard::new(config.shard.index, config.shard.count)?;
    let dir = &config.output;
    // The directory stays when this shard fails, even empty: other shards' processes may be about to
    // write into it (removing it under them would fail them too). Without a manifest it is no store.
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let stem = shard.stem();
    let manifest_path = dir.join(format!("{stem}.json"));
    if manifest_path.exists() && !config.overwrite {
        return Err(store_error(
            dir,
            format!("it already holds shard {shard} (overwrite to replace it)"),
        ));
    }
    for other in read::shard_manifest_paths(dir)? {
        let other_count = read::count_of(&other);
        if other_count.is_some_and(|n| n != shard.count) {
            return Err(store_error(
                dir,
                format!(
                    "it holds shards of {} ({}); this one is of {}",
                    other_count.unwrap_or(0),
                    other.display(),
                    shard.count
                ),
            ));
        }
    }
    let source = Source::open(&config.input, &config.rows)?;
    let input_name = source.name.clone();
    progress.input_size(source.size);
    let info = TokenizerInfo::of(tokenizer)?;
    let text = config.rows.info();
    let file_name = format!("{stem}.arrow");
    let final_path = dir.join(&file_name);
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let mut writer = table::Writer::create(&tmp, &shard, &info, &text)?;
    let (tx, rx) = sync_channel::<Result<RowChunk>>(2);
    let (report, written) = std::thread::scope(|scope| {
        // The sender moves into the reader, so the channel closes when it is done.
        let reading = scope.spawn(move || -> ReadReport {
            let sink = |chunk: RowChunk| tx.send(Ok(chunk)).is_ok();
            let read = read_rows(
                source,
                &config.rows,
                config.skip_bad_lines,
                CHUNK_ROWS,
                sink,
            );
            match read {
                Ok(report) => report,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    ReadReport::default()
                }
            }
        });
        let written = (|| -> Result<()> {
            let mut rows_written = 0usize;
            for chunk in rx.iter() {
                let chunk = chunk?;
                let mine: Vec<usize> = (0..chunk.rows.len())
                    .filter(|&r| shard.holds(chunk.lines[r] as u64 - 1))
                    .collect();
                let rows: Vec<&Vec<crate::input::Segment>> =
                    mine.iter().map(|&r| &chunk.rows[r]).collect();
                let ragged = tokenize_rows(&rows, tokenizer, LengthLimit::default())?;
                let pairs: Vec<bool> = rows
                    .iter()
                    .map(|segments| matches!(segments.as_slice(), [(_, false), (_, true)]))
                    .collect();
                let source: Vec<u64> = mine.iter().map(|&r| chunk.lines[r] as u64 - 1).collect();
                writer.write(&ragged, &pairs, &source)?;
                rows_written += ragged.rows();
                progress.advance(chunk.bytes_read, rows_written);
            }
            Ok(())
        })();
        drop(rx);
        (
            reading.join().expect("the reader thread does not panic"),
            written,
        )
    });
    let finished = written.and_then(|()| writer.finish());
    let counts = match finished {
        Ok(counts) => counts,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &final_path).map_err(|e| Error::io(&final_path, e))?;
    let manifest = ShardManifest {
        format: FORMAT.to_string(),
        shard,
        input: input_name,
        bytes: std::fs::metadata(&final_path)
            .map_err(|e| Error::io(&final_path, e))?
            .len(),
        file: file_name,
        rows: counts.rows,
        tokens: counts.tokens,
        trained_tokens: counts.trained_tokens,
        max_row_len: counts.max_row_len,
        skipped_lines: report.skipped,
        bad_lines: report.recorded,
        tokenizer: info,
        text,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    write_atomically(&manifest_path, &json)?;
    Ok(manifest)
}
