//! The dataset job: a JSONL file in, a directory of collated batch files and a [`Manifest`] out, streamed
//! with bounded memory and committed atomically. The CLI's `collate` is this job with flags mapped to a
//! [`DatasetConfig`]; a trainer or the Python package runs it in-process the same way.
//!
//! The rows come from JSONL text ([`Rows::Text`]) or from a token store ([`Rows::Store`], tokenized
//! once by `sft-collate tokenize`): the same options give the same batch files either way.
//!
//! Three stages run at once, joined by bounded channels so that memory stays at a few chunks whatever the
//! input's size: a reader thread parses lines into rows (or takes the store's rows in order), the
//! calling thread tokenizes them (on all cores) and collates them on the [`Device`], and a writer thread
//! writes each file into a staging directory.
//! The staging directory becomes the output directory in one step once everything succeeded (see
//! [`commit`]): a failed or killed run leaves the output as it was.
//!
//! ```no_run
//! use sft_collate::dataset::{write_dataset, DatasetConfig, Layout, Quiet, Rows};
//! use sft_collate::{Device, DeviceChoice, Tokenizer};
//! let tokenizer = Tokenizer::load("o200k_base")?;
//! let device = Device::new(DeviceChoice::Auto)?;
//! let config = DatasetConfig {
//!     layout: Layout::Padded { batch_size: 64 },
//!     ..DatasetConfig::new("examples/sample.jsonl", "out/")
//! };
//! let manifest = write_dataset(&config, Rows::Text(&tokenizer), &device, &Quiet)?;
//! println!("{} rows in {} files", manifest.rows, manifest.files.len());
//! # Ok::<(), sft_collate::Error>(())
//! ```

pub mod commit;
pub mod manifest;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use crate::backend::Device;
use crate::collate::{Batch, BatchStats, CollatePlan, CollateSpec, Pack};
use crate::error::Location;
use crate::input::{read_rows, ReadReport, RowChunk, RowFormat, Source};
use crate::io::write_atomically;
pub use crate::io::{Progress, Quiet};
use crate::schedule::{bucket_order, plan_packs, PackSpec};
use crate::store::Store;
use crate::{tokenize_rows, Error, RaggedBatch, Result, Tokenizer};

pub use manifest::{BadLine, FileEntry, LayoutInfo, Manifest, MANIFEST_FILE};

/// How many raw chunks the reader may run ahead, and how many collated chunks may wait for the writer.
const READ_AHEAD: usize = 4;
const WRITE_AHEAD: usize = 2;
/// Rows allocated ahead for a chunk, whatever the batch size asks (a huge batch size is not a huge
/// allocation before there are rows to fill it).
/// A batch whose padding is above this fraction, and large, is reported.
const PADDING_WARNING: f64 = 0.9;
const PADDING_WARNING_BYTES: u64 = 64 << 20;

/// How rows become files.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout {
    /// Consecutive batches of `batch_size` rows, padded.
    Padded { batch_size: usize },
    /// Padded batches of similar-length rows: within windows of `window` rows shuffled by `seed` and
    /// sorted by length ([`crate::schedule::bucket_order`]).
    Bucketed {
        batch_size: usize,
        window: usize,
        seed: u64,
    },
    /// Padding-free packs of whole documents, one per file, planned within windows of `window` rows.
    Packed { pack: PackSpec, window: usize },
}

/// Everything the job needs besides the tokenizer and the device.
#[derive(Clone, Debug)]
pub struct DatasetConfig {
    /// The input: JSONL, a JSON array, Parquet or Arrow, maybe compressed ([`crate::input::Source`]);
    /// `-` reads standard input.
    pub input: PathBuf,
    /// The dataset directory.
    pub output: PathBuf,
    pub rows: RowFormat,
    /// `pad_id: None` takes the tokenizer's.
    pub spec: CollateSpec,
    pub layout: Layout,
    /// Skip (and count) malformed lines instead of failing.
    pub skip_bad_lines: bool,
    /// Replace a dataset already in `output`.
    pub overwrite: bool,
    /// Succeed with an empty dataset when the input has no rows (else an error).
    pub allow_empty: bool,
    /// Wait for another run's lock on `output` instead of failing at once.
    pub wait_for_lock: bool,
    /// Accept a pad id outside the tokenizer's vocabulary.
    pub allow_pad_id_outside_vocab: bool,
    /// The most memory one batch's tensors may take.
    pub max_batch_bytes: u64,
}

impl DatasetConfig {
    /// Defaults for `input` → `output`: pairs under `prompt` / `output`, batches of 64, CS336's spec.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        DatasetConfig {
            input: input.into(),
            output: output.into(),
            rows: RowFormat::default(),
            spec: CollateSpec::default(),
            layout: Layout::Padded { batch_size: 64 },
            skip_bad_lines: false,
            overwrite: false,
            allow_empty: false,
            wait_for_lock: false,
            allow_pad_id_outside_vocab: false,
            max_batch_bytes: default_max_batch_bytes(),
        }
    }
}

/// Half the machine's memory, at most 16 GB (8 GB when it cannot be read).
pub fn default_max_batch_bytes() -> u64 {
    let total = crate::io::memory_total();
    total.map_or(8 << 30, |t| (t / 2).min(16 << 30))
}

/// Where the job's rows come from.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    /// The JSONL file `config.input`, read with `config.rows`, tokenized by this tokenizer.
    Text(&'a Tokenizer),
    /// A token store's rows, in input order (`config.input` and `config.rows` are not read: the store
    /// was made from text with its own; its manifest says which).
    Store(&'a Store),
}

impl Rows<'_> {
    /// The pad id of the tokenizer: `explicit`, else the tokenizer's own.
    fn resolve_pad_id(&self, explicit: Option<u32>) -> Result<u32> {
        match self {
            Rows::Text(tokenizer) => tokenizer.resolve_pad_id(explicit),
            Rows::Store(store) => explicit
                .or(store.tokenizer().pad_id)
                .ok_or(Error::NoPadToken),
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Rows::Text(tokenizer) => tokenizer.vocab_size(),
            Rows::Store(store) => store.tokenizer().vocab_size,
        }
    }
}

/// A chunk of rows on their way to the collating stage.
struct SourceChunk {
    rows: ChunkRows,
    /// Each row's input line (from 1).
    lines: Vec<usize>,
    bytes_read: u64,
}

enum ChunkRows {
    /// Text rows, to tokenize.
    Text(Vec<Vec<crate::input::Segment>>),
    /// Rows of the store, in input order.
    Store(std::ops::Range<usize>),
}

/// Run the job: read, tokenize (text rows), collate on `device`, write, commit. Returns the manifest
/// written.
pub fn write_dataset(
    config: &DatasetConfig,
    rows: Rows<'_>,
    device: &Device,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let spec = resolve_spec(config, &rows)?;
    let (mut output, removed) =
        commit::OutputDir::open(&config.output, config.overwrite, config.wait_for_lock)?;
    for path in removed {
        progress.note(&format!(
            "removed {}, left by a run that did not finish",
            path.display()
        ));
    }
    let (input_name, input_size, source) = match rows {
        Rows::Store(store) => (store.dir().display().to_string(), Some(store.bytes()), None),
        Rows::Text(_) => {
            let source = Source::open(&config.input, &config.rows)?;
            (source.name.clone(), source.size, Some(source))
        }
    };
    progress.input_size(input_size);
    let staging = output.staging()?;
    let chunk_rows = match config.layout {
        Layout::Padded { batch_size } => batch_size,
        Layout::Bucketed {
            batch_size, window, ..
        } => window.div_ceil(batch_size).saturating_mul(batch_size),
        Layout::Packed { window, .. } => window,
    };
    let (raw_tx, raw_rx) = sync_channel::<Result<SourceChunk>>(READ_AHEAD);
    let (work_tx, work_rx) = sync_channel::<Vec<Work>>(WRITE_AHEAD);
    let stages = Stages {
        config,
        spec: &spec,
        rows,
        device,
        input_name: &input_name,
        progress,
    };
    let (read_report, written, collated) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| match (source, rows) {
            (Some(source), _) => stages.read(source, chunk_rows, raw_tx),
            (None, Rows::Store(store)) => stages.read_store(store, chunk_rows, raw_tx),
            (None, Rows::Text(_)) => unreachable!("text rows come with a reader"),
        });
        let writer = scope.spawn(|| stages.write(work_rx, staging.path()));
        let collated = stages.collate(raw_rx, work_tx);
        (
            reader.join().expect("the reader thread does not panic"),
            writer.join().expect("the writer thread does not panic"),
            collated,
        )
    });
    collated?;
    let files = written?;
    let manifest = stages.manifest(&files, read_report);
    if manifest.rows == 0 && !config.allow_empty {
        return Err(Error::Empty(match manifest.skipped_lines {
            0 => format!("{input_name}: 0 rows (the input is empty; allow_empty to accept that)"),
            n => format!(
                "{input_name}: 0 rows: all {n} lines were bad (first: line {}: {}); nothing was written",
                manifest.bad_lines[0].line, manifest.bad_lines[0].reason
            ),
        }));
    }
    write_atomically(&staging.path().join(MANIFEST_FILE), &manifest.to_json())?;
    output.commit(staging)?;
    Ok(manifest)
}

/// The spec with the pad id resolved and checked, and the options checked against what they imply.
fn resolve_spec(config: &DatasetConfig, rows: &Rows<'_>) -> Result<CollateSpec> {
    let spec = CollateSpec {
        pad_id: Some(rows.resolve_pad_id(config.spec.pad_id)?),
        ..config.spec.clone()
    };
    spec.validate()?;
    let pad_id = spec.pad_id.expect("resolved above");
    let vocab = rows.vocab_size();
    if !config.allow_pad_id_outside_vocab && pad_id as usize >= vocab {
        return Err(Error::InvalidOption {
            name: "pad_id",
            reason: format!(
                "{pad_id} is outside the tokenizer's vocabulary of {vocab} (allow_pad_id_outside_vocab to use it anyway)"
            ),
        });
    }
    let (batch_size, window) = match config.layout {
        Layout::Padded { batch_size } | Layout::Bucketed { batch_size, .. } => (batch_size, 1),
        Layout::Packed { pack, window } => {
            if spec.attention_mask {
                return Err(Error::InvalidOption {
                    name: "attention_mask",
                    reason:
                        "packs have no attention mask: cu_seqlens and position_ids say where each \
                             document is"
                            .into(),
                });
            }
            (1, window.max(pack.max_tokens))
        }
    };
    for (name, value) in [("batch_size", batch_size), ("window", window)] {
        if value == 0 {
            return Err(Error::InvalidOption {
                name,
                reason: "must be at least 1".into(),
            });
        }
    }
    // The smallest batch the options allow: one row as wide as pad_to_multiple_of.
    if let Some(m) = spec.pad_to_multiple_of {
        check_batch_size(config, &spec, "every batch", 1, m)?;
    }
    Ok(spec)
}

/// Bytes per position of the tensors a batch collates to.
fn bytes_per_position(spec: &CollateSpec, packed: bool) -> u64 {
    let ids = spec.id_dtype.size() as u64;
    match packed {
        false => 2 * ids + 1 + u64::from(spec.attention_mask),
        true => 3 * ids + 1,
    }
}

fn check_batch_size(
    config: &DatasetConfig,
    spec: &CollateSpec,
    what: &str,
    rows: usize,
    width: usize,
) -> Result<()> {
    let packed = matches!(config.layout, Layout::Packed { .. });
    let bytes = (rows as u64)
        .saturating_mul(width as u64)
        .saturating_mul(bytes_per_position(spec, packed));
    if bytes > config.max_batch_bytes {
        return Err(Error::BatchTooLarge {
            what: what.to_string(),
            rows,
            width,
            bytes,
            limit: config.max_batch_bytes,
        });
    }
    Ok(())
}

/// What the writer receives: one file's tensors and the input rows they hold.
struct Work {
    collated: Collated,
    /// Input rows (from 0) in the file, when they are not consecutive rows in input order.
    rows: Option<Vec<usize>>,
    bytes_read: u64,
}

enum Collated {
    Padded(Batch),
    Packed(Pack),
}

impl Collated {
    fn stats(&self) -> &BatchStats {
        match self {
            Collated::Padded(b) => &b.stats,
            Collated::Packed(p) => &p.stats,
        }
    }
}

/// The three stages and what they share.
struct Stages<'a> {
    config: &'a DatasetConfig,
    spec: &'a CollateSpec,
    rows: Rows<'a>,
    device: &'a Device,
    input_name: &'a str,
    progress: &'a dyn Progress,
}

impl Stages<'_> {
    /// Parse lines into chunks of `chunk_rows` rows. Stops at the first bad line unless skipping; an
    /// error is sent down the channel so the collating stage stops too.
    fn read(
        &self,
        input: Source,
        chunk_rows: usize,
        tx: SyncSender<Result<SourceChunk>>,
    ) -> ReadReport {
        let sink = |chunk: RowChunk| {
            let chunk = SourceChunk {
                rows: ChunkRows::Text(chunk.rows),
                lines: chunk.lines,
                bytes_read: chunk.bytes_read,
            };
            tx.send(Ok(chunk)).is_ok()
        };
        match read_rows(
            input,
            &self.config.rows,
            self.config.skip_bad_lines,
            chunk_rows,
            sink,
        ) {
            Ok(report) => report,
            Err(e) => {
                let _ = tx.send(Err(e));
                ReadReport::default()
            }
        }
    }

    /// The store's rows in input order, in chunks of `chunk_rows` (progress in the store's bytes, pro
    /// rata).
    fn read_store(
        &self,
        store: &Store,
        chunk_rows: usize,
        tx: SyncSender<Result<SourceChunk>>,
    ) -> ReadReport {
        let chunk_rows = chunk_rows.max(1);
        let (rows, bytes) = (store.len(), store.bytes());
        let mut start = 0;
        while start < rows {
            let end = (start + chunk_rows).min(rows);
            let chunk = SourceChunk {
                rows: ChunkRows::Store(start..end),
                lines: (start..end)
                    .map(|i| store.row(i).source_row as usize + 1)
                    .collect(),
                bytes_read: (bytes as f64 * end as f64 / rows as f64) as u64,
            };
            if tx.send(Ok(chunk)).is_err() {
                break;
            }
            start = end;
        }
        let (skipped, recorded) = store.skipped();
        ReadReport {
            skipped,
            recorded: recorded.to_vec(),
        }
    }

    /// Tokenize and collate each chunk, handing its files to the writer together (so that the next
    /// chunk's tokenization overlaps their writing).
    fn collate(&self, rx: Receiver<Result<SourceChunk>>, tx: SyncSender<Vec<Work>>) -> Result<()> {
        let mut row_base = 0usize;
        for (chunk_index, raw) in rx.into_iter().enumerate() {
            let raw = raw?;
            // Errors about a row of the chunk name its input line.
            let at_line = |e: Error| match e {
                Error::At {
                    at: Location::Row(r),
                    source,
                } if r < raw.lines.len() => Error::At {
                    at: Location::Line {
                        path: self.input_name.to_string(),
                        line: raw.lines[r],
                    },
                    source,
                },
                other => other,
            };
            let ragged = match (&raw.rows, self.rows) {
                (ChunkRows::Text(rows), Rows::Text(tokenizer)) => {
                    tokenize_rows(rows, tokenizer, self.spec.limit())
                }
                (ChunkRows::Store(range), Rows::Store(store)) => {
                    store.ragged(&range.clone().collect::<Vec<_>>(), &self.spec.limit())
                }
                _ => unreachable!("chunks come from the job's own source"),
            }
            .map_err(at_line)?;
            let lines = |rows: &[usize]| -> String {
                let (first, last) = (
                    rows.iter().map(|&r| raw.lines[r]).min().unwrap_or(0),
                    rows.iter().map(|&r| raw.lines[r]).max().unwrap_or(0),
                );
                format!("the batch of lines {first}-{last}")
            };
            let mut work = Vec::new();
            let global = |rows: &[usize]| rows.iter().map(|&r| row_base + r).collect();
            match self.config.layout {
                Layout::Padded { .. } => {
                    let all: Vec<usize> = (0..ragged.rows()).collect();
                    work.push(Work {
                        collated: Collated::Padded(self.padded(&ragged, &lines(&all))?),
                        rows: None,
                        bytes_read: raw.bytes_read,
                    });
                }
                Layout::Bucketed {
                    batch_size,
                    window,
                    seed,
                } => {
                    let lens: Vec<usize> = (0..ragged.rows()).map(|i| ragged.row_len(i)).collect();
                    // A different order in every window, reproducible from the seed.
                    let order =
                        bucket_order(&lens, window.max(1), seed.wrapping_add(chunk_index as u64));
                    for rows in order.chunks(batch_size) {
                        let batch = self.padded(&ragged.select(rows), &lines(rows))?;
                        work.push(Work {
                            collated: Collated::Padded(batch),
                            rows: Some(global(rows)),
                            bytes_read: raw.bytes_read,
                        });
                    }
                }
                Layout::Packed { pack, .. } => {
                    let (documents, source) =
                        documents(ragged, &pack, self.spec).map_err(at_line)?;
                    let lens: Vec<usize> = (0..documents.rows())
                        .map(|d| documents.row_len(d))
                        .collect();
                    for docs in plan_packs(&lens, &pack)? {
                        let sources: Vec<usize> = docs.iter().map(|&d| source[d]).collect();
                        let pack_batch = documents.select(&docs);
                        let total = CollatePlan::pack_total(pack_batch.tokens().len(), self.spec)?;
                        check_batch_size(self.config, self.spec, &lines(&sources), 1, total)?;
                        let collated = self
                            .device
                            .collate_pack(&pack_batch, self.spec)?
                            .to_host()?;
                        work.push(Work {
                            collated: Collated::Packed(collated),
                            rows: Some(global(&sources)),
                            bytes_read: raw.bytes_read,
                        });
                    }
                }
            }
            row_base += raw.lines.len();
            if tx.send(work).is_err() {
                return Ok(()); // The writer failed; its error is reported from there.
            }
        }
        Ok(())
    }

    /// One padded batch, checked against the memory limit first.
    fn padded(&self, batch: &RaggedBatch, what: &str) -> Result<Batch> {
        let width = self.spec.width_for(batch.max_row_len());
        check_batch_size(self.config, self.spec, what, batch.rows(), width)?;
        let collated = self.device.collate(batch, self.spec)?.to_host()?;
        let stats = &collated.stats;
        let bytes = (stats.rows * stats.width) as u64 * bytes_per_position(self.spec, false);
        if stats.padding_fraction > PADDING_WARNING && bytes > PADDING_WARNING_BYTES {
            self.progress.note(&format!(
                "{what}: {:.0}% padding in {} MB (its longest row has {} tokens); length bucketing or \
                 max_len would shrink it",
                100.0 * stats.padding_fraction,
                bytes / 1_000_000,
                batch.max_row_len()
            ));
        }
        Ok(collated)
    }

    fn write(&self, rx: Receiver<Vec<Work>>, dir: &Path) -> Result<Vec<FileEntry>> {
        let mut files = Vec::new();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut rows = 0usize;
        for (index, work) in rx.into_iter().flatten().enumerate() {
            let name = format!("batch-{index:05}.safetensors");
            let bytes = match &work.collated {
                Collated::Padded(batch) => batch.to_safetensors(Some(metadata.clone()))?,
                Collated::Packed(pack) => pack.to_safetensors(Some(metadata.clone()))?,
            };
            // Written in place: the staging directory is this run's own and becomes the output only
            // whole (a file cut short by a crash is never seen), so no temporary name and rename.
            let path = dir.join(&name);
            std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
            commit::crash_point(&format!("staged-{}", index + 1));
            let stats = work.collated.stats();
            rows += stats.rows;
            files.push(FileEntry::new(name, stats, work.rows));
            self.progress.advance(work.bytes_read, rows);
        }
        Ok(files)
    }

    fn manifest(&self, files: &[FileEntry], read: ReadReport) -> Manifest {
        let config = self.config;
        let (rows, tokens, response_tokens, padding_fraction, empty_response_rows) =
            Manifest::totals(files);
        let layout = match config.layout {
            Layout::Padded { batch_size } => LayoutInfo::Padded {
                batch_size,
                bucket_window: None,
                seed: None,
            },
            Layout::Bucketed {
                batch_size,
                window,
                seed,
            } => LayoutInfo::Padded {
                batch_size,
                bucket_window: Some(window),
                seed: Some(seed),
            },
            Layout::Packed { pack, window } => LayoutInfo::Packed {
                max_tokens: pack.max_tokens,
                strategy: pack.strategy,
                overflow: pack.overflow,
                window,
                slack_fraction: if files.is_empty() {
                    0.0
                } else {
                    1.0 - tokens as f64 / (files.len() * pack.max_tokens) as f64
                },
            },
        };
        let ids = self.spec.id_dtype.to_string();
        let mut tensors: std::collections::BTreeMap<String, String> = [
            ("input_ids", ids.as_str()),
            ("labels", &ids),
            ("response_mask", "bool"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        match config.layout {
            Layout::Packed { .. } => {
                tensors.insert("position_ids".into(), ids.clone());
                tensors.insert("cu_seqlens".into(), "i32".into());
                tensors.insert("max_seqlen".into(), "i64".into());
            }
            _ if self.spec.attention_mask => {
                tensors.insert("attention_mask".into(), "bool".into());
            }
            _ => {}
        }
        Manifest {
            format: manifest::FORMAT.to_string(),
            input: self.input_name.to_string(),
            rows,
            batches: files.len(),
            tokens,
            response_tokens,
            padding_fraction,
            empty_response_rows,
            skipped_lines: read.skipped,
            bad_lines: read.recorded,
            tokenizer: match self.rows {
                Rows::Text(t) => t.name().to_string(),
                Rows::Store(s) => s.tokenizer().name.clone(),
            },
            tokenizer_engine: match self.rows {
                Rows::Text(t) => t.engine().to_string(),
                Rows::Store(s) => format!("{} (token store)", s.tokenizer().engine),
            },
            tokenizer_cache: match self.rows {
                Rows::Text(t) => t.cache_stats().map(Into::into),
                Rows::Store(_) => None,
            },
            device: self.device.kind().to_string(),
            layout,
            options: manifest::Options {
                format: match self.rows {
                    Rows::Text(_) => config.rows.info(),
                    Rows::Store(store) => store.text().clone(),
                },
                spec: self.spec.clone(),
            },
            tensors,
            files: files.to_vec(),
        }
    }
}

/// The documents of a chunk for packing: each row after `max_len` (already applied by the tokenizer
/// stage) and the pack's overflow policy, with the input row each came from. When every row fits, the
/// rows are the documents as they are.
fn documents(
    ragged: RaggedBatch,
    pack: &PackSpec,
    spec: &CollateSpec,
) -> Result<(RaggedBatch, Vec<usize>)> {
    if ragged.max_row_len() <= pack.max_tokens {
        let source = (0..ragged.rows()).collect();
        return Ok((ragged, source));
    }
    let mut documents = RaggedBatch::new();
    let mut source = Vec::new();
    for i in 0..ragged.rows() {
        for segments in pack.fit_row(&ragged, i, spec.truncation)? {
            let refs: Vec<(&[u32], bool)> =
                segments.iter().map(|(t, f)| (t.as_slice(), *f)).collect();
            documents.push_segments(&refs);
            source.push(i);
        }
    }
    Ok((documents, source))
}
