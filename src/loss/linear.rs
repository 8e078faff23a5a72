//! Fused linear cross-entropy: the masked cross-entropy of `logits = hidden · weightᵀ + bias` (an LM
//! head) without the `[N, V]` logits in memory. The rows are taken a chunk at a time: a GEMM makes the
//! chunk's logits, the cross-entropy kernel writes its gradient over them in place, and two GEMMs turn
//! that into the chunk's `d hidden` rows and its share of `d weight` (accumulated in f32). The extra
//! memory is one chunk of logits, whatever N.
//!
//! Every option of [`CeOptions`] applies, normalized over the whole batch (the trained rows and each
//! document's are counted once, before the chunks), so the result is the unfused one's: the same
//! per-row outputs, loss and `d hidden` as the cross-entropy of the materialized logits followed by the
//! same GEMMs. Reached through [`crate::Device::linear_cross_entropy`]; the CPU oracle
//! ([`crate::backend::cpu::linear`]) computes it unfused in f64.
//!
//! ```
//! use sft_collate::loss::linear::{LinearCeConfig, LinearCeInput};
//! use sft_collate::loss::{CeOptions, CeRequest, Labels};
//! use sft_collate::Device;
//!
//! // Three positions, hidden size 2, a vocabulary of 4 (the LM head's weight is [vocab, hidden]).
//! let hidden = [0.5f32, -1.0, 2.0, 0.25, -0.5, 1.5];
//! let weight = [1.0f32, 0.0, 0.0, 1.0, -1.0, 1.0, 0.5, 0.5];
//! let labels = [1i32, 3, 0];
//! let mask = [false, true, true]; // the first position is prompt
//! let input = LinearCeInput::new(&hidden, &weight, 2, Labels::I32(&labels), Some(&mask));
//! let out = Device::cpu().linear_cross_entropy(
//!     &input,
//!     &CeOptions::default(),
//!     CeRequest::default(),
//!     &LinearCeConfig::default(),
//! )?;
//! assert_eq!(out.ce.count, 2);
//! assert!(out.ce.loss > 0.0);
//! let d_hidden = out.grad_hidden.unwrap(); // [3, 2], zeros on the prompt row
//! assert_eq!(&d_hidden[..2], &[0.0, 0.0]);
//! assert_eq!(out.grad_weight.unwrap().len(), 4 * 2); // f32, [vocab, hidden]
//! # Ok::<(), sft_collate::Error>(())
//! ```

use super::{CeInput, CeOptions, CeOutput, Labels, LogitsShape};
use crate::{Error, Result};

/// A fused linear cross-entropy problem on the host: `hidden [N, H]` (row-major), the LM head's
/// `weight [V, H]` as `nn.Linear` stores it, an optional `bias [V]`, and the targets as in
/// [`CeInput`] (labels, mask or `ignore_index`, per-token weights, `cu_seqlens`).
#[derive(Clone, Copy, Debug)]
pub struct LinearCeInput<'a, T> {
    pub hidden: &'a [T],
    pub weight: &'a [T],
    pub bias: Option<&'a [T]>,
    /// H: the length of a hidden row (N = `labels.len()`, V = `weight.len() / H`).
    pub hidden_size: usize,
    pub labels: Labels<'a>,
    /// Which rows are trained; `None`: every row whose label is not the ignore index.
    pub mask: Option<&'a [bool]>,
    /// Per-token weights `w[N]`.
    pub weights: Option<&'a [f32]>,
    /// Document boundaries for [`super::Normalization::SequenceMean`].
    pub cu_seqlens: Option<&'a [i32]>,
}

impl<'a, T> LinearCeInput<'a, T> {
    /// `hidden [N, H]`, `weight [V, H]` without a bias, labels, and the mask (or `None` with
    /// [`CeOptions::ignore_index`]).
    pub fn new(
        hidden: &'a [T],
        weight: &'a [T],
        hidden_size: usize,
        labels: Labels<'a>,
        mask: Option<&'a [bool]>,
    ) -> Self {
        LinearCeInput {
            hidden,
            weight,
            bias: None,
            hidden_size,
            labels,
            mask,
            weights: None,
            cu_seqlens: None,
        }
    }

    /// N: the rows (one per label).
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// V: the LM head's rows (0 until the input is valid).
    pub fn vocab(&self) -> usize {
        self.weight.len().checked_div(self.hidden_size).unwrap_or(0)
    }

    /// The cross-entropy problem of `logits` (dense `[N, V]`, or empty when they come a chunk at a
    /// time), with this input's targets.
    pub fn ce_input<'b, U>(&self, logits: &'b [U]) -> CeInput<'b, U>
    where
        'a: 'b,
    {
        CeInput {
            logits,
            shape: LogitsShape::dense(self.rows(), self.vocab()),
            labels: self.labels,
            mask: self.mask,
            weights: self.weights,
            cu_seqlens: self.cu_seqlens,
        }
    }

    /// [`LinearCeInput::validate`], then the chunk `config` gives this input (what every chunked
    /// backend does first).
    pub fn checked_chunk_rows(
        &self,
        options: &CeOptions,
        config: &LinearCeConfig,
    ) -> Result<usize> {
        self.validate(options)?;
        config.chunk_rows(
            self.rows(),
            self.vocab(),
            self.hidden_size,
            std::mem::size_of::<T>(),
        )
    }

    /// Check the shapes (hidden `N × H`, weight `V × H`, bias `V`, one target per row, `cu_seqlens`),
    /// the options, and that every trained row's label is in `[0, V)`: nothing is computed on bad input.
    pub fn validate(&self, options: &CeOptions) -> Result<()> {
        let (n, h) = (self.rows(), self.hidden_size);
        let bad = |msg: String| Err(Error::Shape(msg));
        if h == 0 {
            return bad("the hidden size must be at least 1".into());
        }
        if n.checked_mul(h) != Some(self.hidden.len()) {
            return bad(format!(
                "hidden has {} elements, not {n} rows (one per label) × {h}",
                self.hidden.len()
            ));
        }
        if self.weight.is_empty() || self.weight.len() % h != 0 {
            return bad(format!(
                "the weight has {} elements, not [vocab, {h}]",
                self.weight.len()
            ));
        }
        let v = self.vocab();
        if let Some(bias) = self.bias {
            if bias.len() != v {
                return bad(format!(
                    "bias has {} entries for a vocab of {v}",
                    bias.len()
                ));
            }
        }
        options.validate()?;
        // Labels, mask, weights and cu_seqlens against the rows (the logits come later).
        let ce = self.ce_input::<T>(&[]);
        ce.validate_for_logits(n.saturating_mul(v))?;
        for row in (0..n).filter(|&r| ce.trained(r, options)) {
            let label = self.labels.get(row);
            if !usize::try_from(label).is_ok_and(|l| l < v) {
                return Err(Error::LabelOutOfRange {
                    row,
                    label,
                    vocab: v,
                });
            }
        }
        Ok(())
    }
}

/// Which gradients to compute (none: the forward only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearCeGrads {
    /// `d loss / d hidden`, `[N, H]` in the input's dtype.
    pub hidden: bool,
    /// `d loss / d weight`, `[V, H]`, accumulated and returned in f32.
    pub weight: bool,
    /// `d loss / d bias`, `[V]`, in f32 (only with a bias).
    pub bias: bool,
}

impl LinearCeGrads {
    /// Every gradient.
    pub const ALL: LinearCeGrads = LinearCeGrads {
        hidden: true,
        weight: true,
        bias: true,
    };
    /// No gradient: the forward only.
    pub const NONE: LinearCeGrads = LinearCeGrads {
        hidden: false,
        weight: false,
        bias: false,
    };

    /// Whether any gradient is asked for.
    pub fn any(&self) -> bool {
        self.hidden || self.weight || self.bias
    }
}

impl Default for LinearCeGrads {
    fn default() -> Self {
        LinearCeGrads::ALL
    }
}

/// How the fused path runs: the gradients to compute and the chunk of rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearCeConfig {
    pub grads: LinearCeGrads,
    /// Rows per chunk; `None`: chosen by [`LinearCeConfig::chunk_rows`].
    pub chunk_rows: Option<usize>,
    /// The most bytes one chunk of logits may take (the peak extra memory); `None`: no cap beyond the
    /// default rule.
    pub max_chunk_bytes: Option<usize>,
}

impl LinearCeConfig {
    /// Refuse a chunk of no rows.
    pub fn validate(&self) -> Result<()> {
        match self.chunk_rows {
            Some(0) => Err(Error::InvalidOption {
                name: "chunk_rows",
                reason: "a chunk must hold at least one row".into(),
            }),
            _ => Ok(()),
        }
    }

    /// The rows per chunk for `n` rows, vocabulary `v`, hidden size `h` and logits of `elem_bytes`:
    /// the one set, else Liger's rule (about `N / ⌈V / H⌉` rows, so that a chunk of logits is about as
    /// large as the hidden states, rounded up to a power of two), capped by `max_chunk_bytes` (at least
    /// one row), never more than `n` (and 1 for no rows).
    pub fn chunk_rows(&self, n: usize, v: usize, h: usize, elem_bytes: usize) -> Result<usize> {
        self.validate()?;
        let rows = match self.chunk_rows {
            Some(c) => c,
            None => {
                let ratio = v.div_ceil(h.max(1)).max(1);
                let liger = n.div_ceil(ratio).max(1).next_power_of_two();
                match self.max_chunk_bytes {
                    Some(bytes) => liger.min((bytes / (v.max(1) * elem_bytes)).max(1)),
                    None => liger,
                }
            }
        };
        Ok(rows.min(n).max(1))
    }
}

/// The results: the cross-entropy's (as [`crate::Device::cross_entropy`] gives them, without a logits
/// gradient) and the gradients asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearCeOutput<T> {
    pub ce: CeOutput<T>,
    /// `d loss / d hidden`, `[N, H]` (zeros on rows not trained).
    pub grad_hidden: Option<Vec<T>>,
    /// `d loss / d weight`, `[V, H]`, f32.
    pub grad_weight: Option<Vec<f32>>,
    /// `d loss / d bias`, `[V]`, f32.
    pub grad_bias: Option<Vec<f32>>,
    /// The rows per chunk it ran with (N on the unfused CPU oracle).
    pub chunk_rows: usize,
}

/// The row stride of a chunk of `v` logits of `T` in the fused path: rows padded to a multiple of 16
/// bytes, so that every row is aligned for the kernel's 16-byte loads (the emulated and CUDA paths lay
/// their chunk out alike).
pub fn linear_row_stride<T>(v: usize) -> usize {
    v.next_multiple_of((16 / std::mem::size_of::<T>()).max(1))
}
