//! The fused linear cross-entropy's oracle: unfused, in f64. The logits `hidden · weightᵀ + bias` are
//! made whole (`[N, V]` f64: for checking, on small shapes), the masked cross-entropy oracle runs on
//! them, and the gradients follow by the chain rule: `d hidden = G · weight`, `d weight = Gᵀ · hidden`,
//! `d bias = Σ_rows G`, with `G = d loss / d logits`.

use super::gemm::{gemm, Mat, MatMut};
use super::loss::{masked_cross_entropy, CeReference};
use crate::loss::linear::{LinearCeGrads, LinearCeInput, LinearCeOutput};
use crate::loss::{CeOptions, CeRequest, Float, LogitElem};
use crate::Result;

/// The oracle's results, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearCeReference {
    /// The cross-entropy of the materialized logits (without their gradient).
    pub ce: CeReference,
    pub grad_hidden: Option<Vec<f64>>,
    pub grad_weight: Option<Vec<f64>>,
    pub grad_bias: Option<Vec<f64>>,
}

impl LinearCeReference {
    /// Rounded as the kernels' results are (f32 outputs, `d hidden` in the input's dtype, `d weight` and
    /// `d bias` in f32), the per-token outputs `request` asks for.
    pub fn to_output<T: LogitElem>(&self, request: CeRequest) -> LinearCeOutput<T> {
        let f32s = |g: &Option<Vec<f64>>| g.as_ref().map(|g| g.iter().map(|&x| x as f32).collect());
        LinearCeOutput {
            ce: self.ce.to_output(request),
            grad_hidden: self
                .grad_hidden
                .as_ref()
                .map(|g| g.iter().map(|&x| T::from_f32(x as f32)).collect()),
            grad_weight: f32s(&self.grad_weight),
            grad_bias: f32s(&self.grad_bias),
            chunk_rows: self.ce.log_probs.len(),
        }
    }
}

/// The fused linear cross-entropy of `input`, unfused in f64, with the gradients `grads` asks for
/// (`d bias` only with a bias).
pub fn linear_cross_entropy<T: Float>(
    input: &LinearCeInput<'_, T>,
    options: &CeOptions,
    grads: LinearCeGrads,
) -> Result<LinearCeReference> {
    input.validate(options)?;
    let (n, v, h) = (input.rows(), input.vocab(), input.hidden_size);
    let widen = |x: &[T]| x.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
    let (hidden, weight) = (widen(input.hidden), widen(input.weight));
    let mut logits = match input.bias {
        Some(bias) => widen(bias).repeat(n),
        None => vec![0.0; n * v],
    };
    gemm(
        1.0,
        Mat::rows(&hidden, n, h),
        Mat::rows(&weight, v, h).t(),
        1.0,
        MatMut {
            data: &mut logits,
            rows: n,
            cols: v,
        },
    );
    let mut ce = masked_cross_entropy(&input.ce_input(&logits), options, grads.any())?;
    let g = ce.grad.take();
    let g = g.as_deref().unwrap_or(&[]);
    let product = |wanted: bool, a: Mat<'_, f64>, b: Mat<'_, f64>| {
        wanted.then(|| {
            let mut out = vec![0.0; a.rows * b.cols];
            let (rows, cols) = (a.rows, b.cols);
            gemm(
                1.0,
                a,
                b,
                0.0,
                MatMut {
                    data: &mut out,
                    rows,
                    cols,
                },
            );
            out
        })
    };
    Ok(LinearCeReference {
        grad_hidden: product(grads.hidden, Mat::rows(g, n, v), Mat::rows(&weight, v, h)),
        grad_weight: product(
            grads.weight,
            Mat::rows(g, n, v).t(),
            Mat::rows(&hidden, n, h),
        ),
        grad_bias: (grads.bias && input.bias.is_some()).then(|| {
            let mut sums = vec![0.0; v];
            for row in g.chunks_exact(v) {
                sums.iter_mut().zip(row).for_each(|(s, x)| *s += x);
            }
            sums
        }),
        ce,
    })
}
