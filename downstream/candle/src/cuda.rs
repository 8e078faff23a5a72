//! The CUDA path: our kernels on candle's stream, over candle's memory, results wrapped as candle
//! storage. Nothing here synchronizes the host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDType, DeviceId};
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaView};
use sft_collate::backend::cuda::{
    self as ours_cuda, DeviceCeTargets, DeviceIds, DeviceLabels, MaskedCrossEntropy,
};
use sft_collate::loss::{CeOptions, CeRequest, LogitElem, LogitsShape};
use sft_collate::{CollateSpec, Placed, RaggedBatch};

use super::{ours, CandleBatch};

/// One sft-collate device (kernels loaded once) per candle device, on candle's stream.
fn device_for(dev: &CudaDevice) -> candle_core::Result<Arc<sft_collate::Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<DeviceId, Arc<sft_collate::Device>>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .expect("no panic while holding the lock");
    if let Some(d) = devices.get(&dev.id()) {
        return Ok(d.clone());
    }
    let d = Arc::new(sft_collate::Device::cuda_on_stream(dev.cuda_stream()).map_err(ours)?);
    devices.insert(dev.id(), d.clone());
    Ok(d)
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: (usize, usize)) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
}

pub(crate) fn collate(
    dev: &CudaDevice,
    ragged: &RaggedBatch,
    spec: &CollateSpec,
) -> candle_core::Result<CandleBatch> {
    let device = device_for(dev)?;
    let Placed::Device(batch) = device.collate(ragged, spec).map_err(ours)? else {
        bail!("a CUDA device collates on the device");
    };
    let shape = batch.shape();
    let ids = |ids: DeviceIds| match ids {
        DeviceIds::I32(s) => wrap(s, dev, shape),
        DeviceIds::I64(s) => wrap(s, dev, shape),
    };
    Ok(CandleBatch {
        input_ids: ids(batch.input_ids),
        labels: ids(batch.labels),
        response_mask: wrap(batch.response_mask, dev, shape),
        stats: batch.stats,
    })
}

/// The op's inputs as candle hands them over.
pub(crate) struct Inputs<'a> {
    pub logits: (&'a CudaStorage, &'a Layout),
    pub labels: (&'a CudaStorage, &'a Layout),
    pub mask: (&'a CudaStorage, &'a Layout),
    pub rows: usize,
    pub vocab: usize,
}

/// The elements a contiguous layout covers, as a view.
fn view<'a, T: CudaDType>(
    (storage, layout): (&'a CudaStorage, &Layout),
    name: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let slice = storage.as_cuda_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => bail!("{name} must be contiguous (call .contiguous() first)"),
    }
}

/// Labels (I64 or I32) as the kernel reads them.
enum LabelView<'a> {
    I32(CudaView<'a, i32>),
    I64(CudaView<'a, i64>),
}

impl LabelView<'_> {
    fn of<'a>(labels: (&'a CudaStorage, &Layout)) -> candle_core::Result<LabelView<'a>> {
        Ok(match labels.0.dtype() {
            candle_core::DType::I64 => LabelView::I64(view(labels, "labels")?),
            candle_core::DType::I32 => LabelView::I32(view(labels, "labels")?),
            other => bail!("labels must be I64 or I32, got {other:?}"),
        })
    }
    fn device(&self) -> DeviceLabels<'_> {
        match self {
            LabelView::I32(v) => DeviceLabels::I32(v),
            LabelView::I64(v) => DeviceLabels::I64(v),
        }
    }
}

/// The op's inputs as views, and the kernels of the logits' device.
struct Views<'a, T> {
    device: Arc<sft_collate::Device>,
    logits: CudaView<'a, T>,
    labels: LabelView<'a>,
    mask: CudaView<'a, u8>,
    shape: LogitsShape,
}

impl<'a, T: CudaDType> Views<'a, T> {
    fn of(inputs: &Inputs<'a>) -> candle_core::Result<Self> {
        Ok(Views {
            device: device_for(inputs.logits.0.device())?,
            logits: view::<T>(inputs.logits, "logits")?,
            labels: LabelView::of(inputs.labels)?,
            mask: view::<u8>(inputs.mask, "mask")?,
            shape: LogitsShape::dense(inputs.rows, inputs.vocab),
        })
    }

    fn kernels(&self) -> candle_core::Result<&MaskedCrossEntropy> {
        let cuda = self.device.as_cuda().expect("a CUDA device");
        cuda.masked_cross_entropy().map_err(ours)
    }

    fn targets(&self) -> DeviceCeTargets<'_> {
        DeviceCeTargets::new(self.shape, self.labels.device(), &self.mask)
    }
}

/// The loss as a one-element device buffer.
pub(crate) fn loss(inputs: &Inputs<'_>, options: &CeOptions) -> candle_core::Result<CudaStorage> {
    by_dtype!(inputs.logits.0.dtype(), loss_of(inputs, options))
}

fn loss_of<T: LogitElem + CudaDType>(
    inputs: &Inputs<'_>,
    options: &CeOptions,
) -> candle_core::Result<CudaStorage> {
    let v = Views::<T>::of(inputs)?;
    let out = v
        .kernels()?
        .forward(&v.logits, &v.targets(), options, CeRequest::NONE)
        .map_err(ours)?;
    // [sum, loss, z_sum] -> the loss alone, copied on the stream.
    let dev = inputs.logits.0.device();
    let stream = dev.cuda_stream();
    let mut scalar = stream.alloc_zeros::<f32>(1).map_err(ours_cuda_err)?;
    stream
        .memcpy_dtod(&out.scalars.slice(1..2), &mut scalar)
        .map_err(ours_cuda_err)?;
    Ok(CudaStorage::wrap_cuda_slice(scalar, dev.clone()))
}

/// `upstream · d loss / d logits`, dense in the logits' dtype, the upstream gradient read on the device.
pub(crate) fn gradient(
    inputs: &Inputs<'_>,
    upstream: (&CudaStorage, &Layout),
    options: &CeOptions,
) -> candle_core::Result<CudaStorage> {
    by_dtype!(
        inputs.logits.0.dtype(),
        gradient_of(inputs, upstream, options)
    )
}

fn gradient_of<T: LogitElem + CudaDType>(
    inputs: &Inputs<'_>,
    upstream: (&CudaStorage, &Layout),
    options: &CeOptions,
) -> candle_core::Result<CudaStorage> {
    let v = Views::<T>::of(inputs)?;
    let upstream = view::<f32>(upstream, "the upstream gradient")?;
    let targets = DeviceCeTargets {
        upstream: Some(&upstream),
        ..v.targets()
    };
    let out = v
        .kernels()?
        .forward_backward(&v.logits, &targets, options, CeRequest::NONE)
        .map_err(ours)?;
    let grad = out.grad.expect("forward_backward writes a new gradient");
    Ok(CudaStorage::wrap_cuda_slice(
        grad,
        inputs.logits.0.device().clone(),
    ))
}

fn ours_cuda_err(e: cudarc::driver::DriverError) -> candle_core::Error {
    ours(ours_cuda::cuda_result::<()>(Err(e)).unwrap_err())
}
