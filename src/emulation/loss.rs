//! The fused masked cross-entropy kernels on the emulator.

use std::ffi::c_void;

use super::{DeviceLikeBuffer, EmuLaunch};
use crate::loss::{ce_grid, CeInput, CeOptions, CeOutput, Labels, LogitElem, CE_BLOCK};
use crate::{Error, Result};

macro_rules! ce_decl {
    ($($name:ident),*) => {
        extern "C" {
            $(
                fn $name(
                    cfg: *const EmuLaunch,
                    logits: *const c_void,
                    rows: u64,
                    vocab: u64,
                    logits_stride: u64,
                    labels: *const c_void,
                    labels_are_i64: i32,
                    mask: *const u8,
                    weights: *const f32,
                    count: *const u32,
                    norm_mode: i32,
                    norm_fixed: f32,
                    upstream: f32,
                    row_loss: *mut f32,
                    log_probs: *mut f32,
                    entropy: *mut f32,
                    lse: *mut f32,
                    grad: *mut c_void,
                    grad_stride: u64,
                    error_flag: *mut u32,
                );
            )*
            fn emu_masked_ce_count(cfg: *const EmuLaunch, mask: *const u8, rows: u64, count: *mut u32);
            fn emu_masked_ce_reduce(
                cfg: *const EmuLaunch,
                row_loss: *const f32,
                rows: u64,
                count: *const u32,
                norm_mode: i32,
                norm_fixed: f32,
                out: *mut f32,
            );
        }
    };
}
ce_decl!(
    emu_masked_ce_fwd_f32,
    emu_masked_ce_fwd_f16,
    emu_masked_ce_fwd_bf16,
    emu_masked_ce_fwd_bwd_f32,
    emu_masked_ce_fwd_bwd_f16,
    emu_masked_ce_fwd_bwd_bf16
);

/// The fused masked cross-entropy kernels run by the emulator: the same API shape as
/// `cuda::MaskedCrossEntropy`, on host slices.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmulatedMaskedCrossEntropy;

impl EmulatedMaskedCrossEntropy {
    pub fn new() -> Self {
        EmulatedMaskedCrossEntropy
    }

    /// Loss, per-token log-probs, entropy and logsumexp.
    pub fn forward<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        options: &CeOptions,
    ) -> Result<CeOutput<T>> {
        self.run(input, options, Grad::None)
    }

    /// The same plus the gradient, into a new dense `[N, vocab]` buffer.
    pub fn forward_backward<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        options: &CeOptions,
    ) -> Result<CeOutput<T>> {
        self.run(input, options, Grad::Separate)
    }

    /// The same, with the gradient written over the logits (returned in the logits' layout).
    pub fn forward_backward_in_place<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        options: &CeOptions,
    ) -> Result<CeOutput<T>> {
        self.run(input, options, Grad::InPlace)
    }

    fn run<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        options: &CeOptions,
        grad: Grad,
    ) -> Result<CeOutput<T>> {
        input.validate()?;
        options.normalization.validate()?;
        let shape = input.shape;
        let n = shape.rows;
        // Device-like copies: aligned as cudaMalloc'ed memory, so the vector paths run.
        let mut logits = DeviceLikeBuffer::from_slice(input.logits);
        let mask: Vec<u8> = input.mask.iter().map(|&m| u8::from(m)).collect();
        let (labels_ptr, labels_are_i64): (*const c_void, i32) = match input.labels {
            Labels::I32(v) => (v.as_ptr().cast(), 0),
            Labels::I64(v) => (v.as_ptr().cast(), 1),
        };
        let mut row_loss = vec![0f32; n];
        let (mut log_probs, mut entropy, mut lse) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let grad_len = n * shape.vocab;
        let mut grad_buffer = DeviceLikeBuffer::zeroed(grad_len * std::mem::size_of::<T>());
        let (mut count, mut scalars, mut error_flag) = (0u32, [0f32; 2], 0u32);
        let (norm_mode, norm_fixed) = options.normalization.kernel_args();
        let one_block = EmuLaunch {
            grid: [1, 1, 1],
            block: [CE_BLOCK, 1, 1],
        };
        let rows_launch = EmuLaunch {
            grid: [ce_grid(n), 1, 1],
            block: [CE_BLOCK, 1, 1],
        };
        let logits_ptr = logits.as_mut_slice::<T>(input.logits.len()).as_mut_ptr();
        let (grad_ptr, grad_stride): (*mut c_void, u64) = match grad {
            Grad::None => (std::ptr::null_mut(), 0),
            Grad::Separate => (
                grad_buffer.as_mut_slice::<T>(grad_len).as_mut_ptr().cast(),
                shape.vocab as u64,
            ),
            Grad::InPlace => (logits_ptr.cast(), shape.row_stride as u64),
        };
        let kernel = match (grad, T::SUFFIX) {
            (Grad::None, "f32") => emu_masked_ce_fwd_f32,
            (Grad::None, "f16") => emu_masked_ce_fwd_f16,
            (Grad::None, _) => emu_masked_ce_fwd_bf16,
            (_, "f32") => emu_masked_ce_fwd_bwd_f32,
            (_, "f16") => emu_masked_ce_fwd_bwd_f16,
            (_, _) => emu_masked_ce_fwd_bwd_bf16,
        };
        // SAFETY: `validate` checked that the logits hold rows of `row_stride` with `vocab` elements each,
        // and that labels, mask and weights have one entry per row; every output has one entry per row
        // and the gradient buffer rows × vocab (or the logits' own layout in place). Labels are only
        // dereferenced after the kernel's range check. The pointers outlive the synchronous launches.
        unsafe {
            emu_masked_ce_count(&one_block, mask.as_ptr(), n as u64, &mut count);
            kernel(
                &rows_launch,
                logits_ptr.cast_const().cast(),
                n as u64,
                shape.vocab as u64,
                shape.row_stride as u64,
                labels_ptr,
                labels_are_i64,
                mask.as_ptr(),
                input.weights.map_or(std::ptr::null(), <[f32]>::as_ptr),
                &count,
                norm_mode,
                norm_fixed,
                options.upstream,
                row_loss.as_mut_ptr(),
                log_probs.as_mut_ptr(),
                entropy.as_mut_ptr(),
                lse.as_mut_ptr(),
                grad_ptr,
                grad_stride,
                &mut error_flag,
            );
            emu_masked_ce_reduce(
                &one_block,
                row_loss.as_ptr(),
                n as u64,
                &count,
                norm_mode,
                norm_fixed,
                scalars.as_mut_ptr(),
            );
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Grad {
    None,
    Separate,
    InPlace,
}
