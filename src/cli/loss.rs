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
    /// (BOOL or U8) and optionally weights [...] (F32).
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Where to write log_probs, entropy, lse, sum, loss, count (and grad_logits with --grad).
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// auto, cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    #[arg(long, default_value = "token-mean",
          value_parser = choice::<NormalizationKind>(NormalizationKind::NAMES))]
    normalization: NormalizationKind,
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

pub fn run(args: LossArgs) -> Result<()> {
    let job = LossJob {
        normalization: args.normalization,
        normalize_constant: args.normalize_constant,
        batch_size: args.batch_size,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        upstream: args.upstream,
        grad: args.grad,
    };
    let device = Device::new(args.device)?;
    let summary = run_loss_file(&args.input, &args.output, &job, &device)?;
    eprintln!(
        "device {}: {} masked tokens, sum {}, loss {}",
        device.kind(),
        summary.count,
        summary.sum,
        summary.loss
    );
    Ok(())
}
