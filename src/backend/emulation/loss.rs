//! The fused masked cross-entropy kernels on the emulator.

use super::{addr, ce_kernel, DeviceLikeBuffer, Emulator};
use crate::backend::abi::{self, CeArgs, CeVariant};
use crate::loss::{CeInput, CeOptions, CeOutput, CeRequest, Labels, LogitElem};
use crate::Result;

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

/// An output the kernels write, when asked for: `rows` entries of garbage (as uninitialized device
/// memory would hold), or none (a null address).
fn per_row<T: Copy>(wanted: bool, rows: usize, garbage: T) -> Vec<T> {
    if wanted {
        vec![garbage; rows]
    } else {
        Vec::new()
    }
}

/// The address of an output buffer, null when it is empty.
fn out_addr<T>(v: &mut [T]) -> u64 {
    if v.is_empty() {
        0
    } else {
        addr(v.as_mut_ptr())
    }
}

impl Emulator {
    /// Loss, sums, counts, the requested per-token outputs (the others come back empty) and, per `grad`,
    /// the gradient.
    pub fn cross_entropy<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        options: &CeOptions,
        request: CeRequest,
        grad: Grad,
    ) -> Result<CeOutput<T>> {
        input.validate()?;
        options.validate()?;
        let shape = input.shape;
        let n = shape.rows;
        let variant = CeVariant::of(options, &request);
        // Device-like copies: aligned as cudaMalloc'ed memory, so the vector paths run.
        let mut logits = DeviceLikeBuffer::from_slice(input.logits);
        let mask: Option<Vec<u8>> = input.mask.map(|m| m.iter().map(|&m| u8::from(m)).collect());
        let (labels, labels_are_i64) = match input.labels {
            Labels::I32(v) => (addr(v.as_ptr()), 0),
            Labels::I64(v) => (addr(v.as_ptr()), 1),
        };
        let documents = input.cu_seqlens.map_or(0, |cu| cu.len() - 1);
        let mut doc_trained = vec![u32::MAX; documents];
        let mut row_loss = vec![f32::NAN; n];
        let mut row_z = per_row(options.z_loss != 0.0, n, f32::NAN);
        let mut log_probs = per_row(request.log_probs, n, f32::NAN);
        let mut entropy = per_row(request.entropy, n, f32::NAN);
        let mut lse = per_row(request.lse, n, f32::NAN);
        let mut argmax = per_row(request.argmax, n, i32::MIN);
        let grad_len = n * shape.vocab;
        let mut grad_buffer = DeviceLikeBuffer::zeroed(match grad {
            Grad::Separate => grad_len * std::mem::size_of::<T>(),
            _ => 0,
        });
        // Garbage where the kernels must write (as uninitialized device memory would be).
        let (mut count, mut scalars, mut error_flag) = ([u32::MAX; 3], [f32::NAN; 3], 0xDEADu32);
        let logits_addr = logits.addr();
        let (grad_addr, grad_stride) = match grad {
            Grad::None => (0, 0),
            Grad::Separate => (grad_buffer.addr(), shape.vocab as u64),
            Grad::InPlace => (logits_addr, shape.row_stride as u64),
        };
        let scalar_fields = abi::ce_args(options, &shape, documents);
        let args = CeArgs {
            logits: logits_addr,
            labels,
            mask: mask.as_ref().map_or(0, |m| addr(m.as_ptr())),
            weights: input.weights.map_or(0, |w| addr(w.as_ptr())),
            cu_seqlens: input.cu_seqlens.map_or(0, |cu| addr(cu.as_ptr())),
            upstream_ptr: match self.upstream_by_pointer {
                true => addr(&options.upstream),
                false => 0,
            },
            doc_trained: out_addr(&mut doc_trained),
            count: addr(count.as_mut_ptr()),
            row_loss: out_addr(&mut row_loss),
            row_z: out_addr(&mut row_z),
            log_probs: out_addr(&mut log_probs),
            entropy: out_addr(&mut entropy),
            lse: out_addr(&mut lse),
            argmax: out_addr(&mut argmax),
            grad: grad_addr,
            scalars: addr(scalars.as_mut_ptr()),
            error_flag: addr(std::ptr::addr_of_mut!(error_flag)),
            grad_stride,
            labels_are_i64,
            // By pointer, the by-value field is poisoned: a kernel that read it would give NaN.
            upstream: match self.upstream_by_pointer {
                true => f32::NAN,
                false => options.upstream,
            },
            ..scalar_fields
        };
        let kernel = ce_kernel(grad != Grad::None, T::SUFFIX, variant);
        {
            // SAFETY: `validate` checked that the logits hold rows of `row_stride` with `vocab` elements,
            // that labels, mask and weights have one entry per row and that cu_seqlens rise from 0 to
            // the rows (documents + 1 entries, doc_trained one per document); every requested output has
            // one entry per row (absent ones are null, which the kernels check; argmax only with the full
            // variant, which `CeVariant::of` picks when it is requested), the gradient buffer rows × vocab
            // (or the logits' own layout in place). Labels are dereferenced only after the kernel's range
            // check. With no rows no row array is touched. Every address outlives these synchronous
            // launches.
            unsafe {
                super::emu_masked_ce_count(&abi::ce_one_block(), &args);
                if documents > 0 {
                    super::emu_masked_ce_documents(&abi::ce_documents_launch(documents), &args);
                }
                kernel(&abi::ce_rows_launch(n), &args);
                super::emu_masked_ce_reduce(&abi::ce_one_block(), &args);
            }
        }
        abi::ce_error(error_flag)?;
        Ok(CeOutput {
            log_probs,
            entropy,
            lse,
            argmax,
            row_loss: if request.row_loss {
                row_loss
            } else {
                Vec::new()
            },
            sum: scalars[0],
            loss: scalars[1],
            z_sum: if options.z_loss != 0.0 {
                scalars[2]
            } else {
                0.0
            },
            count: count[0],
            correct: if request.argmax { count[1] } else { 0 },
            documents: count[2],
            grad: match grad {
                Grad::None => None,
                Grad::Separate => Some(grad_buffer.as_slice::<T>(grad_len).to_vec()),
                Grad::InPlace => Some(logits.as_slice::<T>(input.logits.len()).to_vec()),
            },
        })
    }
}
