//! Opening a store: every shard found, checked against the others and against its manifest, mapped;
//! rows in input order.

use std::path::{Path, PathBuf};

use super::table::{self, Columns};
use super::{store_error, ShardManifest, TokenizerInfo, FORMAT};
use crate::error::Location;
use crate::input::{BadLine, FormatInfo};
use crate::ragged::LengthLimit;
use crate::{Error, RaggedBatch, Result};

/// The shard manifests (`shard-*-of-*.json`) in `dir`, sorted.
pub(super) fn shard_manifest_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("shard-") && name.ends_with(".json") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The shard count a manifest's file name says (`shard-I-of-N.json`).
pub(super) fn count_of(path: &Path) -> Option<usize> {
    let name = path.file_stem()?.to_str()?;
    name.rsplit_once("-of-")?.1.parse().ok()
}

/// A row of the store, as stored (before any length limit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreRow<'a> {
    pub tokens: &'a [u32],
    pub prompt_len: u32,
    /// Per-token trained flags; `None` for a (prompt, output) pair.
    pub trainable: Option<Vec<bool>>,
    /// The 0-based input line.
    pub source_row: u64,
}

impl StoreRow<'_> {
    /// The row's segments (runs of equal flags; a pair's prompt and output).
    pub fn segments(&self) -> Vec<(Vec<u32>, bool)> {
        match &self.trainable {
            None => {
                let p = self.prompt_len as usize;
                vec![
                    (self.tokens[..p].to_vec(), false),
                    (self.tokens[p..].to_vec(), true),
                ]
            }
            Some(flags) => {
                let mut out: Vec<(Vec<u32>, bool)> = Vec::new();
                for (&t, &f) in self.tokens.iter().zip(flags) {
                    match out.last_mut() {
                        Some((run, flag)) if *flag == f => run.push(t),
                        _ => out.push((vec![t], f)),
                    }
                }
                out
            }
        }
    }
}

/// Where a row is: shard, record batch, row in it.
#[derive(Clone, Copy, Debug)]
struct RowRef {
    shard: u32,
    batch: u32,
    row: u32,
}

/// A token store opened for reading: the shards' Arrow files memory-mapped (the operating system pages
/// in what is read; memory does not grow with the store), rows in input order.
pub struct Store {
    dir: PathBuf,
    manifests: Vec<ShardManifest>,
    shards: Vec<Vec<Columns>>,
    order: Vec<RowRef>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("shards", &self.manifests.len())
            .field("rows", &self.order.len())
            .finish()
    }
}

impl Store {
    /// Open the store in `dir`: every shard `0..N` must be there and complete, made with the same
    /// tokenizer and text options, each file as its manifest describes, each input row in exactly one
    /// shard.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        let bad = |reason: String| store_error(&dir, reason);
        if !dir.exists() {
            return Err(bad("no such directory".into()));
        }
        if !dir.is_dir() {
            return Err(bad(
                "a file, not a store (a store is the directory `tokenize` writes)".into(),
            ));
        }
        let paths = shard_manifest_paths(&dir)?;
        if paths.is_empty() {
            return Err(bad(
                "no shard manifests (shard-*-of-*.json): not a store, or no shard has finished"
                    .into(),
            ));
        }
        let mut manifests = Vec::new();
        for path in &paths {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let m: ShardManifest = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("{}: {e}", path.display())))?;
            if m.format != FORMAT {
                return Err(bad(format!(
                    "{}: format {:?}, not {FORMAT:?}",
                    path.display(),
                    m.format
                )));
            }
            if path.file_name().and_then(|n| n.to_str())
                != Some(&format!("{}.json", m.shard.stem()))
            {
                return Err(bad(format!(
                    "{} describes shard {}",
                    path.display(),
                    m.shard
                )));
            }
            manifests.push(m);
        }
        let count = manifests[0].shard.count;
        let first = &manifests[0];
        for m in &manifests {
            if m.shard.count != count {
                return Err(bad(format!(
                    "shards of {} and of {count} in one store",
                    m.shard.count
                )));
            }
            if m.tokenizer.fingerprint != first.tokenizer.fingerprint {
                return Err(bad(format!(
                    "shard {} was tokenized with {} ({}), shard {} with {} ({})",
                    m.shard,
                    m.tokenizer.name,
                    m.tokenizer.fingerprint,
                    first.shard,
                    first.tokenizer.name,
                    first.tokenizer.fingerprint
                )));
            }
            if m.text != first.text {
                return Err(bad(format!(
                    "shards {} and {} read the text differently: {:?} vs {:?}",
                    m.shard, first.shard, m.text, first.text
                )));
            }
        }
        let present: Vec<usize> = manifests.iter().map(|m| m.shard.index).collect();
        let missing: Vec<usize> = (0..count).filter(|i| !present.contains(i)).collect();
        if !missing.is_empty() {
            return Err(bad(format!(
                "shards {missing:?} of {count} are missing or unfinished (no manifest)"
            )));
        }
        let mut shards = Vec::with_capacity(count);
        let mut located: Vec<(u64, RowRef)> = Vec::new();
        for (s, m) in manifests.iter().enumerate() {
            let path = dir.join(&m.file);
            let len = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .len();
            if len != m.bytes {
                return Err(bad(format!(
                    "{} has {len} bytes; its manifest says {}",
                    m.file, m.bytes
                )));
            }
            let batches = table::read_file(&path)?;
            let rows: usize = batches.iter().map(Columns::rows).sum();
            if rows != m.rows {
                return Err(bad(format!(
                    "{} holds {rows} rows; its manifest says {}",
                    m.file, m.rows
                )));
            }
            for (b, columns) in batches.iter().enumerate() {
                for r in 0..columns.rows() {
                    let line = columns.source_row[r];
                    if !m.shard.holds(line) {
                        return Err(bad(format!(
                            "{} holds input line {}, which is not shard {}'s",
                            m.file,
                            line + 1,
                            m.shard
                        )));
                    }
                    located.push((
                        line,
                        RowRef {
                            shard: s as u32,
                            batch: b as u32,
                            row: r as u32,
                        },
                    ));
                }
            }
            shards.push(batches);
        }
        located.sort_by_key(|&(line, _)| line);
        if let Some(w) = located.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(bad(format!("input line {} is stored twice", w[0].0 + 1)));
        }
        Ok(Store {
            dir,
            manifests,
            shards,
            order: located.into_iter().map(|(_, r)| r).collect(),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The shards' manifests, by index.
    pub fn shards(&self) -> &[ShardManifest] {
        &self.manifests
    }

    /// The tokenizer every shard was made with.
    pub fn tokenizer(&self) -> &TokenizerInfo {
        &self.manifests[0].tokenizer
    }

    /// How text became rows.
    pub fn text(&self) -> &FormatInfo {
        &self.manifests[0].text
    }

    /// Tokens in all.
    pub fn tokens(&self) -> u64 {
        self.manifests.iter().map(|m| m.tokens).sum()
    }

    /// Bytes of the Arrow files in all.
    pub fn bytes(&self) -> u64 {
        self.manifests.iter().map(|m| m.bytes).sum()
    }

    /// Lines the shards skipped as bad (each shard read every line: they agree), and the first reasons.
    pub fn skipped(&self) -> (usize, &[BadLine]) {
        let m = &self.manifests[0];
        (m.skipped_lines, &m.bad_lines)
    }

    /// Row `i` in input order.
    pub fn row(&self, i: usize) -> StoreRow<'_> {
        let at = self.order[i];
        let columns = &self.shards[at.shard as usize][at.batch as usize];
        let r = at.row as usize;
        StoreRow {
            tokens: columns.row(r),
            prompt_len: columns.prompt_len[r],
            trainable: columns.flags(r),
            source_row: columns.source_row[r],
        }
    }

    /// An error about the `k`-th of a list of documents (`Location::Row(k)`) named instead by its input
    /// line, where `row_of(k)` is the store row of document `k` (`None`: left as it is).
    pub fn name_line(&self, e: Error, row_of: impl Fn(usize) -> Option<usize>) -> Error {
        match e {
            Error::At {
                at: Location::Row(k),
                source,
            } => match row_of(k) {
                Some(row) => Error::At {
                    at: Location::Line {
                        path: self.dir().display().to_string(),
                        line: self.row(row).source_row as usize + 1,
                    },
                    source,
                },
                None => Error::At {
                    at: Location::Row(k),
                    source,
                },
            },
            other => other,
        }
    }

    /// Rows `rows` (input-order indices) as a ragged batch, each cut to `limit` by the rule text rows
    /// are ([`RaggedBatch::push_limited`]); an error names the row by its position in `rows`.
    pub fn ragged(&self, rows: &[usize], limit: &LengthLimit) -> Result<RaggedBatch> {
        limit.validate()?;
        let tokens: usize = rows.iter().map(|&i| self.row(i).tokens.len()).sum();
        let mut batch = RaggedBatch::with_capacity(rows.len(), tokens);
        for (k, &i) in rows.iter().enumerate() {
            let row = self.row(i);
            // A pair by the pair rule (straight from the mapped tokens); a conversation by the segments'
            // rule, as when it was text.
            match row.trainable {
                None => {
                    let (prompt, output) = row.tokens.split_at(row.prompt_len as usize);
                    let (prompt, output) = limit.truncate_pair(k, prompt, output)?;
                    batch.push_row(prompt, output);
                }
                Some(_) => batch.push_segments_limited(k, &row.segments(), limit)?,
            }
        }
        Ok(batch)
    }
}
