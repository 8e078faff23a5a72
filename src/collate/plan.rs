//! What every backend checks and computes before it writes a single element: the shared front half of
//! collation (launch geometry is the kernels' business: `backend::abi`). A [`CollatePlan`] exists only for a valid batch and spec, so a corrupted batch is a typed
//! error here and never an out-of-bounds access in a kernel.

use crate::collate::{BatchStats, CollateSpec, LabelFormat};
use crate::{Error, RaggedBatch, Result};

/// A checked collation: the resolved pad id, the tensors' shape and the kernel's scalar arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollatePlan {
    pub rows: usize,
    pub width: usize,
    pub pad_id: u32,
    /// The value written where the mask is false, when labels use an ignore index.
    pub ignore_index: Option<i64>,
}

impl CollatePlan {
    /// Validate `packed` and `spec` together: offsets and lengths consistent, a pad id, every id within the
    /// id dtype, and `rows × width` elements of every output addressable.
    pub fn new(batch: &RaggedBatch, spec: &CollateSpec) -> Result<Self> {
        batch.validate()?;
        let max_token = batch.tokens().iter().copied().max().unwrap_or(0);
        Self::for_validated(batch.row_offsets(), max_token, spec)
    }

    /// The same checks for a batch whose offsets were validated already (a device copy keeps only its
    /// offsets and largest token on the host).
    pub(crate) fn for_validated(
        row_offsets: &[u64],
        max_token: u32,
        spec: &CollateSpec,
    ) -> Result<Self> {
        spec.validate()?;
        let pad_id = spec.pad_id.ok_or(Error::NoPadToken)?;
        for id in [max_token, pad_id] {
            if !spec.id_dtype.fits(i64::from(id)) {
                return Err(Error::IdOverflow {
                    id: i64::from(id),
                    dtype: spec.id_dtype.name(),
                });
            }
        }
        let rows = row_offsets.len() - 1;
        let max_row_len = row_offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        let width = spec.width_for(max_row_len);
        rows.checked_mul(width)
            .and_then(|n| n.checked_mul(spec.id_dtype.size()))
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::InvalidBatch(format!("{rows} x {width} elements do not fit memory"))
            })?;
        Ok(CollatePlan {
            rows,
            width,
            pad_id,
            ignore_index: match spec.label_format {
                LabelFormat::Pad => None,
                LabelFormat::IgnoreIndex(v) => Some(v),
            },
        })
    }

    /// Elements in each output tensor.
    pub fn len(&self) -> usize {
        self.rows * self.width
    }

    /// Whether the tensors are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions of the packed (padding-free) layout of a batch of `real` tokens: `real`, rounded up to
    /// `pad_to_multiple_of` (the tail is one more segment of pad tokens). Refuses a pack whose positions
    /// do not fit the i32 `cu_seqlens`.
    pub fn pack_total(real: usize, spec: &CollateSpec) -> Result<usize> {
        let total = match spec.pad_to_multiple_of {
            Some(m) if m > 1 => real.div_ceil(m) * m,
            _ => real,
        };
        if i32::try_from(total).is_err() {
            return Err(Error::InvalidBatch(format!(
                "a pack of {total} tokens does not fit i32 cu_seqlens"
            )));
        }
        Ok(total)
    }

    /// `cu_seqlens` and `max_seqlen` of the packed layout, from the offsets alone (no device round trip).
    pub fn pack_boundaries(row_offsets: &[u64], total: usize) -> (Vec<i32>, usize) {
        let real = row_offsets.last().copied().unwrap_or(0) as usize;
        let mut cu_seqlens: Vec<i32> = row_offsets.iter().map(|&o| o as i32).collect();
        if total > real {
            cu_seqlens.push(total as i32);
        }
        let max_seqlen = cu_seqlens
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        (cu_seqlens, max_seqlen)
    }

    /// The statistics of the packed layout: as the padded layout's, with width T and the pad tail as
    /// the padding.
    pub(crate) fn pack_stats(&self, batch: &RaggedBatch, total: usize) -> BatchStats {
        self.pack_stats_from(
            batch.row_offsets(),
            batch.prompt_lens(),
            batch.trainable(),
            total,
        )
    }

    /// [`CollatePlan::pack_stats`] from the batch's arrays (a device copy keeps them on the host).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn pack_stats_from(
        &self,
        row_offsets: &[u64],
        prompt_lens: &[u32],
        trainable: Option<&[u8]>,
        total: usize,
    ) -> BatchStats {
        let mut stats = self.stats_from(row_offsets, prompt_lens, trainable);
        let real = row_offsets.last().copied().unwrap_or(0) as usize;
        stats.width = total;
        stats.padding_fraction = if total == 0 {
            0.0
        } else {
            (total - real) as f64 / total as f64
        };
        stats
    }

    /// The statistics of the batch, from the packed rows alone (so a device backend needs no copy back):
    /// row `i` has `len - max(prompt_len, 1)` response labels when that is positive.
    pub fn stats(&self, batch: &RaggedBatch) -> BatchStats {
        self.stats_from(batch.row_offsets(), batch.prompt_lens(), batch.trainable())
    }

    pub(crate) fn stats_from(
        &self,
        row_offsets: &[u64],
        prompt_lens: &[u32],
        trainable: Option<&[u8]>,
    ) -> BatchStats {
        let len = |i: usize| (row_offsets[i + 1] - row_offsets[i]) as usize;
        // Labels are tokens 1..len of a row; with flags, the trained ones are flagged.
        let response = |i: usize| match trainable {
            Some(flags) => {
                let start = row_offsets[i] as usize;
                (1..len(i)).filter(|&k| flags[start + k] != 0).count()
            }
            None => len(i).saturating_sub((prompt_lens[i] as usize).max(1)),
        };
        let real_labels: usize = (0..self.rows).map(|i| len(i).saturating_sub(1)).sum();
        let slots = self.len();
        BatchStats {
            rows: self.rows,
            width: self.width,
            tokens: row_offsets.last().copied().unwrap_or(0) as usize,
            response_tokens: (0..self.rows).map(response).sum(),
            padding_fraction: if slots == 0 {
                0.0
            } else {
                1.0 - real_labels as f64 / slots as f64
            },
            empty_response_rows: (0..self.rows).filter(|&i| response(i) == 0).collect(),
        }
    }
}
