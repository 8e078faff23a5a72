//! Masked cross-entropy: the types every backend shares. The CPU oracle is
//! [`crate::backend::cpu::loss::masked_cross_entropy`] (f64); the fused kernel runs on the GPU
//! (`backend::cuda::MaskedCrossEntropy`) and on CPU threads (`backend::emulation`); every backend is
//! reached through [`crate::Device::cross_entropy`].
//!
//! A row is *trained* when its mask is true (no mask: every row) and its label is not the
//! `ignore_index` (when one is set). For every trained row, after the optional softcap
//! `x ← C·tanh(x / C)`: `lse = logsumexp(x)`, `log_prob = x[label] - lse`, `entropy = lse - Σ p·x`, the
//! argmax, and the row's loss term `w · (ce + z)` with `ce = (1 - ε)·(-log_prob) + ε·mean_j(-log p_j)`
//! (label smoothing ε, PyTorch's definition) and `z = s · lse²` (z-loss), `w` = 1 without weights. Rows
//! not trained are not read: their outputs are 0 (argmax -1) and their gradient rows zeros.

pub mod linear;
pub mod parallel;

use crate::{Error, Result};

/// How the summed loss `Σ w·(ce + z)` over trained rows is normalized. The gradient is scaled the same
/// way (times the upstream scalar).
#[derive(Clone, Copy, Debug, PartialEq, Default, serde::Serialize)]
pub enum Normalization {
    /// Divide by the number of trained rows; with none the loss is 0, never NaN.
    #[default]
    TokenMean,
    /// Packed sequences: the mean over each document's trained rows, then the mean over the documents
    /// that have any ([`CeInput::cu_seqlens`] says where the documents are; without it the whole batch
    /// is one document). A long document then weighs as much as a short one: each row's term is divided
    /// by its document's trained rows, and the sum by the number of such documents.
    SequenceMean,
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
    /// The denominator for `count` trained rows in `documents` documents that have any (0 means: the
    /// loss and gradient are 0).
    pub fn denominator(&self, count: usize, documents: usize) -> f64 {
        match *self {
            Normalization::TokenMean => count as f64,
            Normalization::SequenceMean => documents as f64,
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
            let d = self.denominator(0, 0);
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
    /// Rows whose label is this are not trained (PyTorch's `ignore_index`; -100 there by default).
    pub ignore_index: Option<i64>,
    /// z-loss scale `s`: `+ s · lse²` per trained row (PaLM; Liger's `lse_square_scale`). 0: none.
    pub z_loss: f32,
    /// Label smoothing `ε` in [0, 1], PyTorch's definition. 0: none.
    pub label_smoothing: f32,
    /// Logit softcapping `C·tanh(x / C)` before everything (Gemma 2), the gradient through it.
    pub softcap: Option<f32>,
}

impl Default for CeOptions {
    fn default() -> Self {
        CeOptions {
            normalization: Normalization::TokenMean,
            upstream: 1.0,
            ignore_index: None,
            z_loss: 0.0,
            label_smoothing: 0.0,
            softcap: None,
        }
    }
}

impl CeOptions {
    /// Refuse options outside their domain (a smoothing outside [0, 1], a non-positive softcap, a
    /// non-finite z-loss scale, a CS336 denominator that is not positive).
    pub fn validate(&self) -> Result<()> {
        self.normalization.validate()?;
        let bad = |name: &'static str, reason: String| Err(Error::InvalidOption { name, reason });
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return bad(
                "label_smoothing",
                format!("{} is not in [0, 1]", self.label_smoothing),
            );
        }
        if !self.z_loss.is_finite() {
            return bad("z_loss", format!("{} is not finite", self.z_loss));
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return bad("softcap", format!("{c} is not a positive number"));
            }
        }
        Ok(())
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
    /// Which rows are trained (one per row); `None`: every row whose label is not the ignore index.
    pub mask: Option<&'a [bool]>,
    /// Per-token weights `w[N]` (RL losses that weight tokens).
    pub weights: Option<&'a [f32]>,
    /// Document boundaries over the rows for [`Normalization::SequenceMean`] (`cu_seqlens` of the
    /// padding-free layout: document `d` is rows `cu[d]..cu[d + 1]`).
    pub cu_seqlens: Option<&'a [i32]>,
}

impl<'a, T> CeInput<'a, T> {
    /// Dense `[N, vocab]` logits, N = `mask.len()`.
    pub fn new(logits: &'a [T], vocab: usize, labels: Labels<'a>, mask: &'a [bool]) -> Self {
        CeInput {
            logits,
            shape: LogitsShape::dense(mask.len(), vocab),
            labels,
            mask: Some(mask),
            weights: None,
            cu_seqlens: None,
        }
    }

    /// Dense `[N, vocab]` logits, N = `labels.len()`, trained where the label is not `ignore_index` (set
    /// it in [`CeOptions::ignore_index`]).
    pub fn unmasked(logits: &'a [T], vocab: usize, labels: Labels<'a>) -> Self {
        CeInput {
            logits,
            shape: LogitsShape::dense(labels.len(), vocab),
            labels,
            mask: None,
            weights: None,
            cu_seqlens: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.validate_for_logits(self.logits.len())
    }

    /// [`CeInput::validate`] for logits of `logits_len` elements that are not in `self.logits` (the fused
    /// linear cross-entropy makes them a chunk at a time).
    pub(crate) fn validate_for_logits(&self, logits_len: usize) -> Result<()> {
        self.shape.validate(
            logits_len,
            self.labels.len(),
            self.mask.map_or(self.shape.rows, <[bool]>::len),
            self.weights.map(<[f32]>::len),
        )?;
        if let Some(cu) = self.cu_seqlens {
            validate_cu_seqlens(cu, self.shape.rows)?;
        }
        Ok(())
    }

    /// Whether row `r` is trained under `options`.
    pub fn trained(&self, r: usize, options: &CeOptions) -> bool {
        self.mask.is_none_or(|m| m[r]) && options.ignore_index != Some(self.labels.get(r))
    }
}

/// Document boundaries over `rows` rows: starting at 0, non-decreasing, ending at `rows`.
pub fn validate_cu_seqlens(cu: &[i32], rows: usize) -> Result<()> {
    let ok = cu.first() == Some(&0)
        && cu.last().is_some_and(|&l| l as usize == rows && l >= 0)
        && cu.windows(2).all(|w| w[0] <= w[1]);
    if ok {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "cu_seqlens must rise from 0 to the {rows} rows, not {:?}",
            &cu[..cu.len().min(8)]
        )))
    }
}

/// Results on the host, in the precision the kernels produce (f32; the gradient in the logits' dtype).
#[derive(Clone, Debug, PartialEq)]
pub struct CeOutput<T> {
    /// Per-token log-probability of the label (0 on rows not trained).
    pub log_probs: Vec<f32>,
    /// Per-token entropy (0 on rows not trained).
    pub entropy: Vec<f32>,
    /// Per-token logsumexp (0 on rows not trained).
    pub lse: Vec<f32>,
    /// Per-token argmax of the logits before any softcap (the first of equal maxima, as `torch.argmax`;
    /// -1 on rows not trained and on rows with a NaN).
    pub argmax: Vec<i32>,
    /// Per-token loss term `w · (ce + z)` (PyTorch's `reduction="none"`; divided by the document's
    /// trained rows under [`Normalization::SequenceMean`]), 0 on rows not trained.
    pub row_loss: Vec<f32>,
    /// The sum of the row terms, before normalization.
    pub sum: f32,
    /// `Σ w · s · lse²`: the z-loss part of `sum` (weighted as the row terms are).
    pub z_sum: f32,
    /// Number of trained rows.
    pub count: u32,
    /// Trained rows whose argmax is the label (token accuracy = correct / count), when argmax is asked
    /// for (0 otherwise).
    pub correct: u32,
    /// Documents with trained rows ([`Normalization::SequenceMean`]'s denominator; without
    /// `cu_seqlens` the batch is one document).
    pub documents: u32,
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

/// Which per-token outputs to write (the loss, sums and count are always produced). Outputs not asked
/// for come back empty from every backend, and the kernels skip the work (no entropy accumulator
/// without entropy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CeRequest {
    pub log_probs: bool,
    pub entropy: bool,
    pub lse: bool,
    /// The argmax per row and the count of correct rows (token accuracy).
    pub argmax: bool,
    /// The per-row loss terms.
    pub row_loss: bool,
}

impl Default for CeRequest {
    fn default() -> Self {
        CeRequest {
            log_probs: true,
            entropy: true,
            lse: true,
            argmax: true,
            row_loss: true,
        }
    }
}

impl CeRequest {
    /// The loss, sums and counts only.
    pub const NONE: CeRequest = CeRequest {
        log_probs: false,
        entropy: false,
        lse: false,
        argmax: false,
        row_loss: false,
    };
}
