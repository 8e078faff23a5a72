//! The collation kernels on the emulator.

use super::{addr, DeviceLikeBuffer, Emulator};
use crate::backend::abi::{self, CollateArgs, CollatePackArgs, CollateScalars};
use crate::collate::{bools_from_bytes, Batch, CollatePlan, CollateSpec, IdDtype, Pack};
use crate::{Error, RaggedBatch, Result};

/// The ragged batch's arrays as the kernels' first four arguments.
fn inputs(batch: &RaggedBatch) -> (u64, u64, u64, u64) {
    (
        addr(batch.tokens().as_ptr()),
        addr(batch.row_offsets().as_ptr()),
        addr(batch.prompt_lens().as_ptr()),
        batch.trainable().map_or(0, |t| addr(t.as_ptr())),
    )
}

impl Emulator {
    /// Collate `batch` by running `collate_<dtype>` on CPU threads.
    pub fn collate(&self, batch: &RaggedBatch, spec: &CollateSpec) -> Result<Batch> {
        let plan = CollatePlan::new(batch, spec)?;
        let n = plan.len();
        let size = spec.id_dtype.size();
        let mut input_ids = DeviceLikeBuffer::zeroed(n * size);
        let mut labels = DeviceLikeBuffer::zeroed(n * size);
        let mut response_mask = DeviceLikeBuffer::zeroed(n);
        let mut attention_mask = DeviceLikeBuffer::zeroed(n);
        if n > 0 {
            let (tokens, row_offsets, prompt_lens, trainable) = inputs(batch);
            let scalars = CollateScalars::of(&plan);
            let args = CollateArgs {
                tokens,
                row_offsets,
                prompt_lens,
                trainable,
                input_ids: input_ids.addr(),
                labels: labels.addr(),
                response_mask: response_mask.addr(),
                attention_mask: if spec.attention_mask {
                    attention_mask.addr()
                } else {
                    0
                },
                rows: scalars.rows,
                width: plan.width as u64,
                ignore_index: scalars.ignore_index,
                pad_id: scalars.pad_id,
                use_ignore_index: scalars.use_ignore_index,
            };
            let launch = abi::collate_launch(&plan);
            let kernel = match spec.id_dtype {
                IdDtype::I32 => super::emu_collate_i32,
                IdDtype::I64 => super::emu_collate_i64,
            };
            // SAFETY: `CollatePlan::new` validated the batch (offsets start at 0, never decrease, end at
            // the token count; prompts fit their rows) and the outputs hold rows × width elements of the
            // id dtype (bytes for the masks), so the kernel's reads stay inside `tokens` and its writes
            // inside the buffers, which outlive this synchronous launch.
            unsafe { kernel(&launch, &args) };
        }
        Ok(Batch {
            input_ids: input_ids.ids(spec.id_dtype, n),
            labels: labels.ids(spec.id_dtype, n),
            response_mask: bools_from_bytes(response_mask.as_slice::<u8>(n))?,
            attention_mask: match spec.attention_mask {
                true => Some(bools_from_bytes(attention_mask.as_slice::<u8>(n))?),
                false => None,
            },
            stats: plan.stats(batch),
        })
    }

    /// The padding-free layout of `batch` (every row a document), by `collate_pack_<dtype>`.
    pub fn collate_pack(&self, batch: &RaggedBatch, spec: &CollateSpec) -> Result<Pack> {
        let plan = CollatePlan::new(batch, spec)?;
        let total = CollatePlan::pack_total(batch.tokens().len(), spec)?;
        let (host_cu_seqlens, max_seqlen) =
            CollatePlan::pack_boundaries(batch.row_offsets(), total);
        let size = spec.id_dtype.size();
        let mut input_ids = DeviceLikeBuffer::zeroed(total * size);
        let mut labels = DeviceLikeBuffer::zeroed(total * size);
        let mut positions = DeviceLikeBuffer::zeroed(total * size);
        let mut mask = DeviceLikeBuffer::zeroed(total);
        let mut cu_seqlens = vec![0i32; host_cu_seqlens.len()];
        let (tokens, row_offsets, prompt_lens, trainable) = inputs(batch);
        let scalars = CollateScalars::of(&plan);
        let args = CollatePackArgs {
            tokens,
            row_offsets,
            prompt_lens,
            trainable,
            input_ids: input_ids.addr(),
            labels: labels.addr(),
            response_mask: mask.addr(),
            position_ids: positions.addr(),
            cu_seqlens: addr(cu_seqlens.as_mut_ptr()),
            rows: scalars.rows,
            total: total as u64,
            ignore_index: scalars.ignore_index,
            pad_id: scalars.pad_id,
            use_ignore_index: scalars.use_ignore_index,
        };
        let launch = abi::collate_pack_launch(&plan, total);
        let kernel = match spec.id_dtype {
            IdDtype::I32 => super::emu_collate_pack_i32,
            IdDtype::I64 => super::emu_collate_pack_i64,
        };
        // SAFETY: `CollatePlan::new` validated the batch (offsets from 0, non-decreasing, ending at the
        // token count), so every token read is in bounds; the outputs hold `total` positions and
        // cu_seqlens rows + 1 (+ 1 with a pad tail) entries, which is what the kernel writes.
        unsafe { kernel(&launch, &args) };
        if cu_seqlens != host_cu_seqlens {
            return Err(Error::Cuda(format!(
                "the kernel wrote cu_seqlens {cu_seqlens:?}, the host computed {host_cu_seqlens:?}"
            )));
        }
        Ok(Pack {
            input_ids: input_ids.ids(spec.id_dtype, total),
            labels: labels.ids(spec.id_dtype, total),
            response_mask: bools_from_bytes(mask.as_slice::<u8>(total))?,
            position_ids: positions.ids(spec.id_dtype, total),
            cu_seqlens,
            max_seqlen,
            stats: plan.pack_stats(batch, total),
        })
    }
}
