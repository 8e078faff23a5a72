//! The fused masked cross-entropy kernels on the emulator.

use super::{addr, ce_kernel, cluster_kernel, DeviceLikeBuffer, Emulator};
use crate::backend::abi::{self, CeArgs, CeVariant, ClusterPlan};
use crate::loss::{CeInput, CeOptions, CeOutput, CeRequest, LogitElem};
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

/// One cross-entropy over a batch, launched as the CUDA backend does: [`CeRun::start`] counts the
/// trained rows (and each document's), [`CeRun::rows`] runs the row kernel over all rows or over one
/// chunk of them at a time (the fused linear cross-entropy), [`CeRun::finish`] reduces and reads back.
/// The buffers live here, so the addresses in `args` stay valid while the run does.
pub(crate) struct CeRun<'a, T: LogitElem> {
    args: CeArgs,
    kernel: super::EmuKernel<CeArgs>,
    /// The one-read kernel and how it holds a row, when the emulator runs it and a row fits.
    one_read: Option<(super::EmuClusterKernel<CeArgs>, ClusterPlan)>,
    request: CeRequest,
    z_loss: bool,
    // Kept alive for the addresses in `args` (the input's own buffers are borrowed for 'a).
    _upstream: Box<f32>,
    _doc_trained: Vec<u32>,
    row_loss: Vec<f32>,
    _row_z: Vec<f32>,
    log_probs: Vec<f32>,
    entropy: Vec<f32>,
    lse: Vec<f32>,
    argmax: Vec<i32>,
    count: Box<[u32; 3]>,
    scalars: Box<[f32; 3]>,
    error_flag: Box<u32>,
    _input: std::marker::PhantomData<CeInput<'a, T>>,
}

impl<'a, T: LogitElem> CeRun<'a, T> {
    /// Check `input` for logits of `logits_len` elements (its logits are only read by [`CeRun::rows`],
    /// through the addresses given there), set up the outputs, and count the trained rows of the whole
    /// batch.
    pub fn start(
        emulator: &Emulator,
        input: &CeInput<'a, T>,
        logits_len: usize,
        options: &CeOptions,
        request: CeRequest,
        backward: bool,
    ) -> Result<Self> {
        input.validate_for_logits(logits_len)?;
        options.validate()?;
        let n = input.shape.rows;
        let documents = input.cu_seqlens.map_or(0, |cu| cu.len() - 1);
        let upstream = Box::new(options.upstream);
        // Garbage where the kernels must write (as uninitialized device memory would be).
        let mut run = CeRun {
            args: CeArgs::default(),
            kernel: ce_kernel(backward, T::SUFFIX, CeVariant::of(options, &request)),
            one_read: ClusterPlan::for_kernel(
                emulator.ce_row_kernel,
                super::H100_SMEM_PER_BLOCK,
                input.shape.vocab,
                std::mem::size_of::<T>(),
            )
            .filter(|_| backward)
            .map(|plan| {
                let variant = CeVariant::of(options, &request);
                (cluster_kernel(T::SUFFIX, variant), plan)
            }),
            request,
            z_loss: options.z_loss != 0.0,
            _upstream: upstream,
            _doc_trained: vec![u32::MAX; documents],
            row_loss: vec![f32::NAN; n],
            _row_z: per_row(options.z_loss != 0.0, n, f32::NAN),
            log_probs: per_row(request.log_probs, n, f32::NAN),
            entropy: per_row(request.entropy, n, f32::NAN),
            lse: per_row(request.lse, n, f32::NAN),
            argmax: per_row(request.argmax, n, i32::MIN),
            count: Box::new([u32::MAX; 3]),
            scalars: Box::new([f32::NAN; 3]),
            error_flag: Box::new(0xDEAD),
            _input: std::marker::PhantomData,
        };
        let base = abi::ce_args(options, &input.shape, documents);
        run.args = CeArgs {
            // The row kernel's logits and gradient come with each `rows` call.
            logits: 0,
            grad: 0,
            upstream_ptr: match emulator.upstream_by_pointer {
                true => addr(&*run._upstream),
                false => 0,
            },
            doc_trained: out_addr(&mut run._doc_trained),
            count: addr(run.count.as_mut_ptr()),
            row_loss: out_addr(&mut run.row_loss),
            row_z: out_addr(&mut run._row_z),
            log_probs: out_addr(&mut run.log_probs),
            entropy: out_addr(&mut run.entropy),
            lse: out_addr(&mut run.lse),
            argmax: out_addr(&mut run.argmax),
            scalars: addr(run.scalars.as_mut_ptr()),
            error_flag: addr(&mut *run.error_flag as *mut u32),
            // By pointer, the by-value field is poisoned: a kernel that read it would give NaN.
            upstream: match emulator.upstream_by_pointer {
                true => f32::NAN,
                false => options.upstream,
            },
            ..super::with_targets(base, input)
        };
        // SAFETY: `validate` checked that labels, mask and weights have one entry per row and that
        // cu_seqlens rise from 0 to the rows (documents + 1 entries, doc_trained one per document); these
        // kernels read only those and write the counters, doc_trained and the flag, all owned by `run`
        // (boxed or heap buffers, which do not move with it). Labels are read as values only.
        unsafe {
            super::emu_masked_ce_count(&abi::ce_one_block(), &run.args);
            if documents > 0 {
                super::emu_masked_ce_documents(&abi::ce_documents_launch(documents), &run.args);
            }
        }
        Ok(run)
    }

    /// The row kernel over rows `start..start + rows`: logits at `logits`, the gradient (when the run
    /// is a backward one) at `grad`, each starting with row `start` in rows of the given strides.
    ///
    /// # Safety
    /// `logits` must hold `rows` rows of `logits_stride` elements of `T` (`vocab` read in each), `grad`
    /// (when the run is a backward one) `rows` rows of `grad_stride` elements, or alias `logits` with the
    /// same stride; `start + rows` must not pass the batch's rows; both must stay valid for the call.
    pub unsafe fn rows(
        &mut self,
        start: usize,
        rows: usize,
        logits: (u64, usize),
        grad: (u64, usize),
    ) {
        if rows == 0 {
            return;
        }
        assert!(
            start + rows <= self.args.rows as usize,
            "rows past the batch"
        );
        let args = CeArgs {
            logits_stride: logits.1 as u64,
            grad_stride: grad.1 as u64,
            ..self.args.rows_chunk(start, rows, logits.0, grad.0)
        };
        // SAFETY: the caller vouches for the logits and gradient; every per-row array of `args` has one
        // entry per batch row (or is null) and `rows_chunk` offset it to `start` with `start + rows` in
        // the batch; labels are dereferenced only after the kernel's range check. The one-read kernel's
        // CTAs keep at most `slice` columns each in the `smem_bytes` the plan sized for them.
        unsafe {
            match self.one_read {
                Some((kernel, plan)) => {
                    let smem = u64::from(plan.smem_bytes);
                    kernel(&plan.launch(rows), plan.ctas, smem, &plan.args(args))
                }
                None => (self.kernel)(&abi::ce_rows_launch(rows), &args),
            }
        }
    }

    /// Reduce (sums, loss, correct rows), check the error flag, and hand the outputs back (without a
    /// gradient: the caller owns where it went).
    pub fn finish(mut self) -> Result<CeOutput<T>> {
        // SAFETY: the reduction reads the row outputs (one per batch row, written by the row kernel) and
        // labels, and writes the scalars and counters `self` owns.
        unsafe { super::emu_masked_ce_reduce(&abi::ce_one_block(), &self.args) };
        abi::ce_error(*self.error_flag)?;
        let (request, count, scalars) = (self.request, *self.count, *self.scalars);
        Ok(CeOutput {
            log_probs: std::mem::take(&mut self.log_probs),
            entropy: std::mem::take(&mut self.entropy),
            lse: std::mem::take(&mut self.lse),
            argmax: std::mem::take(&mut self.argmax),
            row_loss: match request.row_loss {
                true => std::mem::take(&mut self.row_loss),
                false => Vec::new(),
            },
            sum: scalars[0],
            loss: scalars[1],
            z_sum: if self.z_loss { scalars[2] } else { 0.0 },
            count: count[0],
            correct: if request.argmax { count[1] } else { 0 },
            documents: count[2],
            grad: None,
        })
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
        let backward = grad != Grad::None;
        let mut run = CeRun::start(self, input, input.logits.len(), options, request, backward)?;
        let shape = input.shape;
        let n = shape.rows;
        // Device-like copies: aligned as cudaMalloc'ed memory, so the vector paths run.
        let mut logits = DeviceLikeBuffer::from_slice(input.logits);
        let grad_len = n * shape.vocab;
        let mut grad_buffer = DeviceLikeBuffer::zeroed(match grad {
            Grad::Separate => grad_len * std::mem::size_of::<T>(),
            _ => 0,
        });
        let logits_at = (logits.addr(), shape.row_stride);
        let grad_at = match grad {
            Grad::None => (0, 0),
            Grad::Separate => (grad_buffer.addr(), shape.vocab),
            Grad::InPlace => logits_at,
        };
        // SAFETY: `start` validated the logits (rows of `row_stride` with `vocab` used) and the copy has
        // them all; the gradient buffer is rows × vocab (or the logits' own layout in place); both outlive
        // this synchronous launch.
        unsafe { run.rows(0, n, logits_at, grad_at) };
        let mut output = run.finish()?;
        output.grad = match grad {
            Grad::None => None,
            Grad::Separate => Some(grad_buffer.as_slice::<T>(grad_len).to_vec()),
            Grad::InPlace => Some(logits.as_slice::<T>(input.logits.len()).to_vec()),
        };
        Ok(output)
    }
}
