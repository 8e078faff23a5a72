//! The vocabulary-parallel cross-entropy on the emulator: this rank's partials by
//! `masked_ce_shard_fwd_*`, the exchanges and the merge as on the CPU
//! ([`crate::backend::cpu::loss::vocab_parallel_cross_entropy`]: one protocol, so ranks on different
//! backends form one group), and the gradient of this rank's columns by `masked_ce_shard_bwd_*`.

use super::{addr, shard_kernel, DeviceLikeBuffer, Emulator};
use crate::backend::abi::{self, CeArgs, CePartial};
use crate::backend::cpu::loss::vocab_parallel_from_partials;
use crate::loss::parallel::{Communicator, VocabShard};
use crate::loss::{CeInput, CeOptions, CeOutput, CeRequest, LogitElem};
use crate::Result;

impl Emulator {
    /// [`crate::backend::cpu::loss::vocab_parallel_cross_entropy`] with the kernels: `input` holds this
    /// rank's columns `shard.start..` of `shard.vocab`. Every rank gets the whole vocabulary's per-row
    /// outputs and loss (the requested ones), and the gradient of its own columns.
    pub fn vocab_parallel_cross_entropy<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        shard: VocabShard,
        options: &CeOptions,
        request: CeRequest,
        comm: &dyn Communicator,
        with_grad: bool,
    ) -> Result<CeOutput<T>> {
        let shape = input.shape;
        let n = shape.rows;
        let mut logits = DeviceLikeBuffer::from_slice(input.logits);
        let base = CeArgs {
            logits: logits.addr(),
            column_start: shard.start as u64,
            ..abi::ce_args(options, &shape, 0)
        };
        let mut args = super::with_targets(base, input);
        let partials = || {
            // Garbage where the kernel must write (as uninitialized device memory would be).
            let garbage = CePartial {
                max: f32::NAN,
                argmax: i32::MIN,
                flags: u32::MAX,
                ..CePartial::default()
            };
            let mut out = vec![garbage; n];
            let args = CeArgs {
                partials: if n == 0 { 0 } else { addr(out.as_mut_ptr()) },
                ..args
            };
            // SAFETY: the protocol validated the input before calling this (rows of `row_stride` with
            // `vocab` columns in the copy, one label and mask byte per row); the kernel writes one partial
            // per trained row into `out` (n entries); everything outlives the call.
            unsafe { shard_kernel(false, T::SUFFIX)(&abi::ce_rows_launch(n), &args) };
            Ok(out)
        };
        let (reference, rows) =
            vocab_parallel_from_partials(input, shard, options, comm, with_grad, partials)?;
        let mut output = reference.to_output::<T>(request);
        if let Some(rows) = rows {
            let grad_len = n * shape.vocab;
            let mut grad = DeviceLikeBuffer::zeroed(grad_len * std::mem::size_of::<T>());
            args.grad = grad.addr();
            args.grad_stride = shape.vocab as u64;
            args.shard_rows = if n == 0 { 0 } else { addr(rows.as_ptr()) };
            // SAFETY: as above; `rows` has one record per row, the gradient buffer rows × vocab.
            unsafe { shard_kernel(true, T::SUFFIX)(&abi::ce_rows_launch(n), &args) };
            output.grad = Some(grad.as_slice::<T>(grad_len).to_vec());
        }
        Ok(output)
    }
}
