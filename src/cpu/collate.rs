//! The collation rule, written position by position so it can be read against the contract:
//!
//! ```text
//! seq_i            = prompt_i ++ output_i, right-padded with pad_id
//! input_ids[i, j]  = seq_i[j]
//! labels[i, j]     = seq_i[j + 1]                       (LabelFormat::Pad)
//! response_mask[i, j] = prompt_len_i <= j + 1 < len_i   (the label is an output token)
//! attention_mask[i, j] = j < len_i                      (on request)
//! ```
//!
//! `prompt_len <= j + 1` is the `prompt_len - 1` rule of the visual guide: the first output token sits at
//! `prompt_len` in the sequence and so at `prompt_len - 1` among the labels. Written this way it also holds
//! at the edges: with an empty prompt the first output token is never a label (nothing predicts it), and an
//! empty output gives an all-false row.

use crate::plan::CollatePlan;
use crate::{Batch, CollateSpec, IdDtype, IdTensor, PackedBatch, Result};

/// Collate a packed batch into padded, shifted, masked tensors on the host. This is the reference every
/// other backend must match bit for bit.
///
/// ```
/// use sft_collate::{cpu, CollateSpec, PackedBatch};
/// let packed = PackedBatch::from_pairs([(vec![10, 20, 30, 40], vec![50, 60, 70, 80])]);
/// let spec = CollateSpec { pad_id: Some(0), ..Default::default() };
/// let batch = cpu::collate(&packed, &spec).unwrap();
/// assert_eq!(batch.input_ids.to_i64(), [10, 20, 30, 40, 50, 60, 70]);
/// assert_eq!(batch.labels.to_i64(), [20, 30, 40, 50, 60, 70, 80]);
/// assert_eq!(batch.response_mask, [false, false, false, true, true, true, true]);
/// ```
pub fn collate(packed: &PackedBatch, spec: &CollateSpec) -> Result<Batch> {
    let plan = CollatePlan::new(packed, spec)?;
    let n = plan.len();
    let (mut input_ids, mut labels) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut response_mask, mut attention_mask) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (i, &prompt_len) in packed.prompt_lens().iter().enumerate() {
        let seq = packed.row(i);
        let prompt_len = prompt_len as usize;
        let token = |k: usize| i64::from(seq.get(k).copied().unwrap_or(plan.pad_id));
        for j in 0..plan.width {
            let is_response = prompt_len <= j + 1 && j + 1 < seq.len();
            input_ids.push(token(j));
            labels.push(match plan.ignore_index {
                Some(ignore) if !is_response => ignore,
                _ => token(j + 1),
            });
            response_mask.push(is_response);
            attention_mask.push(j < seq.len());
        }
    }
    // `CollatePlan::new` checked that every id fits the dtype, so the narrowing cast is exact.
    let ids = |v: Vec<i64>| match spec.id_dtype {
        IdDtype::I32 => IdTensor::I32(v.into_iter().map(|x| x as i32).collect()),
        IdDtype::I64 => IdTensor::I64(v),
    };
    Ok(Batch {
        input_ids: ids(input_ids),
        labels: ids(labels),
        response_mask,
        attention_mask: spec.attention_mask.then_some(attention_mask),
        stats: plan.stats(packed),
    })
}
