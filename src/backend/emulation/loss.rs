//! The fused masked cross-entropy kernels on the emulator.

use super::{addr, DeviceLikeBuffer, Emulator};
use crate::backend::abi::{self, CeArgs, CeCountArgs, CeReduceArgs};
use crate::loss::{CeInput, CeOptions, CeOutput, CeRequest, Labels, LogitElem};
use crate::{Error, Result};

/// Where the gradient goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grad {
    /// No gradient.
    None,
    /// A new dense `[N, vocab]` buffer.
    Separate,
    /// Over (a copy of) the logits, in their layout: the kernel's in-place path.
    InPlace,
}

impl Emulator {
    /// Loss, sum, count, the requested per-token outputs (the others come back empty) and, per `grad`,
    /// the gradient.
    pub fn cross_entropy<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        options: &CeOptions,
        request: CeRequest,
        grad: Grad,
    ) -> Result<CeOutput<T>> {
        input.validate()?;
        options.normalization.validate()?;
        let shape = input.shape;
        let n = shape.rows;
        // Device-like copies: aligned as cudaMalloc'ed memory, so the vector paths run.
        let mut logits = DeviceLikeBuffer::from_slice(input.logits);
        let mask: Vec<u8> = input.mask.iter().map(|&m| u8::from(m)).collect();
        let (labels, labels_are_i64) = match input.labels {
            Labels::I32(v) => (addr(v.as_ptr()), 0),
            Labels::I64(v) => (addr(v.as_ptr()), 1),
        };
        let mut row_loss = vec![0f32; n];
        let per_row = |wanted: bool| if wanted { vec![0f32; n] } else { Vec::new() };
        let (mut log_probs, mut entropy, mut lse) = (
            per_row(request.log_probs),
            per_row(request.entropy),
            per_row(request.lse),
        );
        let out_addr = |v: &mut Vec<f32>| {
            if v.is_empty() {
                0
            } else {
                addr(v.as_mut_ptr())
            }
        };
        let grad_len = n * shape.vocab;
        let mut grad_buffer = DeviceLikeBuffer::zeroed(match grad {
            Grad::Separate => grad_len * std::mem::size_of::<T>(),
            _ => 0,
        });
        // Garbage where the kernels must write (as uninitialized device memory would be).
        let (mut count, mut scalars, mut error_flag) = (u32::MAX, [f32::NAN; 2], 0xDEADu32);
        // The kernels write these through their addresses: take them from raw mutable pointers.
        let count_addr = addr(std::ptr::addr_of_mut!(count));
        let error_flag_addr = addr(std::ptr::addr_of_mut!(error_flag));
        let (norm_mode, norm_fixed) = abi::norm_args(&options.normalization);
        let logits_addr = logits.addr();
        let (grad_addr, grad_stride) = match grad {
            Grad::None => (0, 0),
            Grad::Separate => (grad_buffer.addr(), shape.vocab as u64),
            Grad::InPlace => (logits_addr, shape.row_stride as u64),
        };
        let args = CeArgs {
            logits: logits_addr,
            labels,
            mask: addr(mask.as_ptr()),
            weights: input.weights.map_or(0, |w| addr(w.as_ptr())),
            count: count_addr,
            upstream_ptr: match self.upstream_by_pointer {
                true => addr(&options.upstream),
                false => 0,
            },
            row_loss: addr(row_loss.as_mut_ptr()),
            log_probs: out_addr(&mut log_probs),
            entropy: out_addr(&mut entropy),
            lse: out_addr(&mut lse),
            grad: grad_addr,
            error_flag: error_flag_addr,
            rows: n as u64,
            vocab: shape.vocab as u64,
            logits_stride: shape.row_stride as u64,
            grad_stride,
            norm_fixed,
            // By pointer, the by-value field is poisoned: a kernel that read it would give NaN.
            upstream: match self.upstream_by_pointer {
                true => f32::NAN,
                false => options.upstream,
            },
            labels_are_i64,
            norm_mode,
        };
        let count_args = CeCountArgs {
            mask: args.mask,
            count: count_addr,
            error_flag: error_flag_addr,
            rows: n as u64,
        };
        let reduce_args = CeReduceArgs {
            row_loss: args.row_loss,
            count: args.count,
            out: addr(scalars.as_mut_ptr()),
            rows: n as u64,
            norm_fixed,
            norm_mode,
        };
        let kernel = match (grad, T::SUFFIX) {
            (Grad::None, "f32") => super::emu_masked_ce_fwd_f32,
            (Grad::None, "f16") => super::emu_masked_ce_fwd_f16,
            (Grad::None, _) => super::emu_masked_ce_fwd_bf16,
            (_, "f32") => super::emu_masked_ce_fwd_bwd_f32,
            (_, "f16") => super::emu_masked_ce_fwd_bwd_f16,
            (_, _) => super::emu_masked_ce_fwd_bwd_bf16,
        };
        {
            // SAFETY: `validate` checked that the logits hold rows of `row_stride` with `vocab` elements,
            // and that labels, mask and weights have one entry per row; every requested output has one
            // entry per row (absent ones are null, which the kernel checks), the gradient buffer rows ×
            // vocab (or the logits' own layout in place). Labels are dereferenced only after the kernel's
            // range check. With no rows no row array is touched. Every address outlives these synchronous
            // launches.
            unsafe {
                super::emu_masked_ce_count(&abi::ce_one_block(), &count_args);
                kernel(&abi::ce_rows_launch(n), &args);
                super::emu_masked_ce_reduce(&abi::ce_one_block(), &reduce_args);
            }
        }
        if error_flag != 0 {
            return Err(Error::DeviceLabelOutOfRange);
        }
        Ok(CeOutput {
            log_probs,
            entropy,
            lse,
            sum: scalars[0],
            count,
            loss: scalars[1],
            grad: match grad {
                Grad::None => None,
                Grad::Separate => Some(grad_buffer.as_slice::<T>(grad_len).to_vec()),
                Grad::InPlace => Some(logits.as_slice::<T>(input.logits.len()).to_vec()),
            },
        })
    }
}
