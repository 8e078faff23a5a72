//! The collation kernel on the emulator.

use crate::plan::CollatePlan;
use crate::{Batch, CollateSpec, IdDtype, PackedBatch, PackedLayout, Result};

use super::{DeviceLikeBuffer, EmuLaunch};

macro_rules! collate_decl {
    ($($name:ident: $id:ty),*) => {
        extern "C" {
            $(
                fn $name(
                    cfg: *const EmuLaunch,
                    tokens: *const u32,
                    row_offsets: *const u64,
                    prompt_lens: *const u32,
                    trainable: *const u8,
                    rows: u64,
                    width: u64,
                    pad_id: u32,
                    ignore_index: i64,
                    use_ignore_index: i32,
                    input_ids: *mut $id,
                    labels: *mut $id,
                    response_mask: *mut u8,
                    attention_mask: *mut u8,
                );
            )*
            fn emu_selftest_reduce(cfg: *const EmuLaunch, input: *const f32, out: *mut f32, ballots: *mut u32);
        }
    };
}
collate_decl!(emu_collate_i32: i32, emu_collate_i64: i64);

macro_rules! collate_packed_decl {
    ($($name:ident: $id:ty),*) => {
        extern "C" {
            $(
                fn $name(
                    cfg: *const EmuLaunch,
                    tokens: *const u32,
                    row_offsets: *const u64,
                    prompt_lens: *const u32,
                    trainable: *const u8,
                    rows: u64,
                    total: u64,
                    pad_id: u32,
                    ignore_index: i64,
                    use_ignore_index: i32,
                    input_ids: *mut $id,
                    labels: *mut $id,
                    response_mask: *mut u8,
                    position_ids: *mut $id,
                    cu_seqlens: *mut i32,
                );
            )*
        }
    };
}
collate_packed_decl!(emu_collate_packed_i32: i32, emu_collate_packed_i64: i64);

/// The collation kernel run by the emulator. Same API as `cuda::CudaCollator`, with host results.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmulatedCollator;

impl EmulatedCollator {
    pub fn new() -> Self {
        EmulatedCollator
    }

    /// Collate `packed` by running `collate_<dtype>` on CPU threads.
    pub fn collate(&self, packed: &PackedBatch, spec: &CollateSpec) -> Result<Batch> {
        let plan = CollatePlan::new(packed, spec)?;
        let n = plan.len();
        let mut input_ids = DeviceLikeBuffer::zeroed(n * spec.id_dtype.size());
        let mut labels = DeviceLikeBuffer::zeroed(n * spec.id_dtype.size());
        let mut response_mask = DeviceLikeBuffer::zeroed(n);
        let mut attention_mask = DeviceLikeBuffer::zeroed(n);
        if n > 0 {
            let (grid, block) = plan.launch_shape();
            let cfg = EmuLaunch { grid, block };
            let attention_ptr = if spec.attention_mask {
                attention_mask.as_mut_slice::<u8>(n).as_mut_ptr()
            } else {
                std::ptr::null_mut()
            };
            let mask_ptr = response_mask.as_mut_slice::<u8>(n).as_mut_ptr();
            macro_rules! launch {
                ($kernel:ident, $id:ty) => {
                    // SAFETY: `CollatePlan::new` validated the packed batch (offsets start at 0, never
                    // decrease, end at the token count; prompts fit their rows) and sized the outputs:
                    // every pointer covers rows × width elements (row_offsets rows + 1), so the kernel's
                    // reads stay inside `tokens` and its writes inside the buffers.
                    unsafe {
                        $kernel(
                            &cfg,
                            packed.tokens().as_ptr(),
                            packed.row_offsets().as_ptr(),
                            packed.prompt_lens().as_ptr(),
                            packed.trainable().map_or(std::ptr::null(), <[u8]>::as_ptr),
                            plan.rows as u64,
                            plan.width as u64,
                            plan.pad_id,
                            plan.ignore_index.unwrap_or(0),
                            i32::from(plan.ignore_index.is_some()),
                            input_ids.as_mut_slice::<$id>(n).as_mut_ptr(),
                            labels.as_mut_slice::<$id>(n).as_mut_ptr(),
                            mask_ptr,
                            attention_ptr,
                        )
                    }
                };
            }
            match spec.id_dtype {
                IdDtype::I32 => launch!(emu_collate_i32, i32),
                IdDtype::I64 => launch!(emu_collate_i64, i64),
            }
        }
        let ids = |buf: &mut DeviceLikeBuffer| buf.ids(spec.id_dtype, n);
        Ok(Batch {
            input_ids: ids(&mut input_ids),
            labels: ids(&mut labels),
            response_mask: crate::batch::bools_from_bytes(response_mask.as_mut_slice::<u8>(n))?,
            attention_mask: if spec.attention_mask {
                Some(crate::batch::bools_from_bytes(
                    attention_mask.as_mut_slice::<u8>(n),
                )?)
            } else {
                None
            },
            stats: plan.stats(packed),
        })
    }
}

impl EmulatedCollator {
    /// The packed (padding-free) layout of `packed` (every row a document), by `collate_packed_<dtype>`.
    pub fn collate_packed(&self, packed: &PackedBatch, spec: &CollateSpec) -> Result<PackedLayout> {
        let plan = CollatePlan::new(packed, spec)?;
        let total = CollatePlan::packed_total(packed.tokens().len(), spec)?;
        let (host_cu_seqlens, max_seqlen) =
            CollatePlan::packed_boundaries(packed.row_offsets(), total);
        let size = spec.id_dtype.size();
        let mut input_ids = DeviceLikeBuffer::zeroed(total * size);
        let mut labels = DeviceLikeBuffer::zeroed(total * size);
        let mut positions = DeviceLikeBuffer::zeroed(total * size);
        let mut mask = DeviceLikeBuffer::zeroed(total);
        let mut cu_seqlens = vec![0i32; host_cu_seqlens.len()];
        let (grid, block) = plan.packed_launch_shape(total);
        let cfg = EmuLaunch { grid, block };
        macro_rules! launch {
            ($kernel:ident, $id:ty) => {
                // SAFETY: `CollatePlan::new` validated the batch (offsets from 0, non-decreasing, ending at
                // the token count), so every token read is in bounds; the outputs hold `total` positions
                // and cu_seqlens rows + 1 (+ 1 with a pad tail) entries, which is what the kernel writes.
                unsafe {
                    $kernel(
                        &cfg,
                        packed.tokens().as_ptr(),
                        packed.row_offsets().as_ptr(),
                        packed.prompt_lens().as_ptr(),
                        packed.trainable().map_or(std::ptr::null(), <[u8]>::as_ptr),
                        plan.rows as u64,
                        total as u64,
                        plan.pad_id,
                        plan.ignore_index.unwrap_or(0),
                        i32::from(plan.ignore_index.is_some()),
                        input_ids.as_mut_slice::<$id>(total).as_mut_ptr(),
                        labels.as_mut_slice::<$id>(total).as_mut_ptr(),
                        mask.as_mut_slice::<u8>(total).as_mut_ptr(),
                        positions.as_mut_slice::<$id>(total).as_mut_ptr(),
                        cu_seqlens.as_mut_ptr(),
                    )
                }
            };
        }
        match spec.id_dtype {
            IdDtype::I32 => launch!(emu_collate_packed_i32, i32),
            IdDtype::I64 => launch!(emu_collate_packed_i64, i64),
        }
        let ids = |buf: &mut DeviceLikeBuffer| buf.ids(spec.id_dtype, total);
        if cu_seqlens != host_cu_seqlens {
            return Err(crate::Error::Cuda(format!(
                "the kernel wrote cu_seqlens {cu_seqlens:?}, the host computed {host_cu_seqlens:?}"
            )));
        }
        Ok(PackedLayout {
            input_ids: ids(&mut input_ids),
            labels: ids(&mut labels),
            response_mask: crate::batch::bools_from_bytes(mask.as_mut_slice::<u8>(total))?,
            position_ids: ids(&mut positions),
            cu_seqlens,
            max_seqlen,
            stats: plan.packed_stats(packed, total),
        })
    }
}

/// Run the shim's self-test kernel: for each block of `block` threads, (sum by xor shuffles, sum by down
/// shuffles, sum by atomicAdd) and each warp's ballot of `x > 0`. `input.len()` must be a multiple of
/// `block`, and `block` a multiple of 32 up to 1024.
pub fn selftest_reduce(input: &[f32], block: u32) -> (Vec<[f32; 3]>, Vec<u32>) {
    assert!(block % 32 == 0 && (32..=1024).contains(&block));
    assert_eq!(input.len() % block as usize, 0);
    let blocks = input.len() / block as usize;
    let mut out = vec![[0f32; 3]; blocks];
    let mut ballots = vec![0u32; blocks * (block as usize / 32)];
    let cfg = EmuLaunch {
        grid: [blocks as u32, 1, 1],
        block: [block, 1, 1],
    };
    if blocks > 0 {
        // SAFETY: `input` has blocks × block elements, `out` 3 per block, `ballots` one per warp, which is
        // exactly what the kernel indexes.
        unsafe {
            emu_selftest_reduce(
                &cfg,
                input.as_ptr(),
                out.as_mut_ptr().cast(),
                ballots.as_mut_ptr(),
            )
        };
    }
    (out, ballots)
}
