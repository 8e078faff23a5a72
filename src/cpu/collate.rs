//! The collation rule, written position by position so it can be read against the contract:
//!
//! ```text
//! seq_i            = prompt_i ++ output_i, right-padded with pad_id
//! input_ids[i, j]  = seq_i[j]
//! labels[i, j]     = seq_i[j + 1]                       (LabelFormat::Pad)
//! response_mask[i, j] = prompt_len_i <= j + 1 < len_i   (the label is an output token)
//! ```
//!
//! `prompt_len <= j + 1` is the `prompt_len - 1` rule of the visual guide: the first output token sits at
//! `prompt_len` in the sequence and so at `prompt_len - 1` among the labels. Written this way it also holds
//! at the edges: with an empty prompt the first output token is never a label (nothing predicts it), and an
//! empty output gives an all-false row.

use crate::{Batch, BatchStats, CollateSpec, Error, IdTensor, LabelFormat, PackedBatch, Result};

/// An integer type `input_ids` and `labels` can be written in.
trait IdElem: Copy + Default {
    fn from_i64(v: i64) -> Self;
}

macro_rules! id_elem {
    ($($t:ty),*) => {$(
        impl IdElem for $t {
            // Callers check the range first (`check_ids`), so the cast never truncates.
            fn from_i64(v: i64) -> Self { v as $t }
        }
    )*};
}
id_elem!(i32, i64);

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
    packed.validate()?;
    spec.validate()?;
    let pad_id = spec.pad_id.ok_or(Error::NoPadToken)?;
    check_ids(packed, spec, pad_id)?;

    let rows = packed.rows();
    let width = spec.width_for(packed.max_row_len());
    rows.checked_mul(width)
        .filter(|n| n.checked_mul(spec.id_dtype.size()).is_some())
        .ok_or_else(|| {
            Error::InvalidPackedBatch(format!("{rows} x {width} does not fit memory"))
        })?;

    let (input_ids, labels, response_mask) = match spec.id_dtype {
        crate::IdDtype::I32 => {
            let (i, l, m) = fill::<i32>(packed, spec, pad_id, width);
            (IdTensor::I32(i), IdTensor::I32(l), m)
        }
        crate::IdDtype::I64 => {
            let (i, l, m) = fill::<i64>(packed, spec, pad_id, width);
            (IdTensor::I64(i), IdTensor::I64(l), m)
        }
    };
    let stats = stats(packed, width, &response_mask);
    Ok(Batch {
        input_ids,
        labels,
        response_mask,
        stats,
    })
}

fn fill<T: IdElem>(
    packed: &PackedBatch,
    spec: &CollateSpec,
    pad_id: u32,
    width: usize,
) -> (Vec<T>, Vec<T>, Vec<bool>) {
    let n = packed.rows() * width;
    let mut input_ids = vec![T::default(); n];
    let mut labels = vec![T::default(); n];
    let mut response_mask = vec![false; n];
    for (i, &prompt_len) in packed.prompt_lens().iter().enumerate() {
        let seq = packed.row(i);
        let prompt_len = prompt_len as usize;
        let token = |k: usize| i64::from(seq.get(k).copied().unwrap_or(pad_id));
        for j in 0..width {
            let at = i * width + j;
            let is_response = prompt_len <= j + 1 && j + 1 < seq.len();
            input_ids[at] = T::from_i64(token(j));
            labels[at] = T::from_i64(match spec.label_format {
                LabelFormat::IgnoreIndex(ignore) if !is_response => ignore,
                _ => token(j + 1),
            });
            response_mask[at] = is_response;
        }
    }
    (input_ids, labels, response_mask)
}

/// Every id written must fit the dtype: the largest token and the pad id (the ignore index is checked by
/// `CollateSpec::validate`).
fn check_ids(packed: &PackedBatch, spec: &CollateSpec, pad_id: u32) -> Result<()> {
    let max_token = packed.tokens().iter().copied().max().unwrap_or(0);
    for id in [max_token, pad_id] {
        if !spec.id_dtype.fits(i64::from(id)) {
            return Err(Error::IdOverflow {
                id: i64::from(id),
                dtype: spec.id_dtype,
            });
        }
    }
    Ok(())
}

/// Batch statistics from the packed rows and the mask (shared by every backend, which all produce the
/// same mask).
pub fn stats(packed: &PackedBatch, width: usize, response_mask: &[bool]) -> BatchStats {
    let rows = packed.rows();
    let tokens = packed.tokens().len();
    let real_labels: usize = (0..rows).map(|i| packed.row_len(i).saturating_sub(1)).sum();
    let slots = rows * width;
    let empty_response_rows = (0..rows)
        .filter(|&i| !response_mask[i * width..(i + 1) * width].contains(&true))
        .collect();
    BatchStats {
        rows,
        width,
        tokens,
        response_tokens: response_mask.iter().filter(|&&m| m).count(),
        padding_fraction: if slots == 0 {
            0.0
        } else {
            1.0 - real_labels as f64 / slots as f64
        },
        empty_response_rows,
    }
}
