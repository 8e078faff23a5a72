//! `sft-collate show`: the visual guide's position-by-position table for one row, from the real tokenizer.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use sft_collate::input::Segment;
use sft_collate::{cpu, CollateSpec, Error, PackedBatch, Result, Tokenizer};

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
    /// Take the row from this JSONL file instead.
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
    /// Show the first pack of padding-free packing of the first --rows rows of --input instead, with
    /// document boundaries (cu_seqlens) drawn.
    #[arg(long, value_name = "MAX_TOKENS", requires = "input")]
    pack: Option<usize>,
    /// How many rows of --input to pack for --pack.
    #[arg(long, default_value_t = 4, value_name = "N")]
    rows_to_pack: usize,
}

/// Which part of the padded sequence a position holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Prompt,
    Output,
    Pad,
}

impl Part {
    fn tag(self) -> &'static str {
        match self {
            Part::Prompt => "prompt",
            Part::Output => "output",
            Part::Pad => "pad",
        }
    }

    /// ANSI colour: prompt blue, output green, padding dim.
    fn ansi(self) -> &'static str {
        match self {
            Part::Prompt => "\x1b[34m",
            Part::Output => "\x1b[32m",
            Part::Pad => "\x1b[2m",
        }
    }
}

pub fn run(args: ShowArgs) -> Result<()> {
    let tokenizer = args.tokenizer.load()?;
    let spec = args.spec.spec(&tokenizer)?;
    if let (Some(max_tokens), Some(path)) = (args.pack, &args.input) {
        let color = resolve_color(args.color);
        let table = render_pack(
            &tokenizer,
            &spec,
            path,
            &args.rows,
            args.rows_to_pack,
            max_tokens,
            color,
        )?;
        let _ = std::io::stdout().lock().write_all(table.as_bytes());
        return Ok(());
    }
    let segments = match (&args.input, args.row) {
        (Some(path), Some(row)) => read_row(path, row, &args.rows)?,
        (Some(_), None) => {
            return Err(Error::InvalidOption {
                name: "row",
                reason: "--input needs --row N (or --pack MAX_TOKENS)".into(),
            })
        }
        _ => vec![
            (args.prompt.clone().unwrap_or_default(), false),
            (args.output.clone().unwrap_or_default(), true),
        ],
    };
    let color = resolve_color(args.color);
    let table = render(&tokenizer, &spec, &segments, color)?;
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = stdout.write_all(table.as_bytes());
    Ok(())
}

fn resolve_color(color: Color) -> bool {
    match color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    }
}

/// The first pack of the first `n` rows of `path`, position by position, with a rule at every document
/// boundary.
fn render_pack(
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
    path: &PathBuf,
    rows: &super::RowArgs,
    n: usize,
    max_tokens: usize,
    color: bool,
) -> Result<String> {
    use sft_collate::pack::{plan_packs, PackSpec};
    let mut segment_rows = Vec::new();
    for row in 0..n {
        match read_row(path, row, rows) {
            Ok(segments) => segment_rows.push(segments),
            Err(Error::InvalidOption { name: "row", .. }) => break,
            Err(e) => return Err(e),
        }
    }
    let unlimited = CollateSpec {
        max_len: None,
        ..spec.clone()
    };
    let batch = sft_collate::tokenize_rows(&segment_rows, tokenizer, &unlimited)?;
    let pack_spec = PackSpec::new(max_tokens);
    let mut documents = PackedBatch::new();
    for i in 0..batch.rows() {
        for segments in pack_spec.fit_row(&batch, i, spec)? {
            let refs: Vec<(&[u32], bool)> =
                segments.iter().map(|(t, f)| (t.as_slice(), *f)).collect();
            documents.push_segments(&refs);
        }
    }
    let lens: Vec<usize> = (0..documents.rows())
        .map(|d| documents.row_len(d))
        .collect();
    let packs = plan_packs(&lens, &pack_spec)?;
    let Some(first) = packs.first() else {
        return Ok("(no rows to pack)\n".into());
    };
    let pack = documents.select(first);
    let layout = cpu::collate_packed(&pack, spec)?;
    let paint = |part: Part, s: String| {
        if color {
            format!("{}{s}\x1b[0m", part.ansi())
        } else {
            s
        }
    };
    let mut out = format!(
        "tokenizer {}  pack 1 of {}: documents {:?} (input rows), {} tokens of {max_tokens}, cu_seqlens {:?}, max_seqlen {}\n",
        tokenizer.name(),
        packs.len(),
        first,
        layout.response_mask.len(),
        layout.cu_seqlens,
        layout.max_seqlen
    );
    out.push_str(&format!(
        "{:>5} {:>4} {:>4}  {:<32} {:<32} {}\n",
        "pos", "doc", "p", "input_ids", "labels", "response_mask"
    ));
    let (inputs, labels, positions) = (
        layout.input_ids.to_i64(),
        layout.labels.to_i64(),
        layout.position_ids.to_i64(),
    );
    for (d, w) in layout.cu_seqlens.windows(2).enumerate() {
        out.push_str(&format!("{}\n", "─".repeat(90)));
        let (start, end) = (w[0] as usize, w[1] as usize);
        for t in start..end {
            let p = t - start;
            let part = |q: usize| {
                if d >= pack.rows() || q >= end - start {
                    Part::Pad
                } else if pack.is_trainable(d, q) {
                    Part::Output
                } else {
                    Part::Prompt
                }
            };
            let label_text = if labels[t] < 0 {
                String::new()
            } else {
                cell(tokenizer, labels[t])
            };
            let mask = layout.response_mask[t];
            out.push_str(&format!(
                "{t:>5} {d:>4} {:>4}  {} {} {}\n",
                positions[t],
                paint(
                    part(p),
                    format!("{:<24}{:>8}", cell(tokenizer, inputs[t]), inputs[t])
                ),
                paint(part(p + 1), format!("{label_text:<24}{:>8}", labels[t])),
                paint(
                    if mask { Part::Output } else { Part::Pad },
                    (if mask { "T  (trained)" } else { "F" }).to_string()
                ),
            ));
        }
    }
    Ok(out)
}

fn read_row(path: &PathBuf, row: usize, rows: &super::RowArgs) -> Result<Vec<Segment>> {
    let format = rows.row_format()?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let name = path.display().to_string();
    let mut seen = 0;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        if seen == row {
            return format.parse_segments_numbered(&name, i + 1, &line);
        }
        seen += 1;
    }
    Err(Error::InvalidOption {
        name: "row",
        reason: format!("{name} has {seen} rows; row {row} does not exist"),
    })
}

/// Token text for a table cell: escaped (newlines visible), cut to a readable width.
fn cell(tokenizer: &Tokenizer, id: i64) -> String {
    let text = u32::try_from(id)
        .map(|id| tokenizer.token_text(id))
        .unwrap_or_default();
    let mut shown = format!("{text:?}");
    if shown.chars().count() > 22 {
        shown = shown.chars().take(20).collect::<String>() + "…\"";
    }
    shown
}

fn render(
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
    segments: &[Segment],
    color: bool,
) -> Result<String> {
    let packed = sft_collate::tokenize_rows(&[segments.to_vec()], tokenizer, spec)?;
    let batch = cpu::collate(&packed, spec)?;
    let len = packed.row_len(0);
    let trained = (0..len).filter(|&k| packed.is_trainable(0, k)).count();
    // Which part a sequence position holds: padding past the end, else trained (output) or not (prompt).
    let part_of = |k: usize| {
        if k >= len {
            Part::Pad
        } else if packed.is_trainable(0, k) {
            Part::Output
        } else {
            Part::Prompt
        }
    };
    let width = batch.stats.width;
    let paint = |part: Part, s: String| {
        if color {
            format!("{}{s}\x1b[0m", part.ansi())
        } else {
            s
        }
    };

    let mut out = String::new();
    out.push_str(&format!(
        "tokenizer {}  pad_id {}  prompt {} tokens  output {} tokens  shape (1, {width})\n",
        tokenizer.name(),
        spec.pad_id.unwrap_or_default(),
        len - trained,
        trained,
    ));
    out.push_str(&format!(
        "{:>5}  {:<32} {:<32} {}\n",
        "pos", "input_ids", "labels", "response_mask"
    ));
    for j in 0..width {
        let (input, label) = (batch.input_ids.get(j), batch.labels.get(j));
        let (in_part, label_part) = (part_of(j), part_of(j + 1));
        let input_cell = format!("{:<24}{:>8}", cell(tokenizer, input), input);
        // An ignore-index label has no token text.
        let label_text = if label < 0 {
            String::new()
        } else {
            cell(tokenizer, label)
        };
        let label_cell = format!("{label_text:<24}{label:>8}");
        let mask = batch.response_mask[j];
        let mask_cell = if mask { "T  (trained)" } else { "F" };
        out.push_str(&format!(
            "{j:>5}  {} {} {:<13} {}→{}\n",
            paint(in_part, input_cell),
            paint(label_part, label_cell),
            paint(
                if mask { Part::Output } else { Part::Pad },
                mask_cell.to_string()
            ),
            in_part.tag(),
            label_part.tag(),
        ));
    }
    if width == 0 {
        out.push_str("(no positions: the sequence has at most one token)\n");
    }
    Ok(out)
}
