//! The emulation backend: the very same `kernels/*.cu` compiled as C++ (cargo feature `emulation`) and run
//! on CPU threads, one OS thread per CUDA thread, with real barriers, shared memory and warp shuffles (see
//! `kernels/emu/cuda_emu.h`). It takes the same arguments and launch shapes as the CUDA backend, so the
//! tests that compare it with the CPU oracle check the kernels' logic on machines without a GPU. It is a
//! checking tool, not a fast path.

mod collate;
mod loss;

pub use collate::{selftest_reduce, EmulatedCollator};
pub use loss::EmulatedMaskedCrossEntropy;

/// The launch shape as the C++ side reads it.
#[repr(C)]
pub(crate) struct EmuLaunch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
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

    /// The first `len` elements as ids of `dtype`.
    pub fn ids(&self, dtype: crate::IdDtype, len: usize) -> crate::IdTensor {
        match dtype {
            crate::IdDtype::I32 => crate::IdTensor::I32(self.as_slice::<i32>(len).to_vec()),
            crate::IdDtype::I64 => crate::IdTensor::I64(self.as_slice::<i64>(len).to_vec()),
        }
    }
}
