//! Stanford CS336's `tokenize_prompt_and_output` in one call: text pairs in, padded tensors out, on the
//! CPU. The pieces it is made of ([`crate::tokenize_pairs`], [`crate::Device::collate`]) are public for
//! callers who want the GPU or another layout.

use crate::collate::{Batch, CollateSpec};
use crate::{backend::cpu, tokenize_pairs, Result, Tokenizer};

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
    let ragged = tokenize_pairs(prompts, outputs, tokenizer, spec.limit())?;
    let spec = CollateSpec {
        pad_id: Some(tokenizer.resolve_pad_id(spec.pad_id)?),
        ..spec.clone()
    };
    cpu::collate(&ragged, &spec)
}
