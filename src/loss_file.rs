//! The masked cross-entropy of tensors in a safetensors file, on any device, with the results written to
//! another: what `sft-collate loss` runs, so users can check the kernels against their own framework's
//! numbers on their own data.
//!
//! Input tensors: `logits [..., V]` (F32, F16 or BF16), `labels [...]` (I32 or I64), `response_mask [...]`
//! (BOOL or U8; optional with an `ignore_index`), optionally `weights [...]` (F32) and `cu_seqlens [D + 1]`
//! (I32, document boundaries over the flattened rows, for the per-sequence mean; without it a `[B, T]`
//! batch has one document per row), where `[...]` is the logits' leading shape. Output tensors:
//! `log_probs`, `entropy`, `lse`, `row_loss` (F32, `[...]`), `argmax` (I64, `[...]`), `sum`, `loss`,
//! `z_sum` (F32 scalars), `count`, `correct`, `documents` (I64 scalars) and, with the gradient,
//! `grad_logits` (the logits' dtype and shape).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::io::write_atomically;
use crate::loss::{CeInput, CeOptions, CeOutput, CeRequest, Labels, LogitElem, Normalization};
use crate::{Device, Error, Result};

/// How the loss of a file is reduced (`--reduction` in the CLI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormalizationKind {
    /// Sum over trained tokens divided by their count.
    #[default]
    TokenMean,
    /// The plain sum.
    Sum,
    /// PyTorch's `reduction="none"`: the per-token losses (`row_loss`) are the result; the scalar and
    /// the gradient are those of their sum.
    None,
    /// The mean over each document's trained tokens, then over documents.
    SequenceMean,
    /// CS336: divided by normalize_constant × batch_size × gradient_accumulation_steps.
    Cs336,
}

crate::names::named_enum!(NormalizationKind as "reduction" {
    TokenMean = "token-mean",
    Sum = "sum",
    None = "none",
    SequenceMean = "sequence-mean",
    Cs336 = "cs336",
});

/// What to compute for a file.
#[derive(Clone, Debug)]
pub struct LossJob {
    pub normalization: NormalizationKind,
    /// CS336's constants; `batch_size: None` takes the leading dimension of `labels`.
    pub normalize_constant: f64,
    pub batch_size: Option<usize>,
    pub gradient_accumulation_steps: usize,
    /// Multiplies the gradient (d final loss / d this loss).
    pub upstream: f32,
    pub grad: bool,
    /// Labels equal to this are not trained (and then no `response_mask` is needed).
    pub ignore_index: Option<i64>,
    pub z_loss: f32,
    pub label_smoothing: f32,
    pub softcap: Option<f32>,
}

impl Default for LossJob {
    fn default() -> Self {
        LossJob {
            normalization: NormalizationKind::TokenMean,
            normalize_constant: 1.0,
            batch_size: None,
            gradient_accumulation_steps: 1,
            upstream: 1.0,
            grad: false,
            ignore_index: None,
            z_loss: 0.0,
            label_smoothing: 0.0,
            softcap: None,
        }
    }
}

/// The loss, sum and counts of a run, for a summary line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSummary {
    pub count: u32,
    pub correct: u32,
    pub documents: u32,
    pub sum: f32,
    pub z_sum: f32,
    pub loss: f32,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::InvalidOption {
        name: "input",
        reason: reason.into(),
    }
}

/// Read `input`, compute on `device`, write `output` (atomically; never over the input).
pub fn run_loss_file(
    input: &Path,
    output: &Path,
    job: &LossJob,
    device: &Device,
) -> Result<LossSummary> {
    if same_file(input, output) {
        return Err(Error::InvalidOption {
            name: "output",
            reason: format!("{} is the input file; choose another", output.display()),
        });
    }
    // The options first: a bad one is reported before any file is read.
    CeOptions {
        z_loss: job.z_loss,
        label_smoothing: job.label_smoothing,
        softcap: job.softcap,
        ..CeOptions::default()
    }
    .validate()?;
    let bytes = crate::io::read_file(input).map_err(|e| Error::io(input, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("{}: not safetensors ({e})", input.display())))?;
    let logits = tensor(&st, "logits")?;
    match logits.dtype() {
        Dtype::F32 => run_typed::<f32>(&st, output, job, device),
        Dtype::F16 => run_typed::<half::f16>(&st, output, job, device),
        Dtype::BF16 => run_typed::<half::bf16>(&st, output, job, device),
        other => Err(bad(format!(
            "logits are {other:?}; F32, F16 or BF16 expected"
        ))),
    }
}

/// Whether two paths name one file (the second may not exist yet).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn tensor<'a>(st: &'a SafeTensors<'a>, name: &str) -> Result<safetensors::tensor::TensorView<'a>> {
    st.tensor(name)
        .map_err(|_| bad(format!("no tensor \"{name}\"")))
}

fn run_typed<T: LogitElem>(
    st: &SafeTensors<'_>,
    output: &Path,
    job: &LossJob,
    device: &Device,
) -> Result<LossSummary> {
    let logits_view = tensor(st, "logits")?;
    let logits_shape = logits_view.shape().to_vec();
    let (&vocab, lead) = logits_shape
        .split_last()
        .ok_or_else(|| bad("logits must have at least one dimension"))?;
    let logits: Vec<T> = bytemuck::pod_collect_to_vec(logits_view.data());
    let labels_view = tensor(st, "labels")?;
    let (labels32, labels64): (Vec<i32>, Vec<i64>) = match labels_view.dtype() {
        Dtype::I32 => (bytemuck::pod_collect_to_vec(labels_view.data()), Vec::new()),
        Dtype::I64 => (Vec::new(), bytemuck::pod_collect_to_vec(labels_view.data())),
        other => return Err(bad(format!("labels are {other:?}; I32 or I64 expected"))),
    };
    let labels = match labels_view.dtype() {
        Dtype::I32 => Labels::I32(&labels32),
        _ => Labels::I64(&labels64),
    };
    let mask_view = match (st.tensor("response_mask").ok(), job.ignore_index) {
        (None, None) => return Err(bad(
            "no tensor \"response_mask\"; add one, or give an ignore index (--ignore-index -100) \
                 to train where the label is not it",
        )),
        (view, _) => view,
    };
    let mut shaped = vec![("labels", labels_view.shape())];
    if let Some(m) = &mask_view {
        if !matches!(m.dtype(), Dtype::BOOL | Dtype::U8) {
            return Err(bad(format!(
                "response_mask is {:?}; BOOL or U8 expected",
                m.dtype()
            )));
        }
        shaped.push(("response_mask", m.shape()));
    }
    let mask: Option<Vec<bool>> = mask_view
        .as_ref()
        .map(|m| m.data().iter().map(|&b| b != 0).collect());
    let weights_view = st.tensor("weights").ok();
    if let Some(w) = &weights_view {
        if w.dtype() != Dtype::F32 {
            return Err(bad(format!("weights are {:?}; F32 expected", w.dtype())));
        }
        shaped.push(("weights", w.shape()));
    }
    for (name, shape) in shaped {
        if shape != lead {
            return Err(bad(format!(
                "{name} has shape {shape:?}, logits lead with {lead:?}"
            )));
        }
    }
    let weights: Option<Vec<f32>> = weights_view.map(|w| bytemuck::pod_collect_to_vec(w.data()));
    let rows: usize = lead.iter().product();
    let cu_seqlens: Option<Vec<i32>> = match st.tensor("cu_seqlens").ok() {
        Some(cu) if cu.dtype() != Dtype::I32 || cu.shape().len() != 1 => {
            return Err(bad(format!(
                "cu_seqlens is {:?} {:?}; a 1-D I32 tensor expected",
                cu.dtype(),
                cu.shape()
            )))
        }
        Some(cu) => Some(bytemuck::pod_collect_to_vec(cu.data())),
        // A padded [B, T] batch: one document per row.
        None if lead.len() == 2 => Some((0..=lead[0]).map(|b| (b * lead[1]) as i32).collect()),
        None => None,
    };
    if let Some(cu) = &cu_seqlens {
        crate::loss::validate_cu_seqlens(cu, rows).map_err(|e| bad(e.to_string()))?;
    }
    let normalization = match job.normalization {
        NormalizationKind::TokenMean => Normalization::TokenMean,
        NormalizationKind::Sum | NormalizationKind::None => Normalization::Sum,
        NormalizationKind::SequenceMean => Normalization::SequenceMean,
        NormalizationKind::Cs336 => Normalization::Cs336 {
            normalize_constant: job.normalize_constant,
            batch_size: job.batch_size.unwrap_or(lead.first().copied().unwrap_or(1)),
            gradient_accumulation_steps: job.gradient_accumulation_steps,
        },
    };
    let options = CeOptions {
        normalization,
        upstream: job.upstream,
        ignore_index: job.ignore_index,
        z_loss: job.z_loss,
        label_smoothing: job.label_smoothing,
        softcap: job.softcap,
    };
    options.validate()?;
    let input = CeInput {
        mask: mask.as_deref(),
        weights: weights.as_deref(),
        cu_seqlens: cu_seqlens.as_deref(),
        ..CeInput::unmasked(&logits, vocab, labels)
    };
    input.validate()?;
    let out = device
        .cross_entropy(&input, &options, CeRequest::default(), job.grad)?
        .to_host()?;
    write_output(output, &out, lead, &logits_shape, logits_view.dtype())?;
    Ok(LossSummary {
        count: out.count,
        correct: out.correct,
        documents: out.documents,
        sum: out.sum,
        z_sum: out.z_sum,
        loss: out.loss,
    })
}

fn write_output<T: LogitElem>(
    path: &Path,
    out: &CeOutput<T>,
    lead: &[usize],
    logits_shape: &[usize],
    logits_dtype: Dtype,
) -> Result<()> {
    let [count, correct, documents] = [out.count, out.correct, out.documents].map(i64::from);
    fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>> {
        TensorView::new(dtype, shape, data).map_err(|e| Error::Safetensors(e.to_string()))
    }
    let f32s = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
    let (log_probs, entropy, lse) = (f32s(&out.log_probs), f32s(&out.entropy), f32s(&out.lse));
    let row_loss = f32s(&out.row_loss);
    // torch.argmax gives int64.
    let argmax: Vec<i64> = out.argmax.iter().map(|&a| i64::from(a)).collect();
    let scalar = |dtype, bytes| view(dtype, vec![], bytes);
    let mut tensors = vec![
        ("log_probs", view(Dtype::F32, lead.to_vec(), &log_probs)?),
        ("entropy", view(Dtype::F32, lead.to_vec(), &entropy)?),
        ("lse", view(Dtype::F32, lead.to_vec(), &lse)?),
        ("row_loss", view(Dtype::F32, lead.to_vec(), &row_loss)?),
        (
            "argmax",
            view(Dtype::I64, lead.to_vec(), bytemuck::cast_slice(&argmax))?,
        ),
        ("sum", scalar(Dtype::F32, bytemuck::bytes_of(&out.sum))?),
        ("loss", scalar(Dtype::F32, bytemuck::bytes_of(&out.loss))?),
        ("z_sum", scalar(Dtype::F32, bytemuck::bytes_of(&out.z_sum))?),
        ("count", scalar(Dtype::I64, bytemuck::bytes_of(&count))?),
        ("correct", scalar(Dtype::I64, bytemuck::bytes_of(&correct))?),
        (
            "documents",
            scalar(Dtype::I64, bytemuck::bytes_of(&documents))?,
        ),
    ];
    if let Some(grad) = &out.grad {
        tensors.push((
            "grad_logits",
            view(
                logits_dtype,
                logits_shape.to_vec(),
                bytemuck::cast_slice(grad),
            )?,
        ));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| Error::Safetensors(e.to_string()))?;
    write_atomically(path, &bytes)
}
