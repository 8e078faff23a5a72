//! `sft-collate export`: a token store to Megatron-Bridge's packed-sequence Parquet
//! ([`sft_collate::export`]).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use sft_collate::dataset::Quiet;
use sft_collate::export::{export_megatron, MegatronExport};
use sft_collate::{Result, Truncation};

use super::choice;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The token store (`sft-collate tokenize`).
    #[arg(long, value_name = "STORE")]
    from: PathBuf,
    /// Output directory for part-NNNNN.idx.parquet and pack_metadata.json.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Megatron-Bridge's packed_sequence_size: positions per pack, each document counting its length
    /// minus one (the model sees all but its last token).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pack_size: u64,
    /// A document longer than --pack-size + 1 tokens: error, or cut it (prompt-left, output-right).
    #[arg(long, default_value = "error", value_parser = choice::<Truncation>(Truncation::NAMES))]
    truncate: Truncation,
    /// Rows packed together (the exact-fill packer works within it).
    #[arg(long, default_value_t = 4096, value_name = "ROWS", value_parser = clap::value_parser!(u64).range(1..))]
    window: u64,
    /// Packs per Parquet file.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    packs_per_file: u64,
    /// Replace an export already in the output directory (atomically).
    #[arg(long)]
    overwrite: bool,
    /// No summary on stderr.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let started = Instant::now();
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let config = MegatronExport {
        truncation: args.truncate,
        window: size(args.window),
        packs_per_file: size(args.packs_per_file),
        overwrite: args.overwrite,
        ..MegatronExport::new(&args.from, &args.output, size(args.pack_size))
    };
    let summary = export_megatron(&config, &Quiet)?;
    if !args.quiet {
        eprintln!(
            "wrote {} packs of {} documents ({} positions, {} trained labels, {:.2}% of the packs used{}) \
             in {} file(s) to {} in {:.2} s",
            summary.packs,
            summary.documents,
            summary.positions,
            summary.trained,
            summary.packing_efficiency,
            match summary.skipped_short {
                0 => String::new(),
                n => format!("; {n} rows under two tokens left out"),
            },
            summary.files.len(),
            args.output.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
