//! The vocabulary-parallel cross-entropy on a GPU, host inputs: this rank's columns copied up,
//! `masked_ce_shard_fwd_*` makes each trained row's partial, the partials come back for the exchange and
//! merge of the CPU path (one protocol for every backend; the copy back synchronizes the stream, as any
//! host-side exchange must), then `masked_ce_shard_bwd_*` makes the gradient of this rank's columns from
//! the merged per-row records. The emulator runs the same kernels in CI; this launcher runs on a GPU only
//! (`tests/vocab_parallel.rs`, ignored without one).

use cudarc::driver::{CudaStream, PushKernelArg, SyncOnDrop};

use super::loss::{keep, DeviceLabels, MaskedCrossEntropy};
use super::memory::{DeviceRead, DeviceWrite};
use super::{cuda_err, cuda_result, launch_config, HostCopy};
use crate::backend::abi::{self, CeArgs, CePartial};
use crate::backend::cpu::loss::vocab_parallel_from_partials;
use crate::loss::parallel::{Communicator, VocabShard};
use crate::loss::{CeInput, CeOptions, CeOutput, CeRequest, LogitElem};
use crate::Result;

/// `base` with the addresses of the uploaded inputs, kept alive in `g` (their guards record the stream's
/// use when dropped after the launch).
fn args_of<'a, T>(
    up: &'a HostCopy<T>,
    stream: &'a CudaStream,
    g: &mut Vec<SyncOnDrop<'a>>,
    base: CeArgs,
) -> CeArgs {
    let (labels, labels_are_i64) = match up.targets.labels() {
        DeviceLabels::I32(l) => (keep(g, l.read_addr(stream)), 0),
        DeviceLabels::I64(l) => (keep(g, l.read_addr(stream)), 1),
    };
    CeArgs {
        logits: keep(g, up.logits.read_addr(stream)),
        labels,
        labels_are_i64,
        mask: up
            .targets
            .mask
            .as_ref()
            .map_or(0, |m| keep(g, m.read_addr(stream))),
        ..base
    }
}

impl MaskedCrossEntropy {
    /// [`crate::Device::vocab_parallel_cross_entropy`] on this stream: the whole vocabulary's outputs and
    /// loss on the host, and the gradient of this rank's columns (copied back).
    pub(crate) fn vocab_parallel<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        shard: VocabShard,
        options: &CeOptions,
        request: CeRequest,
        comm: &dyn Communicator,
        with_grad: bool,
    ) -> Result<CeOutput<T>> {
        let stream = self.stream();
        let shape = input.shape;
        let n = shape.rows;
        let kernel = |op: &str| &self.shard[&format!("masked_ce_shard_{op}_{}", T::SUFFIX)];
        let base = CeArgs {
            column_start: shard.start as u64,
            ..abi::ce_args(options, &shape, 0)
        };
        let mut uploaded: Option<HostCopy<T>> = None;
        let partials = || {
            if n == 0 {
                // Nothing to copy up (and no empty allocation to make).
                return Ok(Vec::new());
            }
            let up = HostCopy::upload(stream, input)?;
            // One record per row; those of rows not trained are ignored.
            let mut out = cuda_result(stream.clone_htod(&vec![CePartial::default(); n]))?;
            {
                let mut g = Vec::new();
                let args = CeArgs {
                    partials: keep(&mut g, out.write_addr(stream)),
                    ..args_of(&up, stream, &mut g, base)
                };
                // SAFETY: the protocol validated the input before calling this (rows of `row_stride`
                // with `vocab` columns, all copied up; one label and mask byte per row); the kernel
                // writes one partial per trained row into `out` (`rows` records). The struct
                // is the kernel's one parameter (abi.cuh).
                unsafe {
                    stream
                        .launch_builder(kernel("fwd"))
                        .arg(&args)
                        .launch(launch_config(abi::ce_rows_launch(n)))
                        .map_err(cuda_err)?;
                }
            }
            let host = cuda_result(stream.clone_dtoh(&out))?;
            uploaded = Some(up);
            Ok(host)
        };
        let (reference, rows) =
            vocab_parallel_from_partials(input, shard, options, comm, with_grad, partials)?;
        let mut output = reference.to_output::<T>(request);
        if rows.is_some() && n == 0 {
            output.grad = Some(Vec::new());
        }
        if let (Some(rows), Some(up)) = (rows, uploaded.as_ref()) {
            let grad_len = n * shape.vocab;
            let rows = cuda_result(stream.clone_htod(&rows))?;
            // SAFETY: the backward kernel writes every element of every row (zeros on rows not trained).
            let mut grad = unsafe { stream.alloc::<T>(grad_len) }.map_err(cuda_err)?;
            {
                let mut g = Vec::new();
                let args = CeArgs {
                    grad: keep(&mut g, grad.write_addr(stream)),
                    grad_stride: shape.vocab as u64,
                    shard_rows: keep(&mut g, rows.read_addr(stream)),
                    ..args_of(up, stream, &mut g, base)
                };
                // SAFETY: as the forward launch; `rows` holds one record per row, `grad` rows × vocab.
                unsafe {
                    stream
                        .launch_builder(kernel("bwd"))
                        .arg(&args)
                        .launch(launch_config(abi::ce_rows_launch(n)))
                        .map_err(cuda_err)?;
                }
            }
            output.grad = Some(cuda_result(stream.clone_dtoh(&grad))?);
        }
        Ok(output)
    }
}
