//! `sft-collate collate`: the dataset job ([`sft_collate::dataset`]) with a progress bar.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sft_collate::dataset::{self, DatasetConfig, Layout, Progress, Rows};
use sft_collate::schedule::{Overflow, PackSpec, PackStrategy};
use sft_collate::store::Store;
use sft_collate::{Device, DeviceChoice, Result};

use super::{choice, RowArgs, SpecArgs, TokenizerArgs};

#[derive(Args, Debug)]
pub struct CollateArgs {
    /// JSONL input (one object per line), a JSON array of objects, or a Parquet or Arrow (IPC) table;
    /// JSONL and JSON also gzip- or zstd-compressed; or a directory of such files (`save_to_disk`).
    /// Told by its first bytes ("-" reads standard input)
    #[arg(long, value_name = "FILE", required_unless_present = "from")]
    input: Option<PathBuf>,
    /// Read the rows from a token store (`sft-collate tokenize`) instead of text: the same batches as
    /// from the text with the same options, without tokenizing again.
    #[arg(long, value_name = "STORE", conflicts_with_all = [
        "input", "tokenizer", "tokenizer_engine", "prompt_key", "output_key", "template",
        "messages_key", "message_template", "train_roles", "role_key", "content_key", "role_names",
        "skip_bad_lines",
    ])]
    from: Option<PathBuf>,
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
    /// Where to collate: auto (GPU 0 when usable, else the CPU; stderr says which), cpu, cuda, cuda:N,
    /// emulated.
    #[arg(long, default_value = "auto", value_parser = super::parsed::<DeviceChoice>)]
    device: DeviceChoice,
    /// Padding-free packing: documents packed into rows of at most MAX_TOKENS tokens, with position_ids
    /// and cu_seqlens (one pack per file, shape [1, T]).
    #[arg(long, value_name = "MAX_TOKENS", conflicts_with = "bucket")]
    pack: Option<usize>,
    /// How documents are assigned to packs.
    #[arg(long, default_value = "exact-fill", requires = "pack",
          value_parser = choice::<PackStrategy>(PackStrategy::NAMES))]
    pack_strategy: PackStrategy,
    /// A document longer than --pack: error, truncate (by --truncate, prompt-left by default) or split.
    #[arg(long, default_value = "error", requires = "pack",
          value_parser = choice::<Overflow>(Overflow::NAMES))]
    pack_overflow: Overflow,
    /// Length bucketing: rows are shuffled (seeded) and sorted by length within windows of WINDOW rows,
    /// then cut into batches, so a batch holds rows of similar length.
    #[arg(long, value_name = "WINDOW", value_parser = clap::value_parser!(u64).range(1..))]
    bucket: Option<u64>,
    /// Rows read and tokenized together when packing (the packing strategy works within it).
    #[arg(long, default_value_t = 4096, value_name = "ROWS", value_parser = clap::value_parser!(u64).range(1..))]
    window: u64,
    /// Seed of the bucketing shuffle (same seed, same batches; change it per epoch).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip malformed lines, missing keys and non-string fields (counted in the manifest) instead of
    /// failing.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Replace the dataset already in the output directory (atomically: the old one stays until the new
    /// one is complete).
    #[arg(long)]
    overwrite: bool,
    /// Succeed with an empty dataset when the input has no rows.
    #[arg(long)]
    allow_empty: bool,
    /// Wait for another run writing the same output directory to finish, instead of failing.
    #[arg(long)]
    wait: bool,
    /// Accept a --pad-id outside the tokenizer's vocabulary.
    #[arg(long)]
    allow_pad_id_outside_vocab: bool,
    /// The most memory one batch's tensors may take, in bytes (default: half the machine's memory, at
    /// most 16 GB).
    #[arg(long, value_name = "BYTES")]
    max_batch_bytes: Option<u64>,
    /// No progress bar or summary on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// An index as usize, saturating on 32-bit targets.
fn size(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl CollateArgs {
    fn config(&self) -> Result<DatasetConfig> {
        let batch_size = size(self.batch_size);
        let layout = match (self.pack, self.bucket) {
            (Some(max_tokens), _) => Layout::Packed {
                pack: PackSpec {
                    max_tokens,
                    strategy: self.pack_strategy,
                    overflow: self.pack_overflow,
                },
                window: size(self.window),
            },
            (None, Some(window)) => Layout::Bucketed {
                batch_size,
                window: size(window),
                seed: self.seed,
            },
            (None, None) => Layout::Padded { batch_size },
        };
        Ok(DatasetConfig {
            input: self.input.clone().or(self.from.clone()).unwrap_or_default(),
            output: self.output.clone(),
            rows: self.rows.row_format()?,
            spec: self.spec.spec(),
            layout,
            skip_bad_lines: self.skip_bad_lines,
            overwrite: self.overwrite,
            allow_empty: self.allow_empty,
            wait_for_lock: self.wait,
            allow_pad_id_outside_vocab: self.allow_pad_id_outside_vocab,
            max_batch_bytes: self
                .max_batch_bytes
                .unwrap_or_else(dataset::default_max_batch_bytes),
        })
    }
}

/// The progress bar and notes on stderr.
pub(super) struct Bar(pub(super) ProgressBar);

impl Progress for Bar {
    fn input_size(&self, bytes: Option<u64>) {
        let style = match bytes {
            Some(n) => {
                self.0.set_length(n);
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta}) {msg}"
            }
            None => "{spinner} [{elapsed_precise}] {bytes} {msg}",
        };
        self.0
            .set_style(ProgressStyle::with_template(style).expect("a valid template"));
    }

    fn advance(&self, bytes_read: u64, rows_written: usize) {
        self.0.set_position(bytes_read);
        self.0.set_message(format!("{rows_written} rows"));
    }

    fn note(&self, message: &str) {
        self.0.suspend(|| eprintln!("note: {message}"));
    }
}

pub fn run(args: CollateArgs) -> Result<()> {
    let started = Instant::now();
    let config = args.config()?;
    let (tokenizer, store) = match &args.from {
        Some(dir) => (None, Some(Store::open(dir)?)),
        None => (Some(args.tokenizer.load()?), None),
    };
    let rows = match (&tokenizer, &store) {
        (_, Some(store)) => Rows::Store(store),
        (Some(tokenizer), None) => Rows::Text(tokenizer),
        (None, None) => unreachable!("one of the two"),
    };
    let device = Device::new(args.device)?;
    let bar = Bar(match args.quiet {
        true => ProgressBar::hidden(),
        false => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    });
    if !args.quiet {
        match device.fallback() {
            Some(why) => eprintln!("device: {} ({why})", device.description()),
            None => eprintln!("device: {}", device.description()),
        }
    }
    let manifest = dataset::write_dataset(&config, rows, &device, &bar)?;
    bar.0.finish_and_clear();
    if !args.quiet {
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "wrote {} batches ({} rows, {} tokens, {:.1}% padding) to {} in {:.2} s ({:.0} tokens/s{})",
            manifest.batches,
            manifest.rows,
            manifest.tokens,
            100.0 * manifest.padding_fraction,
            args.output.display(),
            secs,
            manifest.tokens as f64 / secs,
            match manifest.skipped_lines {
                0 => String::new(),
                n => format!(", {n} bad lines skipped"),
            }
        );
    }
    Ok(())
}
