//! The visual guide's position-by-position table, from the real tokenizer: one line per position with
//! the input token, the label and the mask, so the off-by-one can be checked by eye (`sft-collate show`).
//! Prompt, output and padding are coloured on request. Tables are cut after
//! [`ShowOptions::max_positions`] positions, saying so.

use std::fmt::Write as _;
use std::path::Path;

use crate::collate::CollateSpec;
use crate::input::jsonl::Lines;
use crate::input::{RowFormat, Segment, Source};
use crate::schedule::{plan_packs, PackSpec};
use crate::{backend::cpu, tokenize_rows, Error, RaggedBatch, Result, Tokenizer};

/// How a table is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShowOptions {
    /// ANSI colours: prompt blue, output green, padding dim.
    pub color: bool,
    /// Positions shown before the table is cut.
    pub max_positions: usize,
}

impl Default for ShowOptions {
    fn default() -> Self {
        ShowOptions {
            color: false,
            max_positions: 4096,
        }
    }
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

    fn paint(self, color: bool, s: String) -> String {
        let code = match self {
            Part::Prompt => "\x1b[34m",
            Part::Output => "\x1b[32m",
            Part::Pad => "\x1b[2m",
        };
        if color {
            format!("{code}{s}\x1b[0m")
        } else {
            s
        }
    }
}

/// The rows `first..first + count` of an input (JSONL, or any [`Source`]; counting rows, i.e. non-blank
/// lines, from 0), as segments; fewer when the input ends first. A bad line among them is an error
/// naming it; the rows before `first` are not parsed.
pub fn read_rows(
    path: &Path,
    format: &RowFormat,
    first: usize,
    count: usize,
) -> Result<Vec<Vec<Segment>>> {
    let source = Source::open(path, format)?;
    let name = source.name.clone();
    let mut rows = Vec::new();
    let mut seen = 0;
    for line in Lines::new(std::io::BufReader::new(source.into_reader())) {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.is_blank() {
            continue;
        }
        if seen >= first {
            let segments = line
                .text
                .and_then(|t| format.parse_segments(&t))
                .map_err(|reason| Error::BadInput {
                    path: name.clone(),
                    line: line.number,
                    reason,
                })?;
            rows.push(segments);
            if rows.len() == count {
                break;
            }
        }
        seen += 1;
    }
    Ok(rows)
}

/// A token's text for a table cell: escaped (newlines visible), cut to a readable width. An ignore
/// index has none.
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

fn cut_note(out: &mut String, shown: usize, total: usize) {
    if shown < total {
        let _ = writeln!(
            out,
            "… {} more positions not shown (of {total}; the table is cut at {shown})",
            total - shown
        );
    }
}

/// One row (segments: a (prompt, output) pair or a conversation) collated alone, position by position.
pub fn row_table(
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
    segments: &[Segment],
    options: ShowOptions,
) -> Result<String> {
    let spec = CollateSpec {
        pad_id: Some(tokenizer.resolve_pad_id(spec.pad_id)?),
        ..spec.clone()
    };
    let ragged = tokenize_rows(&[segments.to_vec()], tokenizer, spec.limit())?;
    let batch = cpu::collate(&ragged, &spec)?;
    let len = ragged.row_len(0);
    let trained = (0..len).filter(|&k| ragged.is_trainable(0, k)).count();
    // Which part a sequence position holds: padding past the end, else trained (output) or not (prompt).
    let part_of = |k: usize| match k {
        k if k >= len => Part::Pad,
        k if ragged.is_trainable(0, k) => Part::Output,
        _ => Part::Prompt,
    };
    let width = batch.stats.width;
    let color = options.color;
    let mut out = format!(
        "tokenizer {}  pad_id {}  prompt {} tokens  output {} tokens  shape (1, {width})\n",
        tokenizer.name(),
        spec.pad_id.unwrap_or_default(),
        len - trained,
        trained,
    );
    let _ = writeln!(
        out,
        "{:>5}  {:<32} {:<32} response_mask",
        "pos", "input_ids", "labels"
    );
    let shown = width.min(options.max_positions);
    for j in 0..shown {
        let (input, label) = (batch.input_ids.get(j), batch.labels.get(j));
        let (in_part, label_part) = (part_of(j), part_of(j + 1));
        let mask = batch.response_mask[j];
        let label_text = if label < 0 {
            String::new()
        } else {
            cell(tokenizer, label)
        };
        let mask_part = if mask { Part::Output } else { Part::Pad };
        let mask_cell = if mask { "T  (trained)" } else { "F" };
        let _ = writeln!(
            out,
            "{j:>5}  {} {} {:<13} {}→{}",
            in_part.paint(color, format!("{:<24}{input:>8}", cell(tokenizer, input))),
            label_part.paint(color, format!("{label_text:<24}{label:>8}")),
            mask_part.paint(color, mask_cell.to_string()),
            in_part.tag(),
            label_part.tag(),
        );
    }
    cut_note(&mut out, shown, width);
    if width == 0 {
        out.push_str("(no positions: the sequence has at most one token)\n");
    }
    Ok(out)
}

/// The first pack of padding-free packing of `rows` into packs of `max_tokens`, position by position,
/// with a rule at every document boundary.
pub fn pack_table(
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
    rows: &[Vec<Segment>],
    max_tokens: usize,
    options: ShowOptions,
) -> Result<String> {
    let spec = CollateSpec {
        pad_id: Some(tokenizer.resolve_pad_id(spec.pad_id)?),
        ..spec.clone()
    };
    let ragged = tokenize_rows(rows, tokenizer, spec.limit())?;
    let pack_spec = PackSpec::new(max_tokens);
    let mut documents = RaggedBatch::new();
    for i in 0..ragged.rows() {
        for segments in pack_spec.fit_row(&ragged, i, spec.truncation)? {
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
    let layout = cpu::collate_pack(&pack, &spec)?;
    let color = options.color;
    let mut out = format!(
        "tokenizer {}  pack 1 of {}: documents {:?} (input rows), {} tokens of {max_tokens}, cu_seqlens {:?}, max_seqlen {}\n",
        tokenizer.name(),
        packs.len(),
        first,
        layout.response_mask.len(),
        layout.cu_seqlens,
        layout.max_seqlen
    );
    let _ = writeln!(
        out,
        "{:>5} {:>4} {:>4}  {:<32} {:<32} response_mask",
        "pos", "doc", "p", "input_ids", "labels"
    );
    let (inputs, labels, positions) = (
        layout.input_ids.to_i64(),
        layout.labels.to_i64(),
        layout.position_ids.to_i64(),
    );
    let total = layout.response_mask.len();
    let shown = total.min(options.max_positions);
    for (d, w) in layout.cu_seqlens.windows(2).enumerate() {
        let (start, end) = (w[0] as usize, (w[1] as usize).min(shown));
        if start >= shown {
            break;
        }
        let _ = writeln!(out, "{}", "─".repeat(90));
        for t in start..end {
            let p = t - start;
            let part = |q: usize| match q {
                _ if d >= pack.rows() || q >= w[1] as usize - start => Part::Pad,
                q if pack.is_trainable(d, q) => Part::Output,
                _ => Part::Prompt,
            };
            let label_text = if labels[t] < 0 {
                String::new()
            } else {
                cell(tokenizer, labels[t])
            };
            let mask = layout.response_mask[t];
            let mask_part = if mask { Part::Output } else { Part::Pad };
            let _ = writeln!(
                out,
                "{t:>5} {d:>4} {:>4}  {} {} {}",
                positions[t],
                part(p).paint(
                    color,
                    format!("{:<24}{:>8}", cell(tokenizer, inputs[t]), inputs[t])
                ),
                part(p + 1).paint(color, format!("{label_text:<24}{:>8}", labels[t])),
                mask_part.paint(color, (if mask { "T  (trained)" } else { "F" }).to_string()),
            );
        }
    }
    cut_note(&mut out, shown, total);
    Ok(out)
}
