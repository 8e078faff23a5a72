//! `sft-collate show`: the visual guide's table for one row or the first pack ([`sft_collate::show`]).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use sft_collate::show::{pack_table, read_rows, row_table, ShowOptions};
use sft_collate::{Error, Result};

use super::{RowArgs, SpecArgs, TokenizerArgs};

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The prompt text.
    #[arg(long, required_unless_present = "input", conflicts_with = "input")]
    prompt: Option<String>,
    /// The output (response) text.
    #[arg(long, required_unless_present = "input", conflicts_with = "input")]
    output: Option<String>,
    /// Take the row from this JSONL (or JSON, Parquet, Arrow) file instead.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Which row of --input (counting non-blank lines from 0).
    #[arg(long, value_name = "N")]
    row: Option<usize>,
    #[command(flatten)]
    tokenizer: TokenizerArgs,
    #[command(flatten)]
    rows: RowArgs,
    #[command(flatten)]
    spec: SpecArgs,
    /// Colour the prompt, output and padding.
    #[arg(long, value_enum, default_value = "auto")]
    color: Color,
    /// Show the first pack of padding-free packing of the first --rows-to-pack rows of --input instead,
    /// with document boundaries (cu_seqlens) drawn.
    #[arg(long, value_name = "MAX_TOKENS", requires = "input")]
    pack: Option<usize>,
    /// How many rows of --input to pack for --pack.
    #[arg(long, default_value_t = 4, value_name = "N")]
    rows_to_pack: usize,
    /// Positions shown before the table is cut (a long row would otherwise print gigabytes).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    max_positions: usize,
}

pub fn run(args: ShowArgs) -> Result<()> {
    let tokenizer = args.tokenizer.load()?;
    let spec = args.spec.spec();
    let options = ShowOptions {
        color: match args.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        },
        max_positions: args.max_positions,
    };
    let table = match (&args.input, args.row, args.pack) {
        (Some(path), _, Some(max_tokens)) => {
            let rows = read_rows(path, &args.rows.row_format()?, 0, args.rows_to_pack)?;
            pack_table(&tokenizer, &spec, &rows, max_tokens, options)?
        }
        (Some(path), Some(row), None) => {
            let rows = read_rows(path, &args.rows.row_format()?, row, 1)?;
            let segments = rows.first().ok_or_else(|| Error::InvalidOption {
                name: "row",
                reason: format!(
                    "{row}: {} has no such row (rows count from 0)",
                    path.display()
                ),
            })?;
            row_table(&tokenizer, &spec, segments, options)?
        }
        (Some(_), None, None) => {
            return Err(Error::InvalidOption {
                name: "row",
                reason: "is needed with --input: the row to show, from 0 (or --pack MAX_TOKENS to show a pack)"
                    .into(),
            })
        }
        (None, _, _) => {
            let segments = [
                (args.prompt.clone().unwrap_or_default(), false),
                (args.output.clone().unwrap_or_default(), true),
            ];
            row_table(&tokenizer, &spec, &segments, options)?
        }
    };
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = std::io::stdout().lock().write_all(table.as_bytes());
    Ok(())
}
