//! Text rows to a [`RaggedBatch`]: every segment tokenized separately (no merge crosses a boundary),
//! without special tokens, on all cores, then `max_len` and the truncation policy applied.

use crate::ragged::LengthLimit;
use crate::{Error, RaggedBatch, Result, Tokenizer};

/// Tokenize prompts and outputs (separately, without special tokens, in parallel), apply `max_len` and
/// the truncation policy (`limit`; a [`crate::CollateSpec`] gives its own with `spec.limit()`), and pack
/// them.
pub fn tokenize_pairs<P, O>(
    prompts: &[P],
    outputs: &[O],
    tokenizer: &Tokenizer,
    limit: LengthLimit,
) -> Result<RaggedBatch>
where
    P: AsRef<str>,
    O: AsRef<str>,
{
    if prompts.len() != outputs.len() {
        return Err(Error::LengthMismatch {
            what: "prompts vs outputs",
            left: prompts.len(),
            right: outputs.len(),
        });
    }
    let rows: Vec<[(&str, bool); 2]> = prompts
        .iter()
        .zip(outputs)
        .map(|(p, o)| [(p.as_ref(), false), (o.as_ref(), true)])
        .collect();
    tokenize_rows(&rows, tokenizer, limit)
}

/// Tokenize rows given as segments (text, trainable), each segment separately, without special tokens,
/// in parallel; apply `max_len` (pairs by the pair truncation policy, longer rows by
/// [`crate::LengthLimit::truncate_segments`]) and pack them. A row of exactly one untrainable then one trainable
/// segment is packed as a (prompt, output) pair; any other row carries per-token trainable flags.
pub fn tokenize_rows<R, S>(
    rows: &[R],
    tokenizer: &Tokenizer,
    limit: LengthLimit,
) -> Result<RaggedBatch>
where
    R: AsRef<[(S, bool)]>,
    S: AsRef<str>,
{
    limit.validate()?;
    // One call for every segment of every row, so the tokenizer's thread pool sees them all at once.
    let texts: Vec<&str> = rows
        .iter()
        .flat_map(|row| row.as_ref().iter().map(|(text, _)| text.as_ref()))
        .collect();
    let encodings = tokenizer.encode_batch_flat(&texts)?;
    let mut ids = encodings.iter();
    let mut batch = RaggedBatch::with_capacity(rows.len(), encodings.ids().len());
    let mut segments = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        segments.clear();
        segments.extend(
            row.as_ref()
                .iter()
                .map(|(_, trained)| (ids.next().expect("one encoding per text"), *trained)),
        );
        batch.push_limited(r, &segments, &limit)?;
    }
    Ok(batch)
}
