//! The one-call API: text pairs in, tensors out, as CS336's `tokenize_prompt_and_output`.

use crate::{cpu, Batch, CollateSpec, Error, PackedBatch, Result, Tokenizer};

/// Tokenize prompts and outputs (separately, without special tokens, in parallel), apply `max_len` and
/// the truncation policy, and pack them. The spec's `pad_id` is not needed here.
pub fn tokenize_and_pack<P, O>(
    prompts: &[P],
    outputs: &[O],
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
) -> Result<PackedBatch>
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
    tokenize_rows(&rows, tokenizer, spec)
}

/// Tokenize rows given as segments (text, trainable), each segment separately, without special tokens,
/// in parallel; apply `max_len` (pairs by the pair truncation policy, longer rows by
/// [`CollateSpec::truncate_segments`]) and pack them. A row of exactly one untrainable then one trainable
/// segment is packed as a (prompt, output) pair; any other row carries per-token trainable flags.
pub fn tokenize_rows<R, S>(
    rows: &[R],
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
) -> Result<PackedBatch>
where
    R: AsRef<[(S, bool)]>,
    S: AsRef<str>,
{
    spec.validate()?;
    // One call for every segment of every row, so the tokenizer's thread pool sees them all at once.
    let texts: Vec<&str> = rows
        .iter()
        .flat_map(|row| row.as_ref().iter().map(|(text, _)| text.as_ref()))
        .collect();
    let mut ids = tokenizer.encode_batch(&texts)?.into_iter();
    let mut batch = PackedBatch::new();
    for (r, row) in rows.iter().enumerate() {
        let segments: Vec<(Vec<u32>, bool)> = row
            .as_ref()
            .iter()
            .map(|(_, trained)| (ids.next().expect("one encoding per text"), *trained))
            .collect();
        match segments.as_slice() {
            [(prompt, false), (output, true)] => {
                let (prompt, output) = spec.truncate(r, prompt, output)?;
                batch.push_row(prompt, output);
            }
            _ => {
                let kept = spec.truncate_segments(r, &segments)?;
                let refs: Vec<(&[u32], bool)> =
                    kept.iter().map(|(t, f)| (t.as_slice(), *f)).collect();
                batch.push_segments(&refs);
            }
        }
    }
    Ok(batch)
}

/// CS336's `tokenize_prompt_and_output`: `input_ids`, `labels` and `response_mask` for a batch of
/// (prompt, output) pairs, on the CPU. The pad id is `spec.pad_id`, else the tokenizer's.
///
/// ```
/// use sft_collate::{tokenize_prompt_and_output, CollateSpec, Tokenizer};
/// let tokenizer = Tokenizer::load("o200k_base")?;
/// let batch = tokenize_prompt_and_output(
///     &["What is 2+2?", "Name a prime."],
///     &["The answer is 4", "7"],
///     &tokenizer,
///     &CollateSpec::default(),
/// )?;
/// let (rows, width) = batch.shape();
/// assert_eq!(rows, 2);
/// // Row 1 is shorter: its labels end in padding, which the mask leaves out.
/// assert!(!batch.response_mask[2 * width - 1]);
/// // Every output token is a label (both prompts are non-empty), so each one is trained on once.
/// let output_tokens = tokenizer.encode("The answer is 4")?.len() + tokenizer.encode("7")?.len();
/// assert_eq!(batch.stats.response_tokens, output_tokens);
/// # Ok::<(), sft_collate::Error>(())
/// ```
pub fn tokenize_prompt_and_output<P, O>(
    prompts: &[P],
    outputs: &[O],
    tokenizer: &Tokenizer,
    spec: &CollateSpec,
) -> Result<Batch>
where
    P: AsRef<str>,
    O: AsRef<str>,
{
    let packed = tokenize_and_pack(prompts, outputs, tokenizer, spec)?;
    let spec = CollateSpec {
        pad_id: Some(tokenizer.resolve_pad_id(spec.pad_id)?),
        ..spec.clone()
    };
    cpu::collate(&packed, &spec)
}
