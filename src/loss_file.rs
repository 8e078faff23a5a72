//! The masked cross-entropy of tensors in a safetensors file, on any device, with the results written to
//! another: what `sft-collate loss` runs, so users can check the kernels against their own framework's
//! numbers on their own data.
//!
//! Input tensors: `logits [..., V]` (F32, F16 or BF16), `labels [...]` (I32 or I64), `response_mask [...]`
//! (BOOL or U8) and optionally `weights [...]` (F32), where `[...]` is the logits' leading shape. Output
//! tensors: `log_probs`, `entropy`, `lse` (F32, `[...]`), `sum`, `loss` (F32 scalars), `count` (I64
//! scalar) and, with the gradient, `grad_logits` (the logits' dtype and shape).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::io::write_atomically;
use crate::loss::{CeInput, CeOptions, CeOutput, CeRequest, Labels, LogitElem, Normalization};
use crate::{Device, Error, Result};

/// How the loss of a file is normalized (`normalization` in the CLI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormalizationKind {
    /// Sum over masked tokens divided by their count.
    #[default]
    TokenMean,
    /// The plain sum.
    Sum,
    /// CS336: divided by normalize_constant × batch_size × gradient_accumulation_steps.
    Cs336,
}

crate::names::named_enum!(NormalizationKind {
    TokenMean = "token-mean",
    Sum = "sum",
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
        }
    }
}

/// The loss, sum and count of a run, for a summary line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSummary {
    pub count: u32,
    pub sum: f32,
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
    let bytes = std::fs::read(input).map_err(|e| Error::io(input, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
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
    let mask_view = tensor(st, "response_mask")?;
    if !matches!(mask_view.dtype(), Dtype::BOOL | Dtype::U8) {
        return Err(bad(format!(
            "response_mask is {:?}; BOOL or U8 expected",
            mask_view.dtype()
        )));
    }
    let mask: Vec<bool> = mask_view.data().iter().map(|&b| b != 0).collect();
    let weights_view = st.tensor("weights").ok();
    let mut shaped = vec![
        ("labels", labels_view.shape()),
        ("response_mask", mask_view.shape()),
    ];
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
    let normalization = match job.normalization {
        NormalizationKind::TokenMean => Normalization::TokenMean,
        NormalizationKind::Sum => Normalization::Sum,
        NormalizationKind::Cs336 => Normalization::Cs336 {
            normalize_constant: job.normalize_constant,
            batch_size: job.batch_size.unwrap_or(lead.first().copied().unwrap_or(1)),
            gradient_accumulation_steps: job.gradient_accumulation_steps,
        },
    };
    let options = CeOptions {
        normalization,
        upstream: job.upstream,
    };
    let mut input = CeInput::new(&logits, vocab, labels, &mask);
    input.weights = weights.as_deref();
    input.validate()?;
    let out = device
        .cross_entropy(&input, &options, CeRequest::default(), job.grad)?
        .to_host()?;
    write_output(output, &out, lead, &logits_shape, logits_view.dtype())?;
    Ok(LossSummary {
        count: out.count,
        sum: out.sum,
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
    let count = i64::from(out.count);
    fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>> {
        TensorView::new(dtype, shape, data).map_err(|e| Error::Safetensors(e.to_string()))
    }
    let f32s = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
    let (log_probs, entropy, lse) = (f32s(&out.log_probs), f32s(&out.entropy), f32s(&out.lse));
    let mut tensors = vec![
        ("log_probs", view(Dtype::F32, lead.to_vec(), &log_probs)?),
        ("entropy", view(Dtype::F32, lead.to_vec(), &entropy)?),
        ("lse", view(Dtype::F32, lead.to_vec(), &lse)?),
        (
            "sum",
            view(Dtype::F32, vec![], bytemuck::bytes_of(&out.sum))?,
        ),
        (
            "loss",
            view(Dtype::F32, vec![], bytemuck::bytes_of(&out.loss))?,
        ),
        (
            "count",
            view(Dtype::I64, vec![], bytemuck::bytes_of(&count))?,
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
