//! The collation rule, written position by position so it can be read against the contract:
//!
//! ```text
//! seq_i            = prompt_i ++ output_i, right-padded with pad_id
//! input_ids[i, j]  = seq_i[j]
//! labels[i, j]     = seq_i[j + 1]                       (LabelFormat::Pad)
//! response_mask[i, j] = j + 1 < len_i and token j + 1 is trainable
//!                       (prompt_len_i <= j + 1 for a (prompt, output) row: the label is an output token)
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
    for i in 0..packed.rows() {
        let seq = packed.row(i);
        let token = |k: usize| i64::from(seq.get(k).copied().unwrap_or(plan.pad_id));
        for j in 0..plan.width {
            // The label is token j + 1: trained when it is (an output / trainable-segment token).
            let is_response = j + 1 < seq.len() && packed.is_trainable(i, j + 1);
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

/// Collate one pack in the padding-free layout: every row of `packed` is a document, concatenated in
/// order into one row of T tokens. Within document `d` at local position `p`:
///
/// ```text
/// input_ids[t]     = doc[p]
/// labels[t]        = doc[p + 1]   (pad_id / the ignore index at the document's last token)
/// response_mask[t] = prompt_len <= p + 1 < len       (never across a document boundary)
/// position_ids[t]  = p
/// ```
///
/// so the (context, label) pairs are exactly those of the padded layout, and no token is trained to
/// predict the next document's first token. `pad_to_multiple_of` pads T with one more segment of pad
/// tokens (its own `cu_seqlens` entry, positions from 0, nothing trained).
///
/// ```
/// use sft_collate::{cpu, CollateSpec, PackedBatch};
/// let pack = PackedBatch::from_pairs([(vec![1, 2], vec![3]), (vec![4], vec![5, 6])]);
/// let spec = CollateSpec { pad_id: Some(0), ..Default::default() };
/// let layout = cpu::collate_packed(&pack, &spec).unwrap();
/// assert_eq!(layout.input_ids.to_i64(), [1, 2, 3, 4, 5, 6]);
/// assert_eq!(layout.labels.to_i64(), [2, 3, 0, 5, 6, 0]);
/// assert_eq!(layout.response_mask, [false, true, false, true, true, false]);
/// assert_eq!(layout.position_ids.to_i64(), [0, 1, 2, 0, 1, 2]);
/// assert_eq!(layout.cu_seqlens, [0, 3, 6]);
/// ```
pub fn collate_packed(
    packed: &PackedBatch,
    spec: &CollateSpec,
) -> Result<crate::batch::PackedLayout> {
    let plan = CollatePlan::new(packed, spec)?;
    let real = packed.tokens().len();
    let total = CollatePlan::packed_total(real, spec)?;
    let mut input_ids = Vec::with_capacity(total);
    let mut labels = Vec::with_capacity(total);
    let mut response_mask = Vec::with_capacity(total);
    let mut position_ids = Vec::with_capacity(total);
    let mut cu_seqlens = vec![0i32];
    let not_trained = |label: i64| plan.ignore_index.unwrap_or(label);
    for d in 0..packed.rows() {
        let doc = packed.row(d);
        for (p, &token) in doc.iter().enumerate() {
            let is_response = p + 1 < doc.len() && packed.is_trainable(d, p + 1);
            let next = i64::from(doc.get(p + 1).copied().unwrap_or(plan.pad_id));
            input_ids.push(i64::from(token));
            labels.push(if is_response { next } else { not_trained(next) });
            response_mask.push(is_response);
            position_ids.push(p as i64);
        }
        cu_seqlens.push(input_ids.len() as i32);
    }
    if total > real {
        for p in 0..total - real {
            input_ids.push(i64::from(plan.pad_id));
            labels.push(not_trained(i64::from(plan.pad_id)));
            response_mask.push(false);
            position_ids.push(p as i64);
        }
        cu_seqlens.push(total as i32);
    }
    let max_seqlen = cu_seqlens
        .windows(2)
        .map(|w| (w[1] - w[0]) as usize)
        .max()
        .unwrap_or(0);
    let ids = |v: Vec<i64>| match spec.id_dtype {
        IdDtype::I32 => IdTensor::I32(v.into_iter().map(|x| x as i32).collect()),
        IdDtype::I64 => IdTensor::I64(v),
    };
    // Documents, tokens and rows without a response are as in the padded layout; the width is T and the
    // padding is the padded tail only.
    let mut stats = plan.stats(packed);
    stats.width = total;
    stats.response_tokens = response_mask.iter().filter(|&&m| m).count();
    stats.padding_fraction = if total == 0 {
        0.0
    } else {
        (total - real) as f64 / total as f64
    };
    Ok(crate::batch::PackedLayout {
        input_ids: ids(input_ids),
        labels: ids(labels),
        response_mask,
        position_ids: ids(position_ids),
        cu_seqlens,
        max_seqlen,
        stats,
    })
}
