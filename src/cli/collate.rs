//! `sft-collate collate`: stream a JSONL file into safetensors batches.
//!
//! Three stages run at once, joined by bounded channels so that memory stays at a few batches whatever the
//! file's size: a reader thread parses lines into raw batches, the calling thread tokenizes (on all cores)
//! and collates them, and a writer thread writes each batch. Everything is written into a staging
//! directory inside the output directory and moved into place only when the whole input has succeeded, so a
//! failed run leaves the output directory as it found it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sft_collate::batch::write_atomically;
use sft_collate::input::{RowFormat, Segment};
use sft_collate::pack::{bucket_order, plan_packs, Overflow, PackSpec, PackStrategy};
use sft_collate::{
    tokenize_rows, Batch, CollateSpec, Error, PackedBatch, PackedLayout, Result, Tokenizer,
};

use super::backend::{Backend, Device};
use super::{RowArgs, SpecArgs, TokenizerArgs};

/// How many raw chunks the reader may run ahead, and how many collated chunks (a batch, or a bucketing or
/// packing window's files) may wait for the writer.
const READ_AHEAD: usize = 4;
const WRITE_AHEAD: usize = 2;
/// Bad lines recorded in the manifest with their reasons (all are counted).
const MAX_RECORDED_BAD_LINES: usize = 100;

#[derive(Args, Debug)]
pub struct CollateArgs {
    /// JSONL input, one object per line ("-" reads standard input).
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Output directory for batch-NNNNN.safetensors and manifest.json.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    #[command(flatten)]
    tokenizer: TokenizerArgs,
    /// Rows per batch (the last batch may be smaller).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    #[command(flatten)]
    rows: RowArgs,
    #[command(flatten)]
    spec: SpecArgs,
    /// Where to collate.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Padding-free packing: documents packed into rows of at most MAX_TOKENS tokens, with position_ids
    /// and cu_seqlens (one pack per file, shape [1, T]).
    #[arg(long, value_name = "MAX_TOKENS", conflicts_with = "bucket")]
    pack: Option<usize>,
    /// How documents are assigned to packs.
    #[arg(long, value_enum, default_value = "exact-fill", requires = "pack")]
    pack_strategy: PackStrategyArg,
    /// A document longer than --pack: error, truncate (by --truncate, prompt-left by default) or split.
    #[arg(long, value_enum, default_value = "error", requires = "pack")]
    pack_overflow: PackOverflowArg,
    /// Length bucketing: rows are shuffled (seeded) and sorted by length within windows of WINDOW rows,
    /// then cut into batches, so a batch holds rows of similar length.
    #[arg(long, value_name = "WINDOW")]
    bucket: Option<usize>,
    /// Rows read and tokenized together when packing (the packing strategy works within it).
    #[arg(long, default_value_t = 4096, value_name = "ROWS")]
    window: usize,
    /// Seed of the bucketing shuffle (same seed, same batches; change it per epoch).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip malformed lines, missing keys and non-string fields (counted in the manifest) instead of
    /// failing.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Replace batches and a manifest already in the output directory.
    #[arg(long)]
    overwrite: bool,
    /// No progress bar or summary on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackStrategyArg {
    BestFitDecreasing,
    FirstFitDecreasing,
    Greedy,
    ExactFill,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackOverflowArg {
    Error,
    Truncate,
    Split,
}

/// How rows become files.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Consecutive batches of `batch_size` rows, padded.
    Padded,
    /// Padded batches of similar-length rows, by `bucket_order` within windows.
    Bucketed { window: usize, seed: u64 },
    /// Padding-free packs.
    Packed(PackSpec),
}

/// What the writer receives: one file's tensors, the input rows they hold, and the progress position.
enum Collated {
    Padded(Batch),
    Packed(PackedLayout),
}

struct Work {
    collated: Collated,
    /// Input rows (counting from 0) in the file, when the file does not hold consecutive rows in order.
    rows: Option<Vec<usize>>,
    bytes_read: u64,
}

/// Rows read from the input, not yet tokenized.
struct RawBatch {
    /// Each row's segments: a (prompt, output) pair or a conversation's messages.
    rows: Vec<Vec<Segment>>,
    /// Input bytes consumed once this batch was complete (for the progress bar).
    bytes_read: u64,
}

#[derive(Default, serde::Serialize)]
struct BadLine {
    line: usize,
    reason: String,
}

#[derive(Default)]
struct ReadReport {
    skipped: usize,
    recorded: Vec<BadLine>,
}

#[derive(serde::Serialize)]
struct FileEntry {
    name: String,
    rows: usize,
    width: usize,
    tokens: usize,
    response_tokens: usize,
    padding_fraction: f64,
    empty_response_rows: usize,
    /// The input rows in this file, when they are not consecutive rows in input order (bucketing,
    /// packing).
    #[serde(skip_serializing_if = "Option::is_none")]
    input_rows: Option<Vec<usize>>,
}

pub fn run(args: CollateArgs) -> Result<()> {
    let started = Instant::now();
    let tokenizer = args.tokenizer.load()?;
    let spec = args.spec.spec(&tokenizer)?;
    let format = args.rows.row_format()?;
    let layout = match (args.pack, args.bucket) {
        (Some(max_tokens), _) => Layout::Packed(PackSpec {
            max_tokens,
            strategy: match args.pack_strategy {
                PackStrategyArg::BestFitDecreasing => PackStrategy::BestFitDecreasing,
                PackStrategyArg::FirstFitDecreasing => PackStrategy::FirstFitDecreasing,
                PackStrategyArg::Greedy => PackStrategy::Greedy,
                PackStrategyArg::ExactFill => PackStrategy::ExactFill,
            },
            overflow: match args.pack_overflow {
                PackOverflowArg::Error => Overflow::Error,
                PackOverflowArg::Truncate => Overflow::Truncate,
                PackOverflowArg::Split => Overflow::Split,
            },
        }),
        (None, Some(window)) => Layout::Bucketed {
            window: window.max(1),
            seed: args.seed,
        },
        (None, None) => Layout::Padded,
    };
    let device = args.device;
    let (backend, device_line) = Backend::select(device)?;
    if !args.quiet {
        eprintln!("device: {device_line}");
    }
    let device = backend.name();

    prepare_output_dir(&args.output, args.overwrite)?;
    let staging = Staging::create(&args.output)?;

    let input_name = args.input.display().to_string();
    let (total_bytes, reader): (Option<u64>, Box<dyn Read + Send>) = if input_name == "-" {
        (None, Box::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&args.input).map_err(|e| Error::io(&args.input, e))?;
        let len = file.metadata().ok().map(|m| m.len());
        (len, Box::new(file))
    };
    let progress = progress_bar(total_bytes, args.quiet);

    let (raw_tx, raw_rx) = sync_channel::<Result<RawBatch>>(READ_AHEAD);
    let (batch_tx, batch_rx) = sync_channel::<Vec<Work>>(WRITE_AHEAD);
    let batch_size = args.batch_size as usize;
    // Rows read and tokenized at a time: a batch, a bucketing window (whole batches), or a packing window.
    let chunk_rows = match layout {
        Layout::Padded => batch_size,
        Layout::Bucketed { window, .. } => window.div_ceil(batch_size) * batch_size,
        Layout::Packed(_) => args.window.max(1),
    };
    let skip_bad_lines = args.skip_bad_lines;

    let (read_report, write_result, collate_result) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            read_batches(
                reader,
                &input_name,
                &format,
                chunk_rows,
                skip_bad_lines,
                raw_tx,
            )
        });
        let writer = scope.spawn(|| write_batches(batch_rx, staging.path(), &progress));
        let collate_result = collate_batches(
            raw_rx, batch_tx, &tokenizer, &spec, &backend, layout, batch_size,
        );
        (
            reader.join().expect("reader thread panicked"),
            writer.join().expect("writer thread panicked"),
            collate_result,
        )
    });
    collate_result?;
    let files = write_result?;
    progress.finish_and_clear();

    let manifest = manifest(
        &args,
        &tokenizer,
        &spec,
        device,
        layout,
        &files,
        &read_report,
    );
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    write_atomically(&staging.path().join("manifest.json"), &manifest_bytes)?;
    staging.commit(&args.output, files.iter().map(|f| f.name.as_str()))?;

    if !args.quiet {
        let tokens: usize = files.iter().map(|f| f.tokens).sum();
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "wrote {} batches ({} rows, {} tokens, {:.1}% padding) to {} in {:.2} s ({:.0} tokens/s{})",
            files.len(),
            manifest["rows"],
            tokens,
            100.0 * manifest["padding_fraction"].as_f64().unwrap_or(0.0),
            args.output.display(),
            secs,
            tokens as f64 / secs,
            if read_report.skipped > 0 {
                format!(", {} bad lines skipped", read_report.skipped)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn progress_bar(total_bytes: Option<u64>, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = match total_bytes {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta}) {msg}",
            )
            .expect("valid template"),
        ),
        None => ProgressBar::new_spinner(),
    };
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar
}

/// Parse lines into raw batches. Stops at the first bad line unless `skip_bad_lines`; an error is sent
/// down the channel so the collating stage stops too.
fn read_batches(
    input: Box<dyn Read + Send>,
    input_name: &str,
    format: &RowFormat,
    batch_size: usize,
    skip_bad_lines: bool,
    tx: SyncSender<Result<RawBatch>>,
) -> ReadReport {
    let mut report = ReadReport::default();
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let mut line = String::new();
    let mut bytes_read = 0u64;
    let mut line_no = 0usize;
    let new_batch = || RawBatch {
        rows: Vec::with_capacity(batch_size),
        bytes_read: 0,
    };
    let mut batch = new_batch();
    loop {
        line.clear();
        let n = match reader.read_line(&mut line) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(Error::io(input_name, e)));
                return report;
            }
        };
        if n == 0 {
            break;
        }
        bytes_read += n as u64;
        line_no += 1;
        if line.trim().is_empty() {
            continue; // Blank lines (a trailing newline, say) hold no row.
        }
        match format.parse_segments_numbered(
            input_name,
            line_no,
            line.trim_end_matches(['\n', '\r']),
        ) {
            Ok(segments) => batch.rows.push(segments),
            Err(Error::BadInput { line, reason, .. }) if skip_bad_lines => {
                report.skipped += 1;
                if report.recorded.len() < MAX_RECORDED_BAD_LINES {
                    report.recorded.push(BadLine { line, reason });
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return report;
            }
        }
        if batch.rows.len() == batch_size {
            batch.bytes_read = bytes_read;
            if tx
                .send(Ok(std::mem::replace(&mut batch, new_batch())))
                .is_err()
            {
                return report; // The collating stage stopped on an error of its own.
            }
        }
    }
    if !batch.rows.is_empty() {
        batch.bytes_read = bytes_read;
        let _ = tx.send(Ok(batch));
    }
    report
}

/// Tokenize and collate each raw batch (tokenization uses every core), handing results to the writer.
fn collate_batches(
    rx: Receiver<Result<RawBatch>>,
    tx: SyncSender<Vec<Work>>,
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
    backend: &Backend,
    layout: Layout,
    batch_size: usize,
) -> Result<()> {
    let mut row_base = 0usize;
    // Packing applies its own overflow policy instead of max_len.
    let tokenize_spec = match layout {
        Layout::Packed(_) => CollateSpec {
            max_len: None,
            ..spec.clone()
        },
        _ => spec.clone(),
    };
    for (chunk_index, raw) in rx.into_iter().enumerate() {
        let raw = raw?;
        // Name rows in the whole input, not in the chunk.
        let global = |e: Error| match e {
            Error::SequenceTooLong {
                row,
                len,
                prompt_len,
                output_len,
                max_len,
            } => Error::SequenceTooLong {
                row: row_base + row,
                len,
                prompt_len,
                output_len,
                max_len,
            },
            other => other,
        };
        let packed = tokenize_rows(&raw.rows, tokenizer, &tokenize_spec).map_err(global)?;
        let mut work = Vec::new();
        match layout {
            Layout::Padded => work.push(Work {
                collated: Collated::Padded(backend.collate(&packed, spec)?),
                rows: None,
                bytes_read: raw.bytes_read,
            }),
            Layout::Bucketed { window, seed } => {
                let lens: Vec<usize> = (0..packed.rows()).map(|i| packed.row_len(i)).collect();
                // A different order in every window, reproducible from the seed.
                let order = bucket_order(&lens, window, seed.wrapping_add(chunk_index as u64));
                for rows in order.chunks(batch_size) {
                    work.push(Work {
                        collated: Collated::Padded(backend.collate(&packed.select(rows), spec)?),
                        rows: Some(rows.iter().map(|&r| row_base + r).collect()),
                        bytes_read: raw.bytes_read,
                    });
                }
            }
            Layout::Packed(pack_spec) => {
                // Documents after the overflow policy, each remembering its input row. When every row
                // fits, the tokenized rows are the documents as they are.
                let (documents, source) = if packed.max_row_len() <= pack_spec.max_tokens {
                    let source = (0..packed.rows()).map(|i| row_base + i).collect();
                    (packed, source)
                } else {
                    let mut documents = PackedBatch::new();
                    let mut source: Vec<usize> = Vec::new();
                    for i in 0..packed.rows() {
                        for segments in pack_spec.fit_row(&packed, i, spec).map_err(global)? {
                            let refs: Vec<(&[u32], bool)> =
                                segments.iter().map(|(t, f)| (t.as_slice(), *f)).collect();
                            documents.push_segments(&refs);
                            source.push(row_base + i);
                        }
                    }
                    (documents, source)
                };
                let lens: Vec<usize> = (0..documents.rows())
                    .map(|d| documents.row_len(d))
                    .collect();
                for docs in plan_packs(&lens, &pack_spec)? {
                    work.push(Work {
                        collated: Collated::Packed(
                            backend.collate_packed(&documents.select(&docs), spec)?,
                        ),
                        rows: Some(docs.iter().map(|&d| source[d]).collect()),
                        bytes_read: raw.bytes_read,
                    });
                }
            }
        }
        row_base += raw.rows.len();
        // A chunk's files go to the writer together, so that the next chunk's tokenization overlaps
        // their writing (one file at a time would stall this thread behind the writer).
        if tx.send(work).is_err() {
            return Ok(()); // The writer failed; its error is reported from there.
        }
    }
    Ok(())
}

fn write_batches(
    rx: Receiver<Vec<Work>>,
    dir: &Path,
    progress: &ProgressBar,
) -> Result<Vec<FileEntry>> {
    let mut files = Vec::new();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut rows = 0usize;
    for (index, work) in rx.into_iter().flatten().enumerate() {
        let name = format!("batch-{index:05}.safetensors");
        let (bytes, stats) = match &work.collated {
            Collated::Padded(batch) => {
                (batch.to_safetensors(Some(metadata.clone()))?, &batch.stats)
            }
            Collated::Packed(layout) => (
                layout.to_safetensors(Some(metadata.clone()))?,
                &layout.stats,
            ),
        };
        write_atomically(&dir.join(&name), &bytes)?;
        rows += stats.rows;
        files.push(FileEntry {
            name,
            rows: stats.rows,
            width: stats.width,
            tokens: stats.tokens,
            response_tokens: stats.response_tokens,
            padding_fraction: stats.padding_fraction,
            empty_response_rows: stats.empty_response_rows.len(),
            input_rows: work.rows,
        });
        progress.set_position(work.bytes_read);
        progress.set_message(format!("{rows} rows"));
    }
    Ok(files)
}

fn manifest(
    args: &CollateArgs,
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
    device: &str,
    layout: Layout,
    files: &[FileEntry],
    read: &ReadReport,
) -> serde_json::Value {
    let tokens: usize = files.iter().map(|f| f.tokens).sum();
    let layout_json = match layout {
        Layout::Padded => serde_json::json!({ "kind": "padded" }),
        Layout::Bucketed { window, seed } => {
            serde_json::json!({ "kind": "padded", "bucket_window": window, "seed": seed })
        }
        Layout::Packed(pack) => serde_json::json!({
            "kind": "packed",
            "max_tokens": pack.max_tokens,
            "strategy": pack.strategy,
            "overflow": pack.overflow,
            // The share of the packs' token budget left empty.
            "slack_fraction": if files.is_empty() { 0.0 } else {
                1.0 - tokens as f64 / (files.len() * pack.max_tokens) as f64
            },
        }),
    };
    let sum = |f: fn(&FileEntry) -> usize| files.iter().map(f).sum::<usize>();
    let slots: usize = files.iter().map(|f| f.rows * f.width).sum();
    let pad_slots: f64 = files
        .iter()
        .map(|f| f.padding_fraction * (f.rows * f.width) as f64)
        .sum();
    serde_json::json!({
        "format": "sft-collate/1",
        "input": args.input.display().to_string(),
        "rows": sum(|f| f.rows),
        "batches": files.len(),
        "tokens": sum(|f| f.tokens),
        "response_tokens": sum(|f| f.response_tokens),
        "padding_fraction": if slots == 0 { 0.0 } else { pad_slots / slots as f64 },
        "empty_response_rows": sum(|f| f.empty_response_rows),
        "skipped_lines": read.skipped,
        "bad_lines": read.recorded,
        "tokenizer": tokenizer.name(),
        "tokenizer_engine": tokenizer.engine().to_string(),
        "tokenizer_cache": tokenizer.cache_stats().map(|c| serde_json::json!({
            "hits": c.hits,
            "misses": c.misses,
            "hit_rate": c.hit_rate(),
        })),
        "device": device,
        "layout": layout_json,
        "options": {
            "batch_size": args.batch_size,
            "prompt_key": args.rows.prompt_key,
            "output_key": args.rows.output_key,
            "template": args.rows.template.as_ref().map(|p| p.display().to_string()),
            "spec": spec,
        },
        "tensors": {
            "input_ids": spec.id_dtype.to_string(),
            "labels": spec.id_dtype.to_string(),
            "response_mask": "bool",
        },
        "files": files,
    })
}

/// Whether `name` is one of the files this command writes into an output directory.
fn is_output_file(name: &str) -> bool {
    name == "manifest.json" || (name.starts_with("batch-") && name.ends_with(".safetensors"))
}

/// Create the output directory; refuse to mix with an earlier run's files unless `overwrite`.
fn prepare_output_dir(dir: &Path, overwrite: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if overwrite {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        if is_output_file(&entry.file_name().to_string_lossy()) {
            return Err(Error::InvalidOption {
                name: "output",
                reason: format!(
                    "{} already holds collated batches (pass --overwrite to replace them)",
                    dir.display()
                ),
            });
        }
    }
    Ok(())
}

/// A staging directory inside the output directory, removed on drop unless committed.
struct Staging {
    path: PathBuf,
}

impl Staging {
    fn create(output: &Path) -> Result<Self> {
        let path = output.join(format!(".sft-collate-staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Staging { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Replace the previous run's files (if any) with the staged ones; the manifest moves last, so a
    /// directory with a manifest always has all its batches.
    fn commit<'a>(self, output: &Path, batches: impl Iterator<Item = &'a str>) -> Result<()> {
        let old: Vec<PathBuf> = std::fs::read_dir(output)
            .map_err(|e| Error::io(output, e))?
            .flatten()
            .filter(|e| is_output_file(&e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect();
        for path in old {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        for name in batches.chain(["manifest.json"]) {
            let from = self.path.join(name);
            std::fs::rename(&from, output.join(name)).map_err(|e| Error::io(&from, e))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
