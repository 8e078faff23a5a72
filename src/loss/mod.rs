//! Masked cross-entropy: the types every backend shares. The CPU oracle is
//! [`crate::backend::cpu::loss::masked_cross_entropy`] (f64); the fused kernel runs on the GPU
//! (`backend::cuda::MaskedCrossEntropy`) and on CPU threads (`backend::emulation`); every backend is
//! reached through [`crate::Device::cross_entropy`].
//!
//! For every row with mask true: `lse = logsumexp(row)`, `log_prob = row[label] - lse`,
//! `entropy = lse - Σ p·row`, and the row's loss term `w · (-log_prob)` (`w` = 1 without weights).
//! Rows with mask false are not read: their outputs are 0 and their gradient rows zeros.

use crate::{Error, Result};

/// How the summed loss `Σ w·(-log_prob)` over masked rows is normalized. The gradient is scaled the same
/// way (times the upstream scalar).
#[derive(Clone, Copy, Debug, PartialEq, Default, serde::Serialize)]
pub enum Normalization {
    /// Divide by the number of masked rows; with no masked rows the loss is 0, never NaN.
    #[default]
    TokenMean,
    /// CS336's `sft_microbatch_train_step`: divide by `normalize_constant · batch_size ·
    /// gradient_accumulation_steps`.
    Cs336 {
        normalize_constant: f64,
        batch_size: usize,
        gradient_accumulation_steps: usize,
    },
    /// No normalization.
    Sum,
}

impl Normalization {
    /// The denominator for `count` masked rows (0 means: the loss and gradient are 0).
    pub fn denominator(&self, count: usize) -> f64 {
        match *self {
            Normalization::TokenMean => count as f64,
            Normalization::Cs336 {
                normalize_constant,
                batch_size,
                gradient_accumulation_steps,
            } => normalize_constant * batch_size as f64 * gradient_accumulation_steps as f64,
            Normalization::Sum => 1.0,
        }
    }

    /// Refuse a CS336 denominator that is not finite and positive.
    pub fn validate(&self) -> Result<()> {
        if let Normalization::Cs336 { .. } = self {
            let d = self.denominator(0);
            if !(d.is_finite() && d > 0.0) {
                return Err(Error::InvalidOption {
                    name: "normalization",
                    reason: format!(
                        "the CS336 denominator nc · B · gas is {d}, not a positive number"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Options of a masked cross-entropy call.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CeOptions {
    pub normalization: Normalization,
    /// The gradient is multiplied by this (d final loss / d this loss), as autograd's `grad_output`.
    pub upstream: f32,
}

impl Default for CeOptions {
    fn default() -> Self {
        CeOptions {
            normalization: Normalization::TokenMean,
            upstream: 1.0,
        }
    }
}

/// Labels as the collator writes them.
#[derive(Clone, Copy, Debug)]
pub enum Labels<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl Labels<'_> {
    pub fn len(&self) -> usize {
        match self {
            Labels::I32(v) => v.len(),
            Labels::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> i64 {
        match self {
            Labels::I32(v) => i64::from(v[i]),
            Labels::I64(v) => v[i],
        }
    }
}

/// The shape of a logits matrix: `rows` rows of `vocab` logits, row `i` starting at `i · row_stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogitsShape {
    pub rows: usize,
    pub vocab: usize,
    pub row_stride: usize,
}

impl LogitsShape {
    /// A dense `[rows, vocab]` matrix.
    pub fn dense(rows: usize, vocab: usize) -> Self {
        LogitsShape {
            rows,
            vocab,
            row_stride: vocab,
        }
    }

    /// Check the shape against the lengths of the buffers that come with it.
    pub fn validate(
        &self,
        logits_len: usize,
        labels_len: usize,
        mask_len: usize,
        weights_len: Option<usize>,
    ) -> Result<()> {
        let bad = |msg: String| Err(Error::Shape(msg));
        if self.vocab == 0 || self.vocab > i32::MAX as usize {
            return bad(format!("vocab {} must be in 1..=2^31-1", self.vocab));
        }
        if self.row_stride < self.vocab {
            return bad(format!(
                "row stride {} < vocab {}",
                self.row_stride, self.vocab
            ));
        }
        let needed = match self.rows {
            0 => Some(0),
            r => (r - 1)
                .checked_mul(self.row_stride)
                .and_then(|n| n.checked_add(self.vocab)),
        };
        if needed.is_none_or(|n| n > logits_len) {
            return bad(format!(
                "{} rows of stride {} need more than the {logits_len} logits given",
                self.rows, self.row_stride
            ));
        }
        for (what, len) in [
            ("labels", Some(labels_len)),
            ("mask", Some(mask_len)),
            ("weights", weights_len),
        ] {
            if let Some(len) = len {
                if len != self.rows {
                    return bad(format!("{what} has {len} entries for {} rows", self.rows));
                }
            }
        }
        Ok(())
    }
}

/// A masked cross-entropy problem on the host.
#[derive(Clone, Copy, Debug)]
pub struct CeInput<'a, T> {
    pub logits: &'a [T],
    pub shape: LogitsShape,
    pub labels: Labels<'a>,
    pub mask: &'a [bool],
    /// Per-token weights `w[N]` (RL losses that weight tokens).
    pub weights: Option<&'a [f32]>,
}

impl<'a, T> CeInput<'a, T> {
    /// Dense `[N, vocab]` logits, N = `mask.len()`.
    pub fn new(logits: &'a [T], vocab: usize, labels: Labels<'a>, mask: &'a [bool]) -> Self {
        CeInput {
            logits,
            shape: LogitsShape::dense(mask.len(), vocab),
            labels,
            mask,
            weights: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.shape.validate(
            self.logits.len(),
            self.labels.len(),
            self.mask.len(),
            self.weights.map(<[f32]>::len),
        )
    }
}

/// Results on the host, in the precision the kernels produce (f32; the gradient in the logits' dtype).
#[derive(Clone, Debug, PartialEq)]
pub struct CeOutput<T> {
    /// Per-token log-probability of the label (0 on unmasked rows).
    pub log_probs: Vec<f32>,
    /// Per-token entropy (0 on unmasked rows).
    pub entropy: Vec<f32>,
    /// Per-token logsumexp (0 on unmasked rows).
    pub lse: Vec<f32>,
    /// `Σ w · (-log_prob)` over masked rows.
    pub sum: f32,
    /// Number of masked rows.
    pub count: u32,
    /// The normalized loss.
    pub loss: f32,
    /// `d loss / d logits`, dense `[N, vocab]` (or in the logits' own layout when computed in place).
    pub grad: Option<Vec<T>>,
}

/// An element type the loss functions read: widened to f64 before use.
pub trait Float: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
}

macro_rules! float_elem {
    ($($t:ty => $conv:expr),* $(,)?) => {$(
        impl Float for $t {
            #[inline]
            fn to_f64(self) -> f64 { ($conv)(self) }
        }
    )*};
}
float_elem!(
    f32 => f64::from,
    f64 => |x| x,
    half::f16 => half::f16::to_f64,
    half::bf16 => half::bf16::to_f64,
);

/// What a device element must be: plain data, and, with the CUDA backend, something cudarc can copy.
#[cfg(feature = "cuda")]
pub trait DeviceElem: bytemuck::Pod + cudarc::driver::DeviceRepr {}
#[cfg(feature = "cuda")]
impl<T: bytemuck::Pod + cudarc::driver::DeviceRepr> DeviceElem for T {}
/// What a device element must be: plain data, and, with the CUDA backend, something cudarc can copy.
#[cfg(not(feature = "cuda"))]
pub trait DeviceElem: bytemuck::Pod {}
#[cfg(not(feature = "cuda"))]
impl<T: bytemuck::Pod> DeviceElem for T {}

/// The element types logits come in: f32, f16 and bf16 (as the `half` crate stores them).
pub trait LogitElem: Float + DeviceElem + Default + PartialEq + std::fmt::Debug {
    /// The kernel-name suffix (`masked_ce_fwd_<suffix>`).
    const SUFFIX: &'static str;
    /// Round an f32 to this type (to nearest, ties to even).
    fn from_f32(v: f32) -> Self;
}

impl LogitElem for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl LogitElem for half::f16 {
    const SUFFIX: &'static str = "f16";
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

impl LogitElem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// Which per-token outputs to write (the loss, sum and count are always produced). Outputs not asked for
/// come back empty from every backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CeRequest {
    pub log_probs: bool,
    pub entropy: bool,
    pub lse: bool,
}

impl Default for CeRequest {
    fn default() -> Self {
        CeRequest {
            log_probs: true,
            entropy: true,
            lse: true,
        }
    }
}
