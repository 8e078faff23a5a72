//! `sft-collate loss`: the masked cross-entropy of a safetensors file on any device
//! ([`sft_collate::loss_file`]).

use std::path::PathBuf;

use clap::Args;
use sft_collate::loss_file::{run_loss_file, LossJob, NormalizationKind};
use sft_collate::{Device, DeviceChoice, Result};

use super::choice;

#[derive(Args, Debug)]
pub struct LossArgs {
    /// safetensors with logits [..., V] (F32, F16 or BF16), labels [...] (I32 or I64), response_mask [...]
    /// (BOOL or U8; optional with --ignore-index), and optionally weights [...] (F32) and cu_seqlens
    /// [D+1] (I32, documents over the flattened rows, for --reduction sequence-mean).
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Where to write log_probs, entropy, lse, row_loss, argmax, sum, loss, z_sum, count, correct,
    /// documents (and grad_logits with --grad).
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// auto, cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "auto", value_parser = super::parsed::<DeviceChoice>)]
    device: DeviceChoice,
    /// token-mean, sum, none (the per-token row_loss; the scalar and gradient of their sum),
    /// sequence-mean (per document, then over documents; a [B, T] batch without cu_seqlens has one
    /// document per row) or cs336.
    #[arg(long, alias = "normalization", default_value = "token-mean",
          value_parser = choice::<NormalizationKind>(NormalizationKind::NAMES))]
    reduction: NormalizationKind,
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
    /// Rows whose label is this are not trained (PyTorch's ignore_index, -100 there); the input then
    /// needs no response_mask.
    #[arg(long, value_name = "I")]
    ignore_index: Option<i64>,
    /// z-loss scale s: + s · logsumexp² per trained token (PaLM uses 1e-4).
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    z_loss: f32,
    /// Label smoothing ε in [0, 1], PyTorch's definition.
    #[arg(long, value_name = "E", default_value_t = 0.0)]
    label_smoothing: f32,
    /// Logit softcap C: C · tanh(logits / C) first (Gemma 2 uses 30).
    #[arg(long, value_name = "C")]
    softcap: Option<f32>,
}

pub fn run(args: LossArgs) -> Result<()> {
    let job = LossJob {
        normalization: args.reduction,
        normalize_constant: args.normalize_constant,
        batch_size: args.batch_size,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        upstream: args.upstream,
        grad: args.grad,
        ignore_index: args.ignore_index,
        z_loss: args.z_loss,
        label_smoothing: args.label_smoothing,
        softcap: args.softcap,
    };
    let device = Device::new(args.device)?;
    let summary = run_loss_file(&args.input, &args.output, &job, &device)?;
    eprintln!(
        "device {}: {} trained tokens in {} documents, {} predicted right, sum {}, z-loss {}, loss {}",
        device.kind(),
        summary.count,
        summary.documents,
        summary.correct,
        summary.sum,
        summary.z_sum,
        summary.loss
    );
    Ok(())
}
