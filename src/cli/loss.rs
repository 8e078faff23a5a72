//! `sft-collate loss`: the masked cross-entropy of a safetensors file (`logits`, `labels`,
//! `response_mask`, optional `weights`), on any backend, so users can check the kernels against their own
//! framework's numbers on their own data.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sft_collate::batch::write_atomically;
use sft_collate::cpu::loss::masked_cross_entropy;
use sft_collate::loss::{CeInput, CeOptions, CeOutput, Labels, LogitElem, Normalization};
use sft_collate::{Error, Result};

use super::backend::Device;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalizationArg {
    /// Sum over masked tokens divided by their count.
    TokenMean,
    /// The plain sum.
    Sum,
    /// CS336: divided by normalize-constant × batch-size × gradient-accumulation-steps.
    Cs336,
}

#[derive(Args, Debug)]
pub struct LossArgs {
    /// safetensors with logits [..., V] (F32, F16 or BF16), labels [...] (I32 or I64), response_mask [...]
    /// (BOOL or U8) and optionally weights [...] (F32).
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Where to write log_probs, entropy, lse, sum, loss, count (and grad_logits with --grad).
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    #[arg(long, value_enum, default_value = "token-mean")]
    normalization: NormalizationArg,
    /// CS336 normalize_constant.
    #[arg(long, default_value_t = 1.0)]
    normalize_constant: f64,
    /// CS336 batch size (default: the leading dimension of labels).
    #[arg(long)]
    batch_size: Option<usize>,
    /// CS336 gradient_accumulation_steps.
    #[arg(long, default_value_t = 1)]
    gradient_accumulation_steps: usize,
    /// Multiplies the gradient (d final loss / d this loss).
    #[arg(long, default_value_t = 1.0)]
    upstream: f32,
    /// Also compute and write grad_logits.
    #[arg(long)]
    grad: bool,
}

/// Logit element types every backend of this build can take.
#[cfg(feature = "cuda")]
pub trait Elem: LogitElem + cudarc::driver::DeviceRepr {}
#[cfg(feature = "cuda")]
impl<T: LogitElem + cudarc::driver::DeviceRepr> Elem for T {}
#[cfg(not(feature = "cuda"))]
pub trait Elem: LogitElem {}
#[cfg(not(feature = "cuda"))]
impl<T: LogitElem> Elem for T {}

fn bad(reason: impl Into<String>) -> Error {
    Error::InvalidOption {
        name: "input",
        reason: reason.into(),
    }
}

pub fn run(args: LossArgs) -> Result<()> {
    let bytes = std::fs::read(&args.input).map_err(|e| Error::io(&args.input, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
    let tensor = |name: &str| {
        st.tensor(name)
            .map_err(|_| bad(format!("no tensor \"{name}\"")))
    };
    let logits = tensor("logits")?;
    match logits.dtype() {
        Dtype::F32 => run_typed::<f32>(&args, &st),
        Dtype::F16 => run_typed::<half::f16>(&args, &st),
        Dtype::BF16 => run_typed::<half::bf16>(&args, &st),
        other => Err(bad(format!(
            "logits are {other:?}; F32, F16 or BF16 expected"
        ))),
    }
}

fn run_typed<T: Elem>(args: &LossArgs, st: &SafeTensors<'_>) -> Result<()> {
    let tensor = |name: &str| {
        st.tensor(name)
            .map_err(|_| bad(format!("no tensor \"{name}\"")))
    };
    let logits_view = tensor("logits")?;
    let logits_shape = logits_view.shape().to_vec();
    let (&vocab, lead) = logits_shape
        .split_last()
        .ok_or_else(|| bad("logits must have at least one dimension"))?;
    let logits: Vec<T> = bytemuck::pod_collect_to_vec(logits_view.data());
    let labels_view = tensor("labels")?;
    let (labels32, labels64): (Vec<i32>, Vec<i64>) = match labels_view.dtype() {
        Dtype::I32 => (bytemuck::pod_collect_to_vec(labels_view.data()), Vec::new()),
        Dtype::I64 => (Vec::new(), bytemuck::pod_collect_to_vec(labels_view.data())),
        other => return Err(bad(format!("labels are {other:?}; I32 or I64 expected"))),
    };
    let labels = if labels_view.dtype() == Dtype::I32 {
        Labels::I32(&labels32)
    } else {
        Labels::I64(&labels64)
    };
    let mask_view = tensor("response_mask")?;
    if !matches!(mask_view.dtype(), Dtype::BOOL | Dtype::U8) {
        return Err(bad(format!(
            "response_mask is {:?}; BOOL or U8 expected",
            mask_view.dtype()
        )));
    }
    let mask: Vec<bool> = mask_view.data().iter().map(|&b| b != 0).collect();
    let weights: Option<Vec<f32>> = match st.tensor("weights") {
        Ok(w) if w.dtype() == Dtype::F32 => Some(bytemuck::pod_collect_to_vec(w.data())),
        Ok(w) => return Err(bad(format!("weights are {:?}; F32 expected", w.dtype()))),
        Err(_) => None,
    };
    for (name, shape) in [
        ("labels", labels_view.shape()),
        ("response_mask", mask_view.shape()),
    ] {
        if shape != lead {
            return Err(bad(format!(
                "{name} has shape {shape:?}, logits lead with {lead:?}"
            )));
        }
    }
    let normalization = match args.normalization {
        NormalizationArg::TokenMean => Normalization::TokenMean,
        NormalizationArg::Sum => Normalization::Sum,
        NormalizationArg::Cs336 => Normalization::Cs336 {
            normalize_constant: args.normalize_constant,
            batch_size: args
                .batch_size
                .unwrap_or(lead.first().copied().unwrap_or(1)),
            gradient_accumulation_steps: args.gradient_accumulation_steps,
        },
    };
    let options = CeOptions {
        normalization,
        upstream: args.upstream,
    };
    let mut input = CeInput::new(&logits, vocab, labels, &mask);
    input.weights = weights.as_deref();
    input.validate()?;

    let (out, device) = compute(&input, &options, args.grad, args.device)?;
    eprintln!(
        "device {device}: {} masked tokens, sum {}, loss {}",
        out.count, out.sum, out.loss
    );
    write_output(&args.output, &out, lead, &logits_shape, logits_view.dtype())
}

fn compute<T: Elem>(
    input: &CeInput<'_, T>,
    options: &CeOptions,
    grad: bool,
    device: Device,
) -> Result<(CeOutput<T>, &'static str)> {
    match device {
        Device::Cpu => Ok((
            masked_cross_entropy(input, options, grad)?.to_output(),
            "cpu",
        )),
        #[cfg(feature = "emulation")]
        Device::Emulated => {
            let kernel = sft_collate::emulation::EmulatedMaskedCrossEntropy::new();
            let out = if grad {
                kernel.forward_backward(input, options)?
            } else {
                kernel.forward(input, options)?
            };
            Ok((out, "emulated"))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => Ok((cuda::compute(input, options, grad)?, "cuda")),
        Device::Auto => {
            #[cfg(feature = "cuda")]
            if sft_collate::cuda::device_count().is_ok() {
                return Ok((cuda::compute(input, options, grad)?, "cuda"));
            }
            Ok((
                masked_cross_entropy(input, options, grad)?.to_output(),
                "cpu",
            ))
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Elem;
    use sft_collate::cuda::{
        self, cuda_result, CeRequest, DeviceCeTargets, DeviceLabels, MaskedCrossEntropy,
    };
    use sft_collate::loss::{CeInput, CeOptions, CeOutput, Labels};
    use sft_collate::Result;

    pub fn compute<T: Elem>(
        input: &CeInput<'_, T>,
        options: &CeOptions,
        grad: bool,
    ) -> Result<CeOutput<T>> {
        let stream = cuda::default_stream(0)?;
        let kernel = MaskedCrossEntropy::new(stream.clone())?;
        let logits = cuda_result(stream.clone_htod(input.logits))?;
        let mask: Vec<u8> = input.mask.iter().map(|&m| u8::from(m)).collect();
        let mask = cuda_result(stream.clone_htod(&mask))?;
        let weights = match input.weights {
            Some(w) => Some(cuda_result(stream.clone_htod(w))?),
            None => None,
        };
        let (labels32, labels64) = match input.labels {
            Labels::I32(l) => (Some(cuda_result(stream.clone_htod(l))?), None),
            Labels::I64(l) => (None, Some(cuda_result(stream.clone_htod(l))?)),
        };
        let labels = match (&labels32, &labels64) {
            (Some(l), _) => DeviceLabels::I32(l),
            (_, Some(l)) => DeviceLabels::I64(l),
            _ => unreachable!(),
        };
        let targets = DeviceCeTargets {
            shape: input.shape,
            labels,
            mask: &mask,
            weights: weights.as_ref(),
        };
        let out = if grad {
            kernel.forward_backward(&logits, &targets, options, CeRequest::default())?
        } else {
            kernel.forward(&logits, &targets, options, CeRequest::default())?
        };
        out.to_host()
    }
}

fn write_output<T: LogitElem>(
    path: &std::path::Path,
    out: &CeOutput<T>,
    lead: &[usize],
    logits_shape: &[usize],
    logits_dtype: Dtype,
) -> Result<()> {
    let count = i64::from(out.count);
    fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>> {
        TensorView::new(dtype, shape, data).map_err(|e| Error::Safetensors(e.to_string()))
    }
    let mut tensors = vec![
        (
            "log_probs",
            view(
                Dtype::F32,
                lead.to_vec(),
                bytemuck::cast_slice(&out.log_probs),
            )?,
        ),
        (
            "entropy",
            view(
                Dtype::F32,
                lead.to_vec(),
                bytemuck::cast_slice(&out.entropy),
            )?,
        ),
        (
            "lse",
            view(Dtype::F32, lead.to_vec(), bytemuck::cast_slice(&out.lse))?,
        ),
    ];
    let scalars = [out.sum, out.loss];
    tensors.push((
        "sum",
        view(Dtype::F32, vec![], bytemuck::bytes_of(&scalars[0]))?,
    ));
    tensors.push((
        "loss",
        view(Dtype::F32, vec![], bytemuck::bytes_of(&scalars[1]))?,
    ));
    tensors.push((
        "count",
        view(Dtype::I64, vec![], bytemuck::bytes_of(&count))?,
    ));
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
