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

use crate::collate::{Batch, CollatePlan, CollateSpec, IdDtype, IdTensor, Pack};
use crate::{RaggedBatch, Result};

/// Collate a ragged batch into padded, shifted, masked tensors on the host. This is the reference every
/// other backend must match bit for bit.
///
/// ```
/// use sft_collate::backend::cpu;
/// use sft_collate::{CollateSpec, RaggedBatch};
/// let batch = RaggedBatch::from_pairs([(vec![10, 20, 30, 40], vec![50, 60, 70, 80])]);
/// let spec = CollateSpec { pad_id: Some(0), ..Default::default() };
/// let batch = cpu::collate(&batch, &spec).unwrap();
/// assert_eq!(batch.input_ids.to_i64(), [10, 20, 30, 40, 50, 60, 70]);
/// assert_eq!(batch.labels.to_i64(), [20, 30, 40, 50, 60, 70, 80]);
/// assert_eq!(batch.response_mask, [false, false, false, true, true, true, true]);
/// ```
pub fn collate(batch: &RaggedBatch, spec: &CollateSpec) -> Result<Batch> {
    let plan = CollatePlan::new(batch, spec)?;
    let (input_ids, labels, response_mask, attention_mask) = match spec.id_dtype {
        IdDtype::I32 => {
            let (i, l, m, a) = fill::<i32>(batch, &plan, spec.attention_mask);
            (IdTensor::I32(i), IdTensor::I32(l), m, a)
        }
        IdDtype::I64 => {
            let (i, l, m, a) = fill::<i64>(batch, &plan, spec.attention_mask);
            (IdTensor::I64(i), IdTensor::I64(l), m, a)
        }
    };
    Ok(Batch {
        input_ids,
        labels,
        response_mask,
        attention_mask,
        stats: plan.stats(batch),
    })
}

/// An integer type `input_ids` and `labels` are written in.
trait IdElem: Copy {
    /// `CollatePlan` checked the range first, so the cast never truncates.
    fn from_i64(v: i64) -> Self;
}

macro_rules! id_elem {
    ($($t:ty),*) => {$(
        impl IdElem for $t {
            #[inline]
            fn from_i64(v: i64) -> Self { v as $t }
        }
    )*};
}
id_elem!(i32, i64);

type Filled<T> = (Vec<T>, Vec<T>, Vec<bool>, Option<Vec<bool>>);

/// The padded layout, row by row, straight into the id dtype: a row's tokens then pads for the inputs,
/// its tokens from the second then pads for the labels (the ignore index where a label is not trained),
/// the mask over the trained labels. Position `j` of a row reads:
///
/// ```text
/// input_ids[j]     = seq[j]       (pad_id past the row)
/// labels[j]        = seq[j + 1]   (pad_id past the row; the ignore index where not trained, if set)
/// response_mask[j] = j + 1 < len and token j + 1 is trainable
/// ```
fn fill<T: IdElem>(batch: &RaggedBatch, plan: &CollatePlan, attention: bool) -> Filled<T> {
    let n = plan.len();
    let width = plan.width;
    let pad = T::from_i64(i64::from(plan.pad_id));
    let id = |t: &u32| T::from_i64(i64::from(*t));
    let (mut input_ids, mut labels) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut response_mask = Vec::with_capacity(n);
    let mut attention_mask = attention.then(|| Vec::with_capacity(n));
    for i in 0..batch.rows() {
        let seq = batch.row(i);
        let trainable = batch.trainable_in_row(i);
        let inputs = &seq[..seq.len().min(width)];
        input_ids.extend(inputs.iter().map(id));
        input_ids.resize(input_ids.len() + width - inputs.len(), pad);
        let targets = seq.get(1..).unwrap_or_default();
        let targets = &targets[..targets.len().min(width)];
        let trained = response_mask.len();
        response_mask.extend((1..=width).map(|k| k < seq.len() && trainable(k)));
        match plan.ignore_index {
            None => labels.extend(targets.iter().map(id)),
            Some(ignore) => {
                let ignore = T::from_i64(ignore);
                labels.extend(
                    targets
                        .iter()
                        .zip(&response_mask[trained..])
                        .map(|(t, &on)| if on { id(t) } else { ignore }),
                );
            }
        }
        let tail = match plan.ignore_index {
            Some(ignore) => T::from_i64(ignore),
            None => pad,
        };
        labels.resize(labels.len() + width - targets.len(), tail);
        if let Some(attention) = &mut attention_mask {
            attention.extend((0..width).map(|j| j < seq.len()));
        }
    }
    (input_ids, labels, response_mask, attention_mask)
}

/// The packed layout, document by document, straight into the id dtype: each document's tokens, its
/// tokens from the second then one pad (the ignore index where a label is not trained, if set), the mask
/// over its trained labels, positions from 0; then the padded tail of `total`.
fn fill_pack<T: IdElem>(
    batch: &RaggedBatch,
    plan: &CollatePlan,
    total: usize,
) -> (Vec<T>, Vec<T>, Vec<T>, Vec<bool>) {
    let pad = T::from_i64(i64::from(plan.pad_id));
    let untrained = T::from_i64(plan.ignore_index.unwrap_or(i64::from(plan.pad_id)));
    let id = |t: &u32| T::from_i64(i64::from(*t));
    let (mut input_ids, mut labels) = (Vec::with_capacity(total), Vec::with_capacity(total));
    let mut position_ids = Vec::with_capacity(total);
    let mut response_mask = Vec::with_capacity(total);
    for d in 0..batch.rows() {
        let doc = batch.row(d);
        if doc.is_empty() {
            continue;
        }
        let trainable = batch.trainable_in_row(d);
        input_ids.extend(doc.iter().map(id));
        let trained = response_mask.len();
        response_mask.extend((1..=doc.len()).map(|k| k < doc.len() && trainable(k)));
        match plan.ignore_index {
            None => labels.extend(doc[1..].iter().map(id)),
            Some(_) => labels.extend(
                doc[1..]
                    .iter()
                    .zip(&response_mask[trained..])
                    .map(|(t, &on)| if on { id(t) } else { untrained }),
            ),
        }
        // The document's last token has no next one in it: the pad id, never trained.
        labels.push(untrained);
        position_ids.extend((0..doc.len()).map(|p| T::from_i64(p as i64)));
    }
    // The padded tail: one segment of untrained pad tokens, positions from 0.
    let tail = total - input_ids.len();
    input_ids.resize(total, pad);
    labels.resize(total, untrained);
    response_mask.resize(total, false);
    position_ids.extend((0..tail).map(|p| T::from_i64(p as i64)));
    (input_ids, labels, position_ids, response_mask)
}

/// Collate one pack in the padding-free layout: every row of `batch` is a document, concatenated in
/// order into one row of T tokens. Within document `d` at local position `p`:
///
/// ```text
/// input_ids[t]     = doc[p]
/// labels[t]        = doc[p + 1]   (pad_id / the ignore index at the document's last token)
/// response_mask[t] = p + 1 < len and token p + 1 is trainable   (never across a boundary)
/// position_ids[t]  = p
/// ```
///
/// so the (context, label) pairs are exactly those of the padded layout, and no token is trained to
/// predict the next document's first token. `pad_to_multiple_of` pads T with one more segment of pad
/// tokens (its own `cu_seqlens` entry, positions from 0, nothing trained).
///
/// ```
/// use sft_collate::backend::cpu;
/// use sft_collate::{CollateSpec, RaggedBatch};
/// let pack = RaggedBatch::from_pairs([(vec![1, 2], vec![3]), (vec![4], vec![5, 6])]);
/// let spec = CollateSpec { pad_id: Some(0), ..Default::default() };
/// let layout = cpu::collate_pack(&pack, &spec).unwrap();
/// assert_eq!(layout.input_ids.to_i64(), [1, 2, 3, 4, 5, 6]);
/// assert_eq!(layout.labels.to_i64(), [2, 3, 0, 5, 6, 0]);
/// assert_eq!(layout.response_mask, [false, true, false, true, true, false]);
/// assert_eq!(layout.position_ids.to_i64(), [0, 1, 2, 0, 1, 2]);
/// assert_eq!(layout.cu_seqlens, [0, 3, 6]);
/// ```
pub fn collate_pack(batch: &RaggedBatch, spec: &CollateSpec) -> Result<Pack> {
    let plan = CollatePlan::new(batch, spec)?;
    let real = batch.tokens().len();
    let total = CollatePlan::pack_total(real, spec)?;
    let (input_ids, labels, position_ids, response_mask) = match spec.id_dtype {
        IdDtype::I32 => {
            let (i, l, p, m) = fill_pack::<i32>(batch, &plan, total);
            (IdTensor::I32(i), IdTensor::I32(l), IdTensor::I32(p), m)
        }
        IdDtype::I64 => {
            let (i, l, p, m) = fill_pack::<i64>(batch, &plan, total);
            (IdTensor::I64(i), IdTensor::I64(l), IdTensor::I64(p), m)
        }
    };
    let (cu_seqlens, max_seqlen) = CollatePlan::pack_boundaries(batch.row_offsets(), total);
    Ok(Pack {
        input_ids,
        labels,
        response_mask,
        position_ids,
        cu_seqlens,
        max_seqlen,
        stats: plan.pack_stats(batch, total),
    })
}
