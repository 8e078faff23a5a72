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

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sft_collate::batch::write_atomically;
use sft_collate::input::RowFormat;
use sft_collate::{tokenize_and_pack, Batch, CollateSpec, Error, Result, Tokenizer};

use super::backend::{Backend, Device};
use super::{RowArgs, SpecArgs, TokenizerArgs};

/// How many raw batches the reader may run ahead, and how many collated batches may wait for the writer.
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

/// Rows read from the input, not yet tokenized.
struct RawBatch {
    prompts: Vec<String>,
    outputs: Vec<String>,
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
}

pub fn run(args: CollateArgs) -> Result<()> {
    let started = Instant::now();
    let tokenizer = args.tokenizer.load()?;
    let spec = args.spec.spec(&tokenizer)?;
    let format = args.rows.row_format()?;
    let (backend, device_line) = Backend::select(args.device)?;
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
    let (batch_tx, batch_rx) = sync_channel::<(Batch, u64)>(WRITE_AHEAD);
    let batch_size = args.batch_size as usize;
    let skip_bad_lines = args.skip_bad_lines;

    let (read_report, write_result, collate_result) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            read_batches(
                reader,
                &input_name,
                &format,
                batch_size,
                skip_bad_lines,
                raw_tx,
            )
        });
        let writer = scope.spawn(|| write_batches(batch_rx, staging.path(), &progress));
        let collate_result = collate_batches(raw_rx, batch_tx, &tokenizer, &spec, &backend);
        (
            reader.join().expect("reader thread panicked"),
            writer.join().expect("writer thread panicked"),
            collate_result,
        )
    });
    collate_result?;
    let files = write_result?;
    progress.finish_and_clear();

    let manifest = manifest(&args, &tokenizer, &spec, device, &files, &read_report);
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
        prompts: Vec::with_capacity(batch_size),
        outputs: Vec::with_capacity(batch_size),
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
        match format.parse_numbered(input_name, line_no, line.trim_end_matches(['\n', '\r'])) {
            Ok((prompt, output)) => {
                batch.prompts.push(prompt);
                batch.outputs.push(output);
            }
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
        if batch.prompts.len() == batch_size {
            batch.bytes_read = bytes_read;
            if tx
                .send(Ok(std::mem::replace(&mut batch, new_batch())))
                .is_err()
            {
                return report; // The collating stage stopped on an error of its own.
            }
        }
    }
    if !batch.prompts.is_empty() {
        batch.bytes_read = bytes_read;
        let _ = tx.send(Ok(batch));
    }
    report
}

/// Tokenize and collate each raw batch (tokenization uses every core), handing results to the writer.
fn collate_batches(
    rx: Receiver<Result<RawBatch>>,
    tx: SyncSender<(Batch, u64)>,
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
    backend: &Backend,
) -> Result<()> {
    let mut row_base = 0usize;
    for raw in rx {
        let raw = raw?;
        let packed = tokenize_and_pack(&raw.prompts, &raw.outputs, tokenizer, spec).map_err(
            // Name the row in the whole input, not in the batch.
            |e| match e {
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
            },
        )?;
        row_base += raw.prompts.len();
        let batch = backend.collate(&packed, spec)?;
        if tx.send((batch, raw.bytes_read)).is_err() {
            break; // The writer failed; its error is reported from there.
        }
    }
    Ok(())
}

fn write_batches(
    rx: Receiver<(Batch, u64)>,
    dir: &Path,
    progress: &ProgressBar,
) -> Result<Vec<FileEntry>> {
    let mut files = Vec::new();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut rows = 0usize;
    for (index, (batch, bytes_read)) in rx.into_iter().enumerate() {
        let name = format!("batch-{index:05}.safetensors");
        batch.write_safetensors(&dir.join(&name), Some(metadata.clone()))?;
        let s = &batch.stats;
        rows += s.rows;
        files.push(FileEntry {
            name,
            rows: s.rows,
            width: s.width,
            tokens: s.tokens,
            response_tokens: s.response_tokens,
            padding_fraction: s.padding_fraction,
            empty_response_rows: s.empty_response_rows.len(),
        });
        progress.set_position(bytes_read);
        progress.set_message(format!("{rows} rows"));
    }
    Ok(files)
}

fn manifest(
    args: &CollateArgs,
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
    device: &str,
    files: &[FileEntry],
    read: &ReadReport,
) -> serde_json::Value {
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
        "device": device,
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
