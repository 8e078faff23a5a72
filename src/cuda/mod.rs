//! The CUDA backend: the kernels of `kernels/` on a real GPU, through cudarc's driver API (loaded at run
//! time, so the crate builds and runs where no CUDA is installed).
//!
//! | CPU                         | CUDA                                   |
//! | --------------------------- | -------------------------------------- |
//! | [`crate::PackedBatch`]      | one pinned staging copy, one H2D copy  |
//! | [`crate::cpu::collate()`]     | [`CudaCollator::collate`] (one launch) |
//! | [`crate::Batch`]            | [`DeviceBatch`] (`CudaSlice`s), [`DeviceBatch::to_host`] |
//!
//! 1. Get a stream: your own (`Arc<CudaStream>` from your context), or [`default_stream`].
//! 2. `CudaCollator::new(stream)` loads the kernels (prebuilt PTX, else NVRTC at run time).
//! 3. `collate(&packed, &spec)` validates the batch on the host, copies it once, launches once and
//!    returns device tensors without synchronizing the host.

pub mod bench;
mod collate;
mod loss;
mod module;

use std::sync::Arc;

pub use collate::{CudaCollator, DeviceBatch, DeviceIds, DevicePackedBatch, DevicePackedLayout};
pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
pub use loss::{CeRequest, DeviceCeOutput, DeviceCeTargets, DeviceLabels, MaskedCrossEntropy};
pub use module::ModuleOrigin;

use crate::{Error, Result};

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
    // SAFETY: probing for a shared library has no preconditions.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
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

/// A cudarc result as this crate's (for callers that use cudarc's own calls next to ours).
pub fn cuda_result<T>(r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(cuda_err)
}

pub(crate) fn cuda_err(e: impl std::fmt::Display) -> Error {
    Error::Cuda(e.to_string())
}
