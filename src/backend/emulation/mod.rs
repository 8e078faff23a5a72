//! The emulation backend: the very same `kernels/*.cu` compiled as C++ (cargo feature `emulation`) and run
//! on CPU threads, one OS thread per CUDA thread, with real barriers, shared memory and warp shuffles (see
//! `kernels/emu/cuda_emu.h`). It fills the same argument structs ([`crate::backend::abi`]) and uses the
//! same launch shapes as the CUDA backend, with host addresses, so the tests that compare it with the CPU
//! oracle check the kernels' logic on machines without a GPU. It is a checking tool, not a fast path.

mod collate;
mod linear;
mod loss;
mod parallel;

use crate::backend::abi::{CeArgs, CeVariant, CollateArgs, CollatePackArgs, Launch};

pub use linear::linear_row_stride;
pub use loss::Grad;

/// The shared memory an H100 or H200 gives one block (227 KiB): the one-read kernels' default budget here.
pub const H100_SMEM_PER_BLOCK: usize = 227 * 1024;

/// The emulator: the CUDA kernels run on CPU threads. Every call is synchronous.
#[derive(Debug, Default, Clone, Copy)]
pub struct Emulator {
    /// Hand the cross-entropy kernel its upstream gradient through a pointer (as a trainer's device
    /// scalar) instead of by value, so both of the kernel's paths are checked.
    pub upstream_by_pointer: bool,
    /// The forward+backward kernel, as on a GPU with clusters whose blocks have
    /// [`H100_SMEM_PER_BLOCK`] of shared memory: [`crate::backend::CeRowKernel::OneRead`] runs
    /// `kernels/masked_ce_cluster.cu` where a row fits in 8 CTAs (a small `smem_per_cta` splits a row
    /// over more of them), the two-pass kernels elsewhere.
    pub ce_row_kernel: crate::backend::CeRowKernel,
}

impl Emulator {
    pub fn new() -> Self {
        Emulator::default()
    }
}

extern "C" {
    fn emu_collate_i32(cfg: *const Launch, args: *const CollateArgs);
    fn emu_collate_i64(cfg: *const Launch, args: *const CollateArgs);
    fn emu_collate_pack_i32(cfg: *const Launch, args: *const CollatePackArgs);
    fn emu_collate_pack_i64(cfg: *const Launch, args: *const CollatePackArgs);
    fn emu_masked_ce_count(cfg: *const Launch, args: *const CeArgs);
    fn emu_masked_ce_documents(cfg: *const Launch, args: *const CeArgs);
    fn emu_masked_ce_reduce(cfg: *const Launch, args: *const CeArgs);
    fn emu_selftest_reduce(cfg: *const Launch, input: *const f32, out: *mut f32, ballots: *mut u32);
    fn emu_abi_layout(out: *mut u64, capacity: u64) -> u64;
}

/// An emulated kernel launch: the launch shape and the kernel's argument struct.
type EmuKernel<Args> = unsafe extern "C" fn(*const Launch, *const Args);

/// Declares the emulator's cross-entropy kernels and the lookup by (backward, dtype, variant).
macro_rules! ce_kernels {
    ($($backward:literal $suffix:literal $variant:ident => $f:ident),* $(,)?) => {
        extern "C" {
            $(fn $f(cfg: *const Launch, args: *const CeArgs);)*
        }

        /// The emulated `masked_ce_{fwd,fwd_bwd}_{suffix}_{variant}`.
        fn ce_kernel(backward: bool, suffix: &str, variant: CeVariant) -> EmuKernel<CeArgs> {
            match (backward, suffix, variant) {
                $(($backward, $suffix, CeVariant::$variant) => $f,)*
                _ => unreachable!("a logits dtype without kernels: {suffix}"),
            }
        }
    };
}

ce_kernels! {
    false "f32" Lean => emu_masked_ce_fwd_f32_lean,
    false "f32" Entropy => emu_masked_ce_fwd_f32_entropy,
    false "f32" Full => emu_masked_ce_fwd_f32_full,
    true "f32" Lean => emu_masked_ce_fwd_bwd_f32_lean,
    true "f32" Entropy => emu_masked_ce_fwd_bwd_f32_entropy,
    true "f32" Full => emu_masked_ce_fwd_bwd_f32_full,
    false "f16" Lean => emu_masked_ce_fwd_f16_lean,
    false "f16" Entropy => emu_masked_ce_fwd_f16_entropy,
    false "f16" Full => emu_masked_ce_fwd_f16_full,
    true "f16" Lean => emu_masked_ce_fwd_bwd_f16_lean,
    true "f16" Entropy => emu_masked_ce_fwd_bwd_f16_entropy,
    true "f16" Full => emu_masked_ce_fwd_bwd_f16_full,
    false "bf16" Lean => emu_masked_ce_fwd_bf16_lean,
    false "bf16" Entropy => emu_masked_ce_fwd_bf16_entropy,
    false "bf16" Full => emu_masked_ce_fwd_bf16_full,
    true "bf16" Lean => emu_masked_ce_fwd_bwd_bf16_lean,
    true "bf16" Entropy => emu_masked_ce_fwd_bwd_bf16_entropy,
    true "bf16" Full => emu_masked_ce_fwd_bwd_bf16_full,
}

/// An emulated cluster launch: the launch shape, the cluster size, each CTA's dynamic shared memory
/// and the kernel's argument struct.
type EmuClusterKernel<Args> = unsafe extern "C" fn(*const Launch, u32, u64, *const Args);

macro_rules! cluster_kernels {
    ($($suffix:literal $variant:ident => $f:ident),* $(,)?) => {
        extern "C" {
            $(fn $f(cfg: *const Launch, cluster: u32, smem: u64, args: *const CeArgs);)*
        }

        /// The emulated `masked_ce_fwd_bwd_{suffix}_{variant}_cluster`.
        fn cluster_kernel(suffix: &str, variant: CeVariant) -> EmuClusterKernel<CeArgs> {
            match (suffix, variant) {
                $(($suffix, CeVariant::$variant) => $f,)*
                _ => unreachable!("a logits dtype without kernels: {suffix}"),
            }
        }
    };
}

cluster_kernels! {
    "f32" Lean => emu_masked_ce_fwd_bwd_f32_lean_cluster,
    "f32" Entropy => emu_masked_ce_fwd_bwd_f32_entropy_cluster,
    "f32" Full => emu_masked_ce_fwd_bwd_f32_full_cluster,
    "f16" Lean => emu_masked_ce_fwd_bwd_f16_lean_cluster,
    "f16" Entropy => emu_masked_ce_fwd_bwd_f16_entropy_cluster,
    "f16" Full => emu_masked_ce_fwd_bwd_f16_full_cluster,
    "bf16" Lean => emu_masked_ce_fwd_bwd_bf16_lean_cluster,
    "bf16" Entropy => emu_masked_ce_fwd_bwd_bf16_entropy_cluster,
    "bf16" Full => emu_masked_ce_fwd_bwd_bf16_full_cluster,
}

extern "C" {
    fn emu_masked_ce_shard_fwd_f32(cfg: *const Launch, args: *const CeArgs);
    fn emu_masked_ce_shard_fwd_f16(cfg: *const Launch, args: *const CeArgs);
    fn emu_masked_ce_shard_fwd_bf16(cfg: *const Launch, args: *const CeArgs);
    fn emu_masked_ce_shard_bwd_f32(cfg: *const Launch, args: *const CeArgs);
    fn emu_masked_ce_shard_bwd_f16(cfg: *const Launch, args: *const CeArgs);
    fn emu_masked_ce_shard_bwd_bf16(cfg: *const Launch, args: *const CeArgs);
}

/// The emulated `masked_ce_shard_{fwd,bwd}_{suffix}` (vocabulary-parallel).
fn shard_kernel(backward: bool, suffix: &str) -> EmuKernel<CeArgs> {
    match (backward, suffix) {
        (false, "f32") => emu_masked_ce_shard_fwd_f32,
        (false, "f16") => emu_masked_ce_shard_fwd_f16,
        (false, "bf16") => emu_masked_ce_shard_fwd_bf16,
        (true, "f32") => emu_masked_ce_shard_bwd_f32,
        (true, "f16") => emu_masked_ce_shard_bwd_f16,
        (true, "bf16") => emu_masked_ce_shard_bwd_bf16,
        _ => unreachable!("a logits dtype without kernels: {suffix}"),
    }
}

/// The size of every argument struct and the offset of every field as the C++ compiler lays them out, in
/// the order of [`crate::backend::abi::ABI_LAYOUT`].
pub fn abi_layout() -> Vec<u64> {
    let mut out = vec![0u64; 4096];
    // SAFETY: the function writes at most `capacity` entries into `out` and returns how many it has.
    let n = unsafe { emu_abi_layout(out.as_mut_ptr(), out.len() as u64) };
    out.truncate(n as usize);
    out
}

/// A host address as the kernels' ABI carries it.
fn addr<T>(p: *const T) -> u64 {
    p as u64
}

/// `base` with the addresses of `input`'s targets as the cross-entropy kernels read them: labels (and
/// whether they are i64), the mask's bytes (the `bool`s themselves), weights and `cu_seqlens` (0: none).
fn with_targets<T>(base: CeArgs, input: &crate::loss::CeInput<'_, T>) -> CeArgs {
    use crate::loss::Labels;
    let (labels, labels_are_i64) = match input.labels {
        Labels::I32(v) => (addr(v.as_ptr()), 0),
        Labels::I64(v) => (addr(v.as_ptr()), 1),
    };
    CeArgs {
        labels,
        labels_are_i64,
        mask: input
            .mask
            .map_or(0, |m| addr(crate::collate::bool_bytes(m).as_ptr())),
        weights: input.weights.map_or(0, |w| addr(w.as_ptr())),
        cu_seqlens: input.cu_seqlens.map_or(0, |cu| addr(cu.as_ptr())),
        ..base
    }
}

/// A host buffer aligned like device memory (256 bytes), so that the kernels' vector paths run here as
/// they do on the GPU.
pub(crate) struct DeviceLikeBuffer {
    chunks: Vec<Chunk>,
}

#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(256))]
struct Chunk([u8; 256]);

impl DeviceLikeBuffer {
    pub fn zeroed(bytes: usize) -> Self {
        DeviceLikeBuffer {
            chunks: vec![Chunk([0; 256]); bytes.div_ceil(256).max(1)],
        }
    }

    /// A copy of `data` in aligned memory.
    pub fn from_slice<T: bytemuck::Pod>(data: &[T]) -> Self {
        let mut buffer = Self::zeroed(std::mem::size_of_val(data));
        buffer.as_mut_slice::<T>(data.len()).copy_from_slice(data);
        buffer
    }

    pub fn as_mut_slice<T: bytemuck::Pod>(&mut self, len: usize) -> &mut [T] {
        &mut bytemuck::cast_slice_mut::<Chunk, T>(&mut self.chunks)[..len]
    }

    pub fn as_slice<T: bytemuck::Pod>(&self, len: usize) -> &[T] {
        &bytemuck::cast_slice::<Chunk, T>(&self.chunks)[..len]
    }

    /// The buffer's address, for the kernels' argument structs.
    pub fn addr(&mut self) -> u64 {
        self.chunks.as_mut_ptr() as u64
    }

    /// The first `len` elements as ids of `dtype`.
    pub fn ids(&self, dtype: crate::IdDtype, len: usize) -> crate::collate::IdTensor {
        use crate::collate::IdTensor;
        match dtype {
            crate::IdDtype::I32 => IdTensor::I32(self.as_slice::<i32>(len).to_vec()),
            crate::IdDtype::I64 => IdTensor::I64(self.as_slice::<i64>(len).to_vec()),
        }
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
    let cfg = Launch {
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
