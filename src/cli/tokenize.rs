//! `sft-collate tokenize`: text to a token store ([`sft_collate::store`]), one shard per process.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget};
use sft_collate::store::{self, Shard, StoreConfig};
use sft_collate::Result;

use super::collate::Bar;
use super::{RowArgs, TokenizerArgs};

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// JSONL input (one object per line), a JSON array of objects, or a Parquet or Arrow (IPC) table;
    /// JSONL and JSON also gzip- or zstd-compressed; or a directory of such files (`save_to_disk`).
    /// Told by its first bytes ("-" reads standard input)
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// The store directory (made when missing); shards of other processes may write beside this one.
    #[arg(long, value_name = "STORE")]
    output: PathBuf,
    #[command(flatten)]
    tokenizer: TokenizerArgs,
    #[command(flatten)]
    rows: RowArgs,
    /// Tokenize only shard I of N: the rows on input lines l (from 0) with l % N == I. N processes
    /// with I = 0..N-1 write the whole store together.
    #[arg(long, value_name = "I/N", default_value = "0/1", value_parser = super::parsed::<Shard>)]
    shard: Shard,
    /// Skip malformed lines, missing keys and non-string fields (counted in the manifest) instead of
    /// failing.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Replace this shard when the store already has it.
    #[arg(long)]
    overwrite: bool,
    /// No progress bar or summary on stderr.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let started = Instant::now();
    let config = StoreConfig {
        input: args.input.clone(),
        output: args.output.clone(),
        rows: args.rows.row_format()?,
        shard: args.shard,
        skip_bad_lines: args.skip_bad_lines,
        overwrite: args.overwrite,
    };
    let tokenizer = args.tokenizer.load()?;
    let bar = Bar(match args.quiet {
        true => ProgressBar::hidden(),
        false => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    });
    let manifest = store::write_store(&config, &tokenizer, &bar)?;
    bar.0.finish_and_clear();
    if !args.quiet {
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "wrote shard {} ({} rows, {} tokens, {:.2} bytes per token) to {} in {:.2} s ({:.0} tokens/s{})",
            manifest.shard,
            manifest.rows,
            manifest.tokens,
            manifest.bytes_per_token(),
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
