//! The CUDA backend: the kernels of `kernels/` on a real GPU, through cudarc's driver API (loaded at run
//! time, so the crate builds and runs where no CUDA is installed).
//!
//! | CPU                         | CUDA                                   |
//! | --------------------------- | -------------------------------------- |
//! | [`crate::RaggedBatch`]      | one pinned staging copy, one H2D copy  |
//! | [`crate::backend::cpu::collate()`] | [`CudaCollator::collate`] (one launch) |
//! | [`crate::Batch`]            | [`DeviceBatch`] (`CudaSlice`s), [`DeviceBatch::to_host`] |
//!
//! Most callers reach it through [`crate::Device`]; the types here are for trainers that keep their
//! tensors on the device.
//!
//! 1. Get a stream: your own (`Arc<CudaStream>` from your context), or [`default_stream`].
//! 2. `CudaCollator::new(stream)` loads the kernels (prebuilt PTX, else NVRTC at run time).
//! 3. `collate(&packed, &spec)` validates the batch on the host, copies it once, launches once and
//!    returns device tensors without synchronizing the host.

pub mod bench;
mod collate;
#[cfg(feature = "cublas")]
mod linear;
mod loss;
pub mod memory;
mod module;
#[cfg(feature = "nccl")]
mod nccl;
mod parallel;

use std::sync::{Arc, OnceLock};

pub use collate::{
    BatchBuffers, CudaCollator, DeviceBatch, DeviceIds, DeviceIdsMut, DevicePack,
    DeviceRaggedBatch, PackBuffers, PackLayout,
};
pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
#[cfg(feature = "cublas")]
pub use linear::{LinearCeDeviceGrads, LinearCeDeviceInput, LinearCrossEntropy};
pub use loss::{
    CeBuffers, CeGrad, CeLogits, DeviceCeOutput, DeviceCeTargets, DeviceLabels, MaskedCrossEntropy,
};
pub use memory::{borrowed_stream, hand_off, DeviceRead, DeviceWrite, ForeignSlice};
pub use module::ModuleOrigin;
#[cfg(feature = "nccl")]
pub use nccl::NcclGroup;

use crate::backend::abi::Launch;
use crate::{Error, Result};

/// A launch shape as cudarc takes it.
pub(crate) fn launch_config(launch: Launch) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (launch.grid[0], launch.grid[1], launch.grid[2]),
        block_dim: (launch.block[0], launch.block[1], launch.block[2]),
        shared_mem_bytes: 0,
    }
}

/// The CUDA backend of a [`crate::Device`]: a stream, and the kernels, loaded into its context at first
/// use.
pub struct CudaDevice {
    stream: Arc<CudaStream>,
    collator: OnceLock<CudaCollator>,
    cross_entropy: OnceLock<MaskedCrossEntropy>,
    #[cfg(feature = "cublas")]
    linear: OnceLock<LinearCrossEntropy>,
    ce_row_kernel: crate::backend::CeRowKernel,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.stream.context().ordinal())
            .finish()
    }
}

impl CudaDevice {
    /// Everything on `stream`; nothing is loaded yet.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        Ok(CudaDevice {
            stream,
            collator: OnceLock::new(),
            cross_entropy: OnceLock::new(),
            #[cfg(feature = "cublas")]
            linear: OnceLock::new(),
            ce_row_kernel: Default::default(),
        })
    }

    /// The cross-entropy's forward+backward kernel from now on (the kernels load again at next use).
    pub fn set_ce_row_kernel(&mut self, kernel: crate::backend::CeRowKernel) {
        self.ce_row_kernel = kernel;
        self.cross_entropy = OnceLock::new();
    }

    /// The stream every copy and launch goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The collation kernels (loaded on first use).
    pub fn collator(&self) -> Result<&CudaCollator> {
        if let Some(collator) = self.collator.get() {
            return Ok(collator);
        }
        let loaded = CudaCollator::new(self.stream.clone())?;
        Ok(self.collator.get_or_init(|| loaded))
    }

    /// The cross-entropy kernels (loaded on first use).
    pub fn masked_cross_entropy(&self) -> Result<&MaskedCrossEntropy> {
        if let Some(kernels) = self.cross_entropy.get() {
            return Ok(kernels);
        }
        let loaded =
            MaskedCrossEntropy::new(self.stream.clone())?.with_row_kernel(self.ce_row_kernel)?;
        Ok(self.cross_entropy.get_or_init(|| loaded))
    }

    /// The cross-entropy of host inputs: copied up, computed, left on the device.
    pub(crate) fn cross_entropy<T: crate::loss::LogitElem>(
        &self,
        input: &crate::loss::CeInput<'_, T>,
        options: &crate::loss::CeOptions,
        request: crate::loss::CeRequest,
        with_grad: bool,
    ) -> Result<DeviceCeOutput<T>> {
        input.validate()?;
        let kernels = self.masked_cross_entropy()?;
        let up = HostCopy::upload(&self.stream, input)?;
        let targets = up.targets.device(input.shape);
        match with_grad {
            true => kernels.forward_backward(&up.logits, &targets, options, request),
            false => kernels.forward(&up.logits, &targets, options, request),
        }
    }

    /// cuBLAS for the fused linear cross-entropy (loaded on first use).
    #[cfg(feature = "cublas")]
    pub fn linear_cross_entropy_kernels(&self) -> Result<&LinearCrossEntropy> {
        if let Some(linear) = self.linear.get() {
            return Ok(linear);
        }
        let loaded = LinearCrossEntropy::new(self.stream.clone())?;
        Ok(self.linear.get_or_init(|| loaded))
    }

    /// The fused linear cross-entropy of host inputs: copied up, computed a chunk at a time, read back.
    #[cfg(feature = "cublas")]
    pub(crate) fn linear_cross_entropy<T: crate::loss::LogitElem>(
        &self,
        input: &crate::loss::linear::LinearCeInput<'_, T>,
        options: &crate::loss::CeOptions,
        request: crate::loss::CeRequest,
        config: &crate::loss::linear::LinearCeConfig,
    ) -> Result<crate::loss::linear::LinearCeOutput<T>> {
        let ce = self.masked_cross_entropy()?;
        self.linear_cross_entropy_kernels()?
            .host(ce, input, options, request, config)
    }
}

/// A host problem's targets copied to the device: labels, and the mask (as bytes), row weights and
/// `cu_seqlens` when given.
pub(crate) struct HostTargets {
    labels: (Option<CudaSlice<i32>>, Option<CudaSlice<i64>>),
    /// The mask as bytes (0 or 1), when there is one.
    pub mask: Option<CudaSlice<u8>>,
    weights: Option<CudaSlice<f32>>,
    cu_seqlens: Option<CudaSlice<i32>>,
}

impl HostTargets {
    pub(crate) fn upload(
        stream: &Arc<CudaStream>,
        labels: crate::loss::Labels<'_>,
        mask: Option<&[bool]>,
        weights: Option<&[f32]>,
        cu_seqlens: Option<&[i32]>,
    ) -> Result<Self> {
        use crate::loss::Labels;
        Ok(HostTargets {
            labels: match labels {
                Labels::I32(l) => (Some(cuda_result(stream.clone_htod(l))?), None),
                Labels::I64(l) => (None, Some(cuda_result(stream.clone_htod(l))?)),
            },
            mask: mask
                .map(|m| cuda_result(stream.clone_htod(crate::collate::bool_bytes(m))))
                .transpose()?,
            weights: weights
                .map(|w| cuda_result(stream.clone_htod(w)))
                .transpose()?,
            cu_seqlens: cu_seqlens
                .map(|c| cuda_result(stream.clone_htod(c)))
                .transpose()?,
        })
    }

    /// The labels, as the launchers take them.
    pub(crate) fn labels(&self) -> DeviceLabels<'_> {
        match &self.labels {
            (Some(l), _) => DeviceLabels::I32(l),
            (_, Some(l)) => DeviceLabels::I64(l),
            _ => unreachable!("one of the two was uploaded"),
        }
    }

    /// The targets of a problem of `shape`, as the launchers take them.
    pub(crate) fn device(&self, shape: crate::loss::LogitsShape) -> DeviceCeTargets<'_> {
        DeviceCeTargets {
            mask: self.mask.as_ref().map(|m| m as &dyn DeviceRead<u8>),
            weights: self.weights.as_ref().map(|w| w as &dyn DeviceRead<f32>),
            cu_seqlens: self.cu_seqlens.as_ref().map(|c| c as &dyn DeviceRead<i32>),
            ..DeviceCeTargets::unmasked(shape, self.labels())
        }
    }
}

/// A host problem's logits and targets copied to the device: what every launcher of host inputs
/// uploads.
pub(crate) struct HostCopy<T> {
    pub logits: CudaSlice<T>,
    pub targets: HostTargets,
}

impl<T: crate::loss::LogitElem> HostCopy<T> {
    /// Copy `input`'s logits (as they lie, rows `row_stride` apart) and targets to `stream`'s device.
    pub(crate) fn upload(
        stream: &Arc<CudaStream>,
        input: &crate::loss::CeInput<'_, T>,
    ) -> Result<Self> {
        Ok(HostCopy {
            logits: cuda_result(stream.clone_htod(input.logits))?,
            targets: HostTargets::upload(
                stream,
                input.labels,
                input.mask,
                input.weights,
                input.cu_seqlens,
            )?,
        })
    }
}

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version as (major, minor), e.g. (13, 0).
    pub driver_version: (i32, i32),
    pub total_memory: usize,
}

/// Find out whether a CUDA device is usable, without ever panicking: the driver library is looked for
/// first (cudarc panics on calls when it is absent), then `cuInit`, then the device count.
pub fn device_count() -> Result<usize> {
    if !library_present(&["libcuda.so.1", "libcuda.so"]) {
        return Err(Error::NoDevice(
            "the CUDA driver library (libcuda) was not found".into(),
        ));
    }
    cudarc::driver::result::init().map_err(|e| Error::NoDevice(format!("cuInit failed: {e}")))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| Error::NoDevice(format!("cuDeviceGetCount failed: {e}")))?;
    if count <= 0 {
        return Err(Error::NoDevice("the driver reports no devices".into()));
    }
    Ok(count as usize)
}

/// Facts about device `ordinal` (after [`device_count`] succeeded).
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::NoDevice(format!(
            "device {ordinal} requested, {count} present"
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(cuda_err)?;
    let mut version = 0;
    // SAFETY: the driver is loaded and initialized (device_count), and the pointer is valid for a write.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(cuda_err)?;
    Ok(DeviceInfo {
        ordinal,
        name: ctx.name().map_err(cuda_err)?,
        compute_capability: ctx.compute_capability().map_err(cuda_err)?,
        driver_version: (version / 1000, version % 1000 / 10),
        total_memory: ctx.total_mem().map_err(cuda_err)?,
    })
}

/// The default stream of device `ordinal`'s primary context, after a probe that never panics.
pub fn default_stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    device_count()?;
    Ok(CudaContext::new(ordinal)
        .map_err(cuda_err)?
        .default_stream())
}

/// Whether one of `names` loads (as cudarc's own loader would find it). Cudarc's `is_culib_present`
/// exists only when cudarc loads the CUDA libraries at run time; this probe works however a downstream
/// crate has cudarc link them (when linked, the library is already loaded and the soname found).
pub(crate) fn library_present(names: &[&str]) -> bool {
    names.iter().any(|name| {
        // SAFETY: loading a CUDA library runs only its initializers; the handle is dropped at once (the
        // library stays loaded for as long as anything else holds it).
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// A cudarc result as this crate's (for callers that use cudarc's own calls next to ours).
pub fn cuda_result<T>(r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(cuda_err)
}

pub(crate) fn cuda_err(e: impl std::fmt::Display) -> Error {
    Error::Cuda(e.to_string())
}

impl crate::backend::ToHost for DeviceBatch {
    type Host = crate::collate::Batch;
    fn to_host(&self) -> Result<Self::Host> {
        DeviceBatch::to_host(self)
    }
}

impl crate::backend::ToHost for DevicePack {
    type Host = crate::collate::Pack;
    fn to_host(&self) -> Result<Self::Host> {
        DevicePack::to_host(self)
    }
}

impl<T: crate::loss::LogitElem> crate::backend::ToHost for DeviceCeOutput<T> {
    type Host = crate::loss::CeOutput<T>;
    fn to_host(&self) -> Result<Self::Host> {
        DeviceCeOutput::to_host(self)
    }
}
