//! The trainer's memory and streams: what the CUDA API takes as inputs and outputs, so that a trainer
//! passes the buffers it already has (a `CudaSlice`, a view of part of one, a framework tensor's memory)
//! and the stream it already runs on, and nothing is copied or synchronized behind its back.
//!
//! - [`DeviceRead`] / [`DeviceWrite`]: anything a kernel can read or write. Implemented for every
//!   cudarc `DevicePtr` / `DevicePtrMut` (`CudaSlice`, `CudaView`, `CudaViewMut`: a tensor at an
//!   offset is `slice.slice(a..b)`), and for [`ForeignSlice`].
//! - [`ForeignSlice`]: a raw device address and length owned elsewhere (PyTorch's `data_ptr()`, DLPack,
//!   burn's resource pointer, tch), never freed here.
//! - [`borrowed_stream`]: a raw `CUstream` owned elsewhere (`torch.cuda.current_stream().cuda_stream`).
//! - [`hand_off`]: make another stream wait for this one's work with an event, never the host.
//!
//! Cudarc's own buffers carry read/write events, so work on them from different streams is ordered
//! automatically; a [`ForeignSlice`] carries none: its owner orders it (all work on one stream, or
//! [`hand_off`]).

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop,
};

use super::cuda_err;
use crate::Result;

/// Device memory a kernel reads: `len` elements of `T`.
pub trait DeviceRead<T> {
    /// Elements.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The address for a read on `stream`; the guard records the read when dropped after the launch.
    fn read_addr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>);
}

/// Device memory a kernel writes.
pub trait DeviceWrite<T>: DeviceRead<T> {
    /// The address for a write on `stream`; the guard records the write when dropped after the launch.
    fn write_addr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>);
}

impl<T, S: DevicePtr<T>> DeviceRead<T> for S {
    fn len(&self) -> usize {
        DeviceSlice::len(self)
    }
    fn read_addr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr(stream)
    }
}

impl<T, S: DevicePtr<T> + DevicePtrMut<T>> DeviceWrite<T> for S {
    fn write_addr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr_mut(stream)
    }
}

/// Device memory owned by someone else: an address and a length. Dropping it frees nothing.
#[derive(Debug)]
pub struct ForeignSlice<T> {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
    marker: PhantomData<*const T>,
}

// SAFETY: a ForeignSlice is an address and a length; the memory's owner promised (in `new`) that it
// stays valid while the wrapper is used, from any thread, as device memory is.
unsafe impl<T> Send for ForeignSlice<T> {}
// SAFETY: as above; reads of the address from several threads race no more than the kernels do.
unsafe impl<T> Sync for ForeignSlice<T> {}

impl<T> ForeignSlice<T> {
    /// Wrap `len` elements of `T` at device address `ptr`, in the context of `stream`.
    ///
    /// # Safety
    /// - `ptr` is a device allocation (or part of one) of the stream's context, aligned for `T`, with at
    ///   least `len` elements, valid for as long as the wrapper (or any result that reads it) is used;
    /// - for a write ([`DeviceWrite`]), nothing else reads or writes the memory in the meantime;
    /// - work on the memory from other streams is ordered by the caller (the wrapper records no events).
    pub unsafe fn new(stream: Arc<CudaStream>, ptr: u64, len: usize) -> Self {
        ForeignSlice {
            ptr,
            len,
            stream,
            marker: PhantomData,
        }
    }

    /// The address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl<T> DeviceSlice<T> for ForeignSlice<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for ForeignSlice<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for ForeignSlice<T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

/// A stream owned by someone else (PyTorch's current stream, say) on device `ordinal`'s primary context,
/// which is the context PyTorch and most frameworks use. Dropping it destroys nothing.
///
/// # Safety
/// `stream` is a valid `CUstream` of device `ordinal`'s primary context (or 0, the legacy default
/// stream), and stays valid for as long as the returned stream or anything made on it is used.
pub unsafe fn borrowed_stream(ordinal: usize, stream: u64) -> Result<Arc<CudaStream>> {
    super::device_count()?;
    let context = CudaContext::new(ordinal).map_err(cuda_err)?;
    // SAFETY: the caller's contract above is cudarc's.
    Ok(unsafe { context.wrap_borrowed_stream(stream as sys::CUstream) })
}

/// Make `consumer` wait, on the device, for everything submitted to `producer` so far (an event recorded
/// on one, waited for by the other): the host never waits.
pub fn hand_off(producer: &CudaStream, consumer: &CudaStream) -> Result<()> {
    if producer == consumer {
        return Ok(());
    }
    let event = producer.record_event(None).map_err(cuda_err)?;
    consumer.wait(&event).map_err(cuda_err)
}
