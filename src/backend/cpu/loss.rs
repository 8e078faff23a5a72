//! The CS336 companions of `tokenize_prompt_and_output`, on the CPU with f64 accumulation. They define the
//! numbers the fused masked cross-entropy kernel must reproduce.
//!
//! Logits come as `[N, V]` row-major slices (any leading batch dimensions flattened into `N`); the generic
//! tensors of `masked_normalize` / `masked_mean` come with an explicit shape. Every element type that
//! implements [`Float`] (f32, f64, `half::f16`, `half::bf16`) is widened to f64 before any arithmetic.

use crate::backend::abi::{CePartial, CeShardRow};
use crate::loss::parallel::{Communicator, RowPartial, VocabShard};
use crate::loss::Float;
use crate::{Error, Result};

/// Split a `[N, V]` buffer into rows, refusing a length that is not a multiple of `vocab`.
fn rows<T>(logits: &[T], vocab: usize) -> Result<std::slice::Chunks<'_, T>> {
    if vocab == 0 || logits.len() % vocab != 0 {
        return Err(Error::Shape(format!(
            "{} logits is not a whole number of rows of vocab {vocab}",
            logits.len()
        )));
    }
    Ok(logits.chunks(vocab))
}

/// A row of logits as the softmax sees it, with NaN and infinities treated as PyTorch does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Row {
    /// A finite max `m`, with `r = Σ e^(x-m) - 1` (every term but the max's own 1, so that `ln(1 + r)`
    /// keeps its precision when one logit dominates) and `u = Σ e^(x-m)·(m-x)`. Entries at -inf have
    /// probability 0 and add nothing.
    Finite { m: f64, r: f64, u: f64 },
    /// Every entry -inf: `logsumexp` is -inf and nothing else is defined (NaN).
    AllNegInf,
    /// A NaN somewhere: every output of the row is NaN.
    Nan,
    /// +inf somewhere and no NaN: `logsumexp` is +inf; a +inf entry's probability is NaN (inf - inf),
    /// any other entry's 0; the entropy is NaN.
    PosInf,
}

fn classify<T: Float>(row: &[T]) -> Row {
    let mut argmax = None;
    let mut max = f64::NEG_INFINITY;
    for (i, x) in row.iter().map(|x| x.to_f64()).enumerate() {
        if x.is_nan() {
            return Row::Nan;
        }
        if x > max {
            (argmax, max) = (Some(i), x);
        }
    }
    if max == f64::INFINITY {
        return if row.iter().any(|x| x.to_f64().is_nan()) {
            Row::Nan
        } else {
            Row::PosInf
        };
    }
    let Some(argmax) = argmax else {
        return Row::AllNegInf;
    };
    let (mut r, mut u) = (0.0, 0.0);
    for (i, x) in row.iter().map(|x| x.to_f64()).enumerate() {
        let e = (x - max).exp();
        if i != argmax && e > 0.0 {
            r += e;
            u += e * (max - x);
        }
    }
    Row::Finite { m: max, r, u }
}

impl Row {
    fn logsumexp(self) -> f64 {
        match self {
            Row::Finite { m, r, .. } => m + r.ln_1p(),
            Row::AllNegInf => f64::NEG_INFINITY,
            Row::Nan => f64::NAN,
            Row::PosInf => f64::INFINITY,
        }
    }

    /// `log p(label)` for the label's logit `x`: `(x - m) - ln(1 + r)`, in that order, so that no
    /// rounding of a large `m + ln(1 + r)` is subtracted from a large `x` (two equal maxima at 1e12 give
    /// exactly -ln 2).
    fn log_prob(self, x: f64) -> f64 {
        match self {
            Row::Finite { m, r, .. } => (x - m) - r.ln_1p(),
            Row::AllNegInf | Row::Nan => f64::NAN,
            Row::PosInf if x == f64::INFINITY => f64::NAN,
            Row::PosInf => f64::NEG_INFINITY,
        }
    }

    /// `H = lse - Σ p·x` as `ln(1 + r) + u / (1 + r)`: both terms are non-negative, so a peaked row
    /// (entropy near 0 next to logits of 1e4) loses nothing to cancellation.
    fn entropy(self) -> f64 {
        match self {
            Row::Finite { r, u, .. } => r.ln_1p() + u / (1.0 + r),
            _ => f64::NAN,
        }
    }

    /// `softmax(row)_i - onehot(label)_i` for entry `i` of logit `x`.
    fn softmax_minus_onehot(self, x: f64, is_label: bool) -> f64 {
        match self {
            // p - 1 at the label as -(r - expm1(x - m)) / (1 + r): no cancellation when p is near 1.
            Row::Finite { m, r, .. } if is_label => -(r - (x - m).exp_m1()) / (1.0 + r),
            Row::Finite { m, r, .. } => ((x - m) - r.ln_1p()).exp(),
            Row::AllNegInf | Row::Nan => f64::NAN,
            Row::PosInf if x == f64::INFINITY => f64::NAN,
            Row::PosInf => -f64::from(u8::from(is_label)),
        }
    }
}

/// `logsumexp` of one row: `m + ln(1 + Σ e^(x-m) - 1)`, shifted by the max so that no `exp` overflows.
/// -inf for a row of -inf, +inf with a +inf entry, NaN for a row with a NaN (as torch gives).
pub fn logsumexp<T: Float>(row: &[T]) -> f64 {
    classify(row).logsumexp()
}

/// Entropy of the softmax of one row, `H = lse - Σ p·x`, computed without cancellation (see `Row`).
/// Entries at -inf contribute 0; a row of -inf, with a +inf entry or with a NaN has no entropy (NaN).
pub fn entropy_of_row<T: Float>(row: &[T]) -> f64 {
    classify(row).entropy()
}

/// CS336 `compute_entropy`: the entropy of the next-token distribution at each of the `N` positions of
/// `logits [N, V]`.
pub fn compute_entropy<T: Float>(logits: &[T], vocab: usize) -> Result<Vec<f64>> {
    Ok(rows(logits, vocab)?.map(entropy_of_row).collect())
}

/// `log_softmax(logits)[label]` at each of the `N` positions: the per-token log-probability of the label
/// (what CS336's `get_response_log_probs` returns, computed from logits instead of a model). A label outside
/// `[0, V)` is an error, never an out-of-bounds read.
pub fn log_probs<T: Float, L: Copy + Into<i64>>(
    logits: &[T],
    vocab: usize,
    labels: &[L],
) -> Result<Vec<f64>> {
    let rows = rows(logits, vocab)?;
    if rows.len() != labels.len() {
        return Err(Error::LengthMismatch {
            what: "logits rows vs labels",
            left: rows.len(),
            right: labels.len(),
        });
    }
    rows.zip(labels)
        .enumerate()
        .map(|(row_index, (row, &label))| {
            let label: i64 = label.into();
            let at = usize::try_from(label).ok().filter(|&at| at < vocab).ok_or(
                Error::LabelOutOfRange {
                    row: row_index,
                    label,
                    vocab,
                },
            )?;
            Ok(classify(row).log_prob(row[at].to_f64()))
        })
        .collect()
}

/// Masked sum along `dim` (negative counts from the end, `None` sums everything), with the number of
/// masked elements in each output slot. Returns (sums, counts, output shape).
fn masked_reduce<T: Float>(
    x: &[T],
    mask: &[bool],
    shape: &[usize],
    dim: Option<isize>,
) -> Result<(Vec<f64>, Vec<usize>, Vec<usize>)> {
    let numel: usize = shape.iter().product();
    if x.len() != numel || mask.len() != numel {
        return Err(Error::Shape(format!(
            "shape {shape:?} has {numel} elements, tensor {} and mask {}",
            x.len(),
            mask.len()
        )));
    }
    let Some(dim) = dim else {
        let (sum, count) = x
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .fold((0.0, 0), |(s, c), (v, _)| (s + v.to_f64(), c + 1));
        return Ok((vec![sum], vec![count], vec![]));
    };
    let ndim = shape.len() as isize;
    let d = if dim < 0 { dim + ndim } else { dim };
    if !(0..ndim).contains(&d) {
        return Err(Error::Shape(format!(
            "dim {dim} out of range for shape {shape:?}"
        )));
    }
    let d = d as usize;
    // View the tensor as [outer, n, inner] and sum over the middle axis.
    let outer: usize = shape[..d].iter().product();
    let n = shape[d];
    let inner: usize = shape[d + 1..].iter().product();
    let mut sums = vec![0.0; outer * inner];
    let mut counts = vec![0; outer * inner];
    for o in 0..outer {
        for k in 0..n {
            for i in 0..inner {
                let at = (o * n + k) * inner + i;
                if mask[at] {
                    sums[o * inner + i] += x[at].to_f64();
                    counts[o * inner + i] += 1;
                }
            }
        }
    }
    let mut out_shape = shape.to_vec();
    out_shape.remove(d);
    Ok((sums, counts, out_shape))
}

/// CS336 `masked_normalize(tensor, mask, dim, normalize_constant)`: `sum(tensor * mask, dim) /
/// normalize_constant`. Returns the values and their shape (`[]` when `dim` is `None`).
pub fn masked_normalize<T: Float>(
    x: &[T],
    mask: &[bool],
    shape: &[usize],
    dim: Option<isize>,
    normalize_constant: f64,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let (sums, _, out_shape) = masked_reduce(x, mask, shape, dim)?;
    Ok((
        sums.into_iter().map(|s| s / normalize_constant).collect(),
        out_shape,
    ))
}

/// CS336 `masked_mean(tensor, mask, dim)`: the mean over masked elements. A slot with no masked element is
/// NaN (0/0), as upstream; use [`crate::BatchStats::empty_response_rows`] to drop such rows first.
pub fn masked_mean<T: Float>(
    x: &[T],
    mask: &[bool],
    shape: &[usize],
    dim: Option<isize>,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let (sums, counts, out_shape) = masked_reduce(x, mask, shape, dim)?;
    Ok((
        sums.iter()
            .zip(&counts)
            .map(|(&s, &c)| s / c as f64)
            .collect(),
        out_shape,
    ))
}

/// The loss of CS336 `sft_microbatch_train_step` and its gradient with respect to `log_probs`, for
/// `log_probs` and `mask` of shape `[batch_size, T]`:
///
/// `loss = -Σ(log_probs · mask) / (normalize_constant · batch_size · gradient_accumulation_steps)`, and
/// `d loss / d log_probs = -mask / (normalize_constant · batch_size · gradient_accumulation_steps)`.
pub fn sft_microbatch_loss<T: Float>(
    log_probs: &[T],
    mask: &[bool],
    batch_size: usize,
    gradient_accumulation_steps: usize,
    normalize_constant: f64,
) -> Result<(f64, Vec<f64>)> {
    if batch_size == 0 || log_probs.len() % batch_size != 0 {
        return Err(Error::Shape(format!(
            "{} log-probs is not a whole number of rows of a batch of {batch_size}",
            log_probs.len()
        )));
    }
    if gradient_accumulation_steps == 0 {
        return Err(Error::InvalidOption {
            name: "gradient_accumulation_steps",
            reason: "must be at least 1".into(),
        });
    }
    let shape = [log_probs.len()];
    let (sum, _) = masked_normalize(log_probs, mask, &shape, None, 1.0)?;
    let denominator = normalize_constant * batch_size as f64 * gradient_accumulation_steps as f64;
    let grad = mask
        .iter()
        .map(|&m| if m { -1.0 / denominator } else { 0.0 })
        .collect();
    Ok((-sum[0] / denominator, grad))
}

/// The masked cross-entropy of [`crate::loss`], in f64: the oracle of the fused kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct CeReference {
    pub log_probs: Vec<f64>,
    pub entropy: Vec<f64>,
    pub lse: Vec<f64>,
    /// The first maximum of the raw logits (-1 on rows not trained and on rows with a NaN).
    pub argmax: Vec<i32>,
    /// Per row `w · (ce + z)` (divided by the document's trained rows under per-sequence means).
    pub row_loss: Vec<f64>,
    /// The sum of the row terms.
    pub sum: f64,
    /// The z-loss part of `sum`.
    pub z_sum: f64,
    pub count: usize,
    /// Trained rows whose argmax is the label.
    pub correct: usize,
    /// Documents with trained rows.
    pub documents: usize,
    pub loss: f64,
    /// `d loss / d logits`, dense `[N, vocab]`, when asked for.
    pub grad: Option<Vec<f64>>,
}

impl CeReference {
    /// Round to what the kernels produce (f32 values, the gradient in the logits' dtype), keeping the
    /// per-token outputs `request` asks for (the others come back empty, as from every backend).
    pub fn to_output<T: crate::loss::LogitElem>(
        &self,
        request: crate::loss::CeRequest,
    ) -> crate::loss::CeOutput<T> {
        let f32s = |wanted: bool, v: &[f64]| match wanted {
            true => v.iter().map(|&x| x as f32).collect(),
            false => Vec::new(),
        };
        crate::loss::CeOutput {
            log_probs: f32s(request.log_probs, &self.log_probs),
            entropy: f32s(request.entropy, &self.entropy),
            lse: f32s(request.lse, &self.lse),
            argmax: match request.argmax {
                true => self.argmax.clone(),
                false => Vec::new(),
            },
            row_loss: f32s(request.row_loss, &self.row_loss),
            sum: self.sum as f32,
            z_sum: self.z_sum as f32,
            count: self.count as u32,
            correct: if request.argmax {
                self.correct as u32
            } else {
                0
            },
            documents: self.documents as u32,
            loss: self.loss as f32,
            grad: self
                .grad
                .as_ref()
                .map(|g| g.iter().map(|&x| T::from_f32(x as f32)).collect()),
        }
    }
}

/// `torch.argmax` of a row: the first maximum; -1 for a row with a NaN (torch would point at the NaN;
/// such a row has no meaningful prediction, and its loss is NaN anyway).
fn argmax<T: Float>(row: &[T]) -> i32 {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in row.iter().map(|x| x.to_f64()).enumerate() {
        if x.is_nan() {
            return -1;
        }
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0 as i32
}

/// The document of every row (`cu_seqlens` boundaries; without them one document) and each document's
/// number of trained rows.
fn documents(cu_seqlens: Option<&[i32]>, trained: &[bool]) -> (Vec<usize>, Vec<usize>) {
    let bounds: Vec<usize> = match cu_seqlens {
        Some(cu) => cu.iter().map(|&c| c as usize).collect(),
        None => vec![0, trained.len()],
    };
    let mut doc_of = vec![0; trained.len()];
    let mut per_doc = vec![0; bounds.len() - 1];
    for (d, w) in bounds.windows(2).enumerate() {
        for r in w[0]..w[1] {
            doc_of[r] = d;
            per_doc[d] += usize::from(trained[r]);
        }
    }
    (doc_of, per_doc)
}

/// What the loss and gradient of one trained row need: its softmax statistics, its label's logit
/// (after the softcap), PyTorch's smoothing term `mean_j(-log p_j)`, the argmax of the raw logits, and
/// the row's logits after the softcap in the columns at hand (for the gradient).
#[derive(Clone, Debug)]
struct RowStats {
    kind: Row,
    x_label: f64,
    smooth: f64,
    argmax: i32,
    x: Vec<f64>,
}

/// The logits of one row after the optional softcap.
fn capped<T: Float>(raw: &[T], cap: Option<f64>) -> Vec<f64> {
    raw.iter()
        .map(|v| {
            let v = v.to_f64();
            cap.map_or(v, |c| c * (v / c).tanh())
        })
        .collect()
}

/// The rows an input trains, each trained row's label checked against a vocabulary of `vocab` (before
/// anything is computed).
fn trained_rows<T>(
    input: &crate::loss::CeInput<'_, T>,
    options: &crate::loss::CeOptions,
    vocab: usize,
) -> Result<Vec<bool>> {
    input.validate()?;
    options.validate()?;
    let trained: Vec<bool> = (0..input.shape.rows)
        .map(|r| input.trained(r, options))
        .collect();
    for row in (0..trained.len()).filter(|&r| trained[r]) {
        let label = input.labels.get(row);
        if !usize::try_from(label).is_ok_and(|l| l < vocab) {
            return Err(Error::LabelOutOfRange { row, label, vocab });
        }
    }
    Ok(trained)
}

/// Masked cross-entropy on the CPU in f64 with every option of [`crate::loss::CeOptions`]: per-token
/// log-probs, entropy, logsumexp, argmax and loss terms over trained rows, the sums, counts, the
/// normalized loss and, with `with_grad`, `d loss / d logits`. For a trained row of raw logits `x`,
/// `x' = C·tanh(x / C)` with a softcap (else `x' = x`), `p = softmax(x')`:
///
/// `d loss / d x_i = scale · w · [(1 + 2s·lse)·p_i - (1 - ε)·1[i = label] - ε / V] · dx'_i/dx_i`
///
/// with `scale = upstream / denominator` (and `w` divided by the document's trained rows under
/// per-sequence means). A label outside `[0, vocab)` on a trained row is an error.
///
/// Non-finite logits, as PyTorch: a NaN anywhere in a trained row makes its log-prob, entropy, lse,
/// loss term and gradient row NaN (and so the loss); a row of only -inf has lse -inf and everything
/// else NaN; a +inf entry gives lse +inf, log-prob -inf (NaN when the label's logit is the +inf),
/// entropy NaN, and a gradient of NaN at +inf entries, -1·scale·w at a finite label, 0 elsewhere. The
/// options' terms are added only when set (a z-loss scale of 0 adds nothing, not `0 · inf`).
pub fn masked_cross_entropy<T: Float>(
    input: &crate::loss::CeInput<'_, T>,
    options: &crate::loss::CeOptions,
    with_grad: bool,
) -> Result<CeReference> {
    let shape = input.shape;
    let vocab = shape.vocab;
    let trained = trained_rows(input, options, vocab)?;
    let cap = options.softcap.map(f64::from);
    let stats = (0..shape.rows)
        .map(|row| {
            trained[row].then(|| {
                let raw = &input.logits[row * shape.row_stride..row * shape.row_stride + vocab];
                let x = capped(raw, cap);
                let kind = classify(&x);
                // PyTorch's smoothing term mean_j(-log p_j) = lse - mean(x'), as ln(1 + r) + mean(m - x').
                let smooth = match kind {
                    Row::Finite { m, r, .. } => {
                        r.ln_1p() + x.iter().map(|&v| m - v).sum::<f64>() / vocab as f64
                    }
                    _ => f64::NAN,
                };
                RowStats {
                    kind,
                    x_label: x[input.labels.get(row) as usize],
                    smooth,
                    argmax: argmax(raw),
                    x,
                }
            })
        })
        .collect::<Vec<_>>();
    Ok(finish(input, options, with_grad, 0, vocab, &stats))
}

/// Outputs, loss and gradient from each trained row's statistics. The input's columns are
/// `start..start + shape.vocab` of a vocabulary of `vocab` (all of it, or one rank's shard): the
/// gradient covers those columns.
fn finish<T: Float>(
    input: &crate::loss::CeInput<'_, T>,
    options: &crate::loss::CeOptions,
    with_grad: bool,
    start: usize,
    vocab: usize,
    stats: &[Option<RowStats>],
) -> CeReference {
    let shape = input.shape;
    let (n, width) = (shape.rows, shape.vocab);
    let trained: Vec<bool> = stats.iter().map(Option::is_some).collect();
    let (_, per_doc) = documents(input.cu_seqlens, &trained);
    let weights = row_weights(input, options, &trained);
    let (eps, s) = (
        f64::from(options.label_smoothing),
        f64::from(options.z_loss),
    );
    let cap = options.softcap.map(f64::from);
    let mut out = CeReference {
        log_probs: vec![0.0; n],
        entropy: vec![0.0; n],
        lse: vec![0.0; n],
        argmax: vec![-1; n],
        row_loss: vec![0.0; n],
        sum: 0.0,
        z_sum: 0.0,
        count: 0,
        correct: 0,
        documents: per_doc.iter().filter(|&&c| c > 0).count(),
        loss: 0.0,
        grad: with_grad.then(|| vec![0.0; n * width]),
    };
    for (row, stat) in stats.iter().enumerate() {
        let Some(stat) = stat else { continue };
        let kind = stat.kind;
        let label = input.labels.get(row);
        let w = weights[row];
        let lse = kind.logsumexp();
        let log_prob = kind.log_prob(stat.x_label);
        let ce = if eps > 0.0 {
            (1.0 - eps) * -log_prob + eps * stat.smooth
        } else {
            -log_prob
        };
        let z = if s != 0.0 { s * lse * lse } else { 0.0 };
        out.lse[row] = lse;
        out.log_probs[row] = log_prob;
        out.entropy[row] = kind.entropy();
        out.argmax[row] = stat.argmax;
        out.row_loss[row] = w * (ce + z);
        out.sum += out.row_loss[row];
        out.z_sum += w * z;
        out.count += 1;
        out.correct += usize::from(i64::from(stat.argmax) == label);
    }
    let denominator = options.normalization.denominator(out.count, out.documents);
    out.loss = if denominator > 0.0 {
        out.sum / denominator
    } else {
        0.0
    };
    if let Some(grad) = &mut out.grad {
        let scale = if denominator > 0.0 {
            f64::from(options.upstream) / denominator
        } else {
            0.0
        };
        for (row, stat) in stats.iter().enumerate() {
            let Some(stat) = stat else { continue };
            let kind = stat.kind;
            let raw = &input.logits[row * shape.row_stride..row * shape.row_stride + width];
            let x = &stat.x;
            // The label's column here, if it is one of this input's.
            let label = (input.labels.get(row) as usize).checked_sub(start);
            let lse = out.lse[row];
            let at_label = label_gradient(kind, stat.x_label, lse, s, eps, vocab);
            for (i, g) in grad[row * width..(row + 1) * width].iter_mut().enumerate() {
                let mut d = if label == Some(i) {
                    at_label
                } else if s != 0.0 {
                    (1.0 + 2.0 * s * lse) * kind.softmax_minus_onehot(x[i], false)
                } else {
                    kind.softmax_minus_onehot(x[i], false)
                };
                if eps > 0.0 && label != Some(i) {
                    d -= eps / vocab as f64;
                }
                if let Some(c) = cap {
                    // d(C·tanh(x/C))/dx = 1 - tanh² = 1 / cosh², without cancellation near |tanh| = 1.
                    let cosh = (raw[i].to_f64() / c).cosh();
                    d /= cosh * cosh;
                }
                *g = scale * weights[row] * d;
            }
        }
    }
    out
}

/// Each row's weight: the per-token weight (1 without), divided by its document's trained rows under
/// per-sequence means; 0 for rows not trained.
fn row_weights<T>(
    input: &crate::loss::CeInput<'_, T>,
    options: &crate::loss::CeOptions,
    trained: &[bool],
) -> Vec<f64> {
    let (doc_of, per_doc) = documents(input.cu_seqlens, trained);
    let sequence_mean = options.normalization == crate::loss::Normalization::SequenceMean;
    (0..trained.len())
        .map(|row| match trained[row] {
            false => 0.0,
            true => {
                f64::from(input.weights.map_or(1.0, |w| w[row]))
                    / if sequence_mean {
                        per_doc[doc_of[row]] as f64
                    } else {
                        1.0
                    }
            }
        })
        .collect()
}

/// The bracket of the gradient at a trained row's label (before the softcap's derivative and the
/// scale): `(1 + 2s·lse)·p - (1 - ε) - ε/V` as `(p - 1) + 2s·lse·p + ε - ε/V`, with `p - 1` taken without
/// cancellation.
fn label_gradient(kind: Row, x_label: f64, lse: f64, s: f64, eps: f64, vocab: usize) -> f64 {
    let z = if s != 0.0 {
        2.0 * s * lse * kind.softmax_minus_onehot(x_label, false)
    } else {
        0.0
    };
    let d = kind.softmax_minus_onehot(x_label, true) + z;
    if eps > 0.0 {
        d + (eps - eps / vocab as f64)
    } else {
        d
    }
}

/// One trained row's [`RowPartial`] over this rank's columns `x` (after the softcap; `raw` before it),
/// which start at column `start`; `label` is the label's column here, if it is one of them.
fn row_partial<T: Float>(raw: &[T], x: &[f64], start: usize, label: Option<usize>) -> RowPartial {
    let mut p = RowPartial {
        max: f64::NEG_INFINITY,
        argmax_value: f64::NEG_INFINITY,
        argmax: start as f64,
        ..RowPartial::default()
    };
    let mut flags = 0;
    if let Some(l) = label {
        p.label = x[l];
        flags |= RowPartial::HAS_LABEL;
    }
    match classify(x) {
        Row::Nan => flags |= RowPartial::NAN,
        Row::PosInf => flags |= RowPartial::POS_INF,
        Row::Finite { m, r, u } => {
            (p.max, p.r, p.u) = (m, r, u);
            p.spread = x.iter().map(|&v| m - v).sum();
        }
        // Every column -inf: each is infinitely below any finite maximum elsewhere.
        Row::AllNegInf => p.spread = f64::INFINITY,
    }
    let best = argmax(raw);
    p.argmax_value = match best {
        -1 => f64::NAN,
        b => raw
            .get(b as usize)
            .map_or(f64::NEG_INFINITY, |v| v.to_f64()),
    };
    p.argmax = if best < 0 {
        -1.0
    } else {
        (start + best as usize) as f64
    };
    p.flags = f64::from(flags);
    p
}

/// The whole row's statistics from every rank's partial (`widths[k]`: rank k's columns, at least one),
/// in a vocabulary of `vocab` (without this rank's columns: the CPU's gradient adds them).
fn merge_partials(parts: &[RowPartial], widths: &[usize], vocab: usize) -> RowStats {
    let x_label = parts
        .iter()
        .find(|p| p.has(RowPartial::HAS_LABEL))
        .map_or(f64::NAN, |p| p.label);
    let argmax = if parts.iter().any(|p| p.argmax < 0.0) {
        -1
    } else {
        // The largest value, the first column among equals (`torch.argmax`).
        parts
            .iter()
            .fold(None::<(f64, f64)>, |best, p| match best {
                Some((v, i)) if v > p.argmax_value || (v == p.argmax_value && i < p.argmax) => {
                    Some((v, i))
                }
                _ => Some((p.argmax_value, p.argmax)),
            })
            .map_or(-1, |(_, i)| i as i32)
    };
    let kind = if parts.iter().any(|p| p.has(RowPartial::NAN)) {
        Row::Nan
    } else if parts.iter().any(|p| p.has(RowPartial::POS_INF)) {
        Row::PosInf
    } else {
        let m = parts
            .iter()
            .map(|p| p.max)
            .fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            Row::AllNegInf
        } else {
            // The first rank holding the maximum keeps its `r` (its own 1 is the one left out); every
            // other rank's sum `1 + r` is rescaled to the common maximum.
            let first = parts
                .iter()
                .position(|p| p.max == m)
                .expect("m is some rank's max");
            let (mut r, mut u) = (0.0, 0.0);
            for (k, p) in parts
                .iter()
                .enumerate()
                .filter(|(_, p)| p.max > f64::NEG_INFINITY)
            {
                let scale = (p.max - m).exp();
                r += if k == first { p.r } else { (1.0 + p.r) * scale };
                u += scale * ((1.0 + p.r) * (m - p.max) + p.u);
            }
            Row::Finite { m, r, u }
        }
    };
    let smooth = match kind {
        Row::Finite { m, r, .. } => {
            let spread: f64 = parts
                .iter()
                .zip(widths)
                .map(|(p, &w)| match p.max > f64::NEG_INFINITY {
                    true => p.spread + w as f64 * (m - p.max),
                    false => p.spread,
                })
                .sum();
            r.ln_1p() + spread / vocab as f64
        }
        _ => f64::NAN,
    };
    RowStats {
        kind,
        x_label,
        smooth,
        argmax,
        x: Vec::new(),
    }
}

/// [`masked_cross_entropy`] when the vocabulary is split over the ranks of `comm`: `input` holds this
/// rank's columns (`shard.start..` of `shard.vocab`; its `shape.vocab` is their number), labels are ids
/// in the whole vocabulary, and every rank passes the same rows, labels, mask, weights and options.
/// Every rank gets the whole vocabulary's per-row outputs, sums and loss, and the gradient of its own
/// columns: together, what [`masked_cross_entropy`] gives on the unsplit logits. Two exchanges: the
/// shards and each rank's verdict on its input (so that a bad input on one rank fails every rank
/// instead of leaving the others waiting), then one [`RowPartial`] per trained row.
pub fn vocab_parallel_cross_entropy<T: Float>(
    input: &crate::loss::CeInput<'_, T>,
    shard: VocabShard,
    options: &crate::loss::CeOptions,
    comm: &dyn Communicator,
    with_grad: bool,
) -> Result<CeReference> {
    let (trained, widths) = shard_handshake(input, shard, options, comm)?;
    let shape = input.shape;
    let width = shape.vocab;
    let cap = options.softcap.map(f64::from);
    let rows: Vec<usize> = (0..shape.rows).filter(|&r| trained[r]).collect();
    // Each trained row's columns after the softcap (kept for the gradient) and their partial.
    let (xs, partials): (Vec<Vec<f64>>, Vec<RowPartial>) = rows
        .iter()
        .map(|&row| {
            let raw = &input.logits[row * shape.row_stride..row * shape.row_stride + width];
            let label = (input.labels.get(row) as usize)
                .checked_sub(shard.start)
                .filter(|&l| l < width);
            let x = capped(raw, cap);
            let partial = row_partial(raw, &x, shard.start, label);
            (x, partial)
        })
        .unzip();
    let mut stats = gather_and_merge(&partials, &rows, &widths, shard.vocab, shape.rows, comm)?;
    for (&row, x) in rows.iter().zip(xs) {
        if let Some(stat) = &mut stats[row] {
            stat.x = x;
        }
    }
    Ok(finish(
        input,
        options,
        with_grad,
        shard.start,
        shard.vocab,
        &stats,
    ))
}

/// The vocabulary-parallel protocol for a device backend, which computes the partials and the gradient
/// itself: the same exchanges as [`vocab_parallel_cross_entropy`] (so ranks on different backends can be
/// one group), `partials` called once the input is checked for the kernel's partial of every row (those
/// of rows not trained are ignored), the outputs from the merged statistics in f64, and, with
/// `with_grad`, one [`CeShardRow`] per row (trained rows only meaningful) from which the kernel makes the
/// gradient of this rank's columns.
#[cfg_attr(not(any(feature = "emulation", feature = "cuda")), allow(dead_code))]
pub(crate) fn vocab_parallel_from_partials<T: Float>(
    input: &crate::loss::CeInput<'_, T>,
    shard: VocabShard,
    options: &crate::loss::CeOptions,
    comm: &dyn Communicator,
    with_grad: bool,
    partials: impl FnOnce() -> Result<Vec<CePartial>>,
) -> Result<(CeReference, Option<Vec<CeShardRow>>)> {
    let (trained, widths) = shard_handshake(input, shard, options, comm)?;
    let rows: Vec<usize> = (0..trained.len()).filter(|&r| trained[r]).collect();
    let all = partials()?;
    assert_eq!(all.len(), trained.len(), "a partial per row");
    let local: Vec<RowPartial> = rows
        .iter()
        .map(|&r| all[r].exchanged(shard.start))
        .collect();
    let stats = gather_and_merge(&local, &rows, &widths, shard.vocab, trained.len(), comm)?;
    let reference = finish(input, options, false, shard.start, shard.vocab, &stats);
    let shard_rows = with_grad.then(|| {
        let denominator = options
            .normalization
            .denominator(reference.count, reference.documents);
        let scale = if denominator > 0.0 {
            f64::from(options.upstream) / denominator
        } else {
            0.0
        };
        let weights = row_weights(input, options, &trained);
        let (eps, s) = (
            f64::from(options.label_smoothing),
            f64::from(options.z_loss),
        );
        stats
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(row, (stat, w))| {
                let Some(stat) = stat else {
                    return CeShardRow::default();
                };
                let kind = stat.kind;
                let lse = reference.lse[row];
                let (m, log_s) = match kind {
                    Row::Finite { m, r, .. } => (m, r.ln_1p()),
                    Row::AllNegInf => (f64::NEG_INFINITY, 0.0),
                    Row::Nan => (f64::NAN, 0.0),
                    Row::PosInf => (f64::INFINITY, 0.0),
                };
                let label_term = label_gradient(kind, stat.x_label, lse, s, eps, shard.vocab);
                CeShardRow {
                    m: m as f32,
                    log_s: log_s as f32,
                    coef: (scale * w) as f32,
                    zf: if s != 0.0 {
                        (1.0 + 2.0 * s * lse) as f32
                    } else {
                        1.0
                    },
                    label_term: label_term as f32,
                    eps_v: if eps > 0.0 {
                        (eps / shard.vocab as f64) as f32
                    } else {
                        0.0
                    },
                }
            })
            .collect()
    });
    Ok((reference, shard_rows))
}

/// The first exchange of a vocabulary-parallel call: every rank's shard, rows, trained rows and verdict
/// on its input, so that a bad input on one rank fails every rank. Returns the trained rows and each
/// rank's number of columns.
fn shard_handshake<T>(
    input: &crate::loss::CeInput<'_, T>,
    shard: VocabShard,
    options: &crate::loss::CeOptions,
    comm: &dyn Communicator,
) -> Result<(Vec<bool>, Vec<usize>)> {
    let width = input.shape.vocab;
    let local = match shard
        .start
        .checked_add(width)
        .filter(|&end| end <= shard.vocab)
    {
        Some(_) => trained_rows(input, options, shard.vocab),
        None => Err(Error::Shape(format!(
            "columns {}..{} are outside a vocabulary of {}",
            shard.start,
            shard.start.saturating_add(width),
            shard.vocab
        ))),
    };
    let trained_count = local
        .as_ref()
        .map_or(0, |t| t.iter().filter(|&&t| t).count());
    let record = [
        shard.vocab as u64,
        shard.start as u64,
        width as u64,
        input.shape.rows as u64,
        trained_count as u64,
        u64::from(local.is_ok()),
    ];
    let table: Vec<u64> =
        bytemuck::pod_collect_to_vec(&comm.all_gather(bytemuck::cast_slice(&record))?);
    let ranks: Vec<&[u64]> = table.chunks(record.len()).collect();
    let trained = local?;
    if let Some(k) = ranks.iter().position(|r| r[5] == 0) {
        return Err(Error::Collective(format!("rank {k} refused its input")));
    }
    if ranks
        .iter()
        .any(|r| r[0] != record[0] || r[3] != record[3] || r[4] != record[4])
    {
        return Err(Error::Collective(format!(
            "ranks disagree on the vocabulary, the rows or the trained rows: {:?}",
            ranks.iter().map(|r| (r[0], r[3], r[4])).collect::<Vec<_>>()
        )));
    }
    let mut spans: Vec<(u64, u64)> = ranks.iter().map(|r| (r[1], r[1] + r[2])).collect();
    spans.sort_unstable();
    let tiled = spans
        .iter()
        .try_fold(0, |end, &(a, b)| (a == end).then_some(b))
        == Some(shard.vocab as u64);
    if !tiled {
        return Err(Error::Collective(format!(
            "the ranks' columns {spans:?} do not tile a vocabulary of {}",
            shard.vocab
        )));
    }
    Ok((trained, ranks.iter().map(|r| r[2] as usize).collect()))
}

/// The second exchange: every rank's partials of the trained `rows` (in row order), merged per row into
/// the whole vocabulary's statistics (`None` for rows not trained; `x` left empty).
fn gather_and_merge(
    partials: &[RowPartial],
    rows: &[usize],
    widths: &[usize],
    vocab: usize,
    n: usize,
    comm: &dyn Communicator,
) -> Result<Vec<Option<RowStats>>> {
    let all: Vec<RowPartial> =
        bytemuck::pod_collect_to_vec(&comm.all_gather(bytemuck::cast_slice(partials))?);
    let mut stats = vec![None; n];
    for (i, &row) in rows.iter().enumerate() {
        let parts: Vec<RowPartial> = (0..widths.len()).map(|k| all[k * rows.len() + i]).collect();
        stats[row] = Some(merge_partials(&parts, widths, vocab));
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_row_has_log_vocab_entropy() {
        let row = [0.5f32; 7];
        assert!((entropy_of_row(&row) - 7f64.ln()).abs() < 1e-12);
        // A peaked row next to large logits: tiny but exact, not lost to cancellation.
        let peaked = [1e4f64, 1e4 - 30.0];
        let p = (-30f64).exp() / (1.0 + (-30f64).exp());
        let want = -(p * p.ln() + (1.0 - p) * (-p).ln_1p());
        assert!((entropy_of_row(&peaked) - want).abs() < 1e-12 * want);
    }

    #[test]
    fn minus_infinity_entries_do_not_poison_the_entropy() {
        let row = [0.0f32, f32::NEG_INFINITY, 0.0];
        assert!((entropy_of_row(&row) - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn extreme_logits_stay_finite() {
        let row = [1e4f32, -1e4, 0.0];
        assert!(entropy_of_row(&row).abs() < 1e-12);
        let lp = log_probs(&row, 3, &[1i64]).unwrap();
        assert!((lp[0] + 2e4).abs() < 1e-6);
    }

    #[test]
    fn dtypes_agree_on_representable_values() {
        let f: Vec<f32> = vec![0.5, -1.0, 2.0, 0.25];
        let h: Vec<half::f16> = f.iter().map(|&x| half::f16::from_f32(x)).collect();
        let b: Vec<half::bf16> = f.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let e = compute_entropy(&f, 4).unwrap();
        assert_eq!(e, compute_entropy(&h, 4).unwrap());
        assert_eq!(e, compute_entropy(&b, 4).unwrap());
    }

    #[test]
    fn bad_labels_and_shapes_are_errors() {
        let row = [0f32; 4];
        assert!(matches!(
            log_probs(&row, 4, &[4i64]),
            Err(Error::LabelOutOfRange { label: 4, .. })
        ));
        assert!(matches!(
            log_probs(&row, 4, &[-1i32]),
            Err(Error::LabelOutOfRange { label: -1, .. })
        ));
        assert!(matches!(compute_entropy(&row, 3), Err(Error::Shape(_))));
        assert!(matches!(
            masked_mean(&row, &[true; 4], &[2, 2], Some(2)),
            Err(Error::Shape(_))
        ));
    }

    #[test]
    fn masked_mean_of_nothing_is_nan() {
        let (m, shape) = masked_mean(&[1f32, 2.0], &[false, false], &[2], Some(0)).unwrap();
        assert!(m[0].is_nan());
        assert!(shape.is_empty());
    }
}
