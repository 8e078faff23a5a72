//! `sft-collate` inside a candle trainer (candle-core 0.11).
//!
//! - [`collate`]: a ragged batch collated into candle tensors (`input_ids`, `labels`, `response_mask`)
//!   on the tensors' device: on the CPU by the CPU path, on a CUDA device by the collation kernel on
//!   candle's own stream, the result wrapped as candle storage without a copy.
//! - [`MaskedCrossEntropy`]: the fused masked cross-entropy as a candle `CustomOp3` (logits, labels,
//!   mask → a scalar loss) with backward, so `loss.backward()` gives `d loss / d logits` from the same
//!   kernel. The upstream gradient (`grad_res`) is handed to the kernel as a device scalar: nothing reads
//!   it on the host.
//!
//! The CPU path is built and tested in CI; the CUDA path (`--features cuda`) needs candle's kernels,
//! which need `nvcc` (see ../README.md).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType,
};
use sft_collate::loss::{CeInput, CeOptions, CeOutput, CeRequest, Labels, LogitElem};
use sft_collate::{BatchStats, CollateSpec, IdTensor, RaggedBatch};

/// `$f::<T>(args)` with `T` the logits' element type (F32, F16 or BF16), else an error.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            other => candle_core::bail!("logits must be F32, F16 or BF16, got {other:?}"),
        }
    };
}

/// Our error as candle's.
fn ours(e: sft_collate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// A collated batch as candle tensors, all `[rows, width]`: ids in the spec's dtype (I64 or I32),
/// `response_mask` as U8 (0 or 1).
#[derive(Debug)]
pub struct CandleBatch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    pub response_mask: Tensor,
    pub stats: BatchStats,
}

/// Collate `ragged` on `device` (CPU or CUDA) into candle tensors.
pub fn collate(
    device: &candle_core::Device,
    ragged: &RaggedBatch,
    spec: &CollateSpec,
) -> candle_core::Result<CandleBatch> {
    match device {
        candle_core::Device::Cpu => {
            let batch = sft_collate::Device::cpu()
                .collate(ragged, spec)
                .map_err(ours)?
                .to_host()
                .map_err(ours)?;
            let shape = batch.shape();
            let ids = |t: IdTensor| match t {
                IdTensor::I32(v) => Tensor::from_vec(v, shape, device),
                IdTensor::I64(v) => Tensor::from_vec(v, shape, device),
            };
            let response_mask =
                Tensor::from_vec(batch.response_mask_bytes().to_vec(), shape, device)?;
            Ok(CandleBatch {
                input_ids: ids(batch.input_ids)?,
                labels: ids(batch.labels)?,
                response_mask,
                stats: batch.stats,
            })
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda::collate(dev, ragged, spec),
        other => bail!(
            "sft-collate collates on the CPU or a CUDA device, not {:?}",
            other.location()
        ),
    }
}

/// The masked cross-entropy as a candle op: `logits` `[..., vocab]` (F32, F16 or BF16, contiguous),
/// `labels` (I64 or I32) and `mask` (U8) with one entry per logits row. The result is the loss, a scalar
/// F32 tensor, normalized as [`CeOptions::normalization`] says; its gradient with respect to the logits
/// comes from the same kernel (the CPU oracle on the CPU).
#[derive(Clone, Copy, Debug, Default)]
pub struct MaskedCrossEntropy {
    pub options: CeOptions,
}

impl MaskedCrossEntropy {
    /// The loss of `logits` against `labels` where `mask` is 1, with backward.
    pub fn loss(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.options.validate().map_err(ours)?;
        logits.apply_op3(labels, mask, *self)
    }
}

/// `(rows, vocab)` of logits `[..., vocab]`, after checking labels and mask have one entry per row.
fn rows_and_vocab(
    logits: &Layout,
    labels: &Layout,
    mask: &Layout,
) -> candle_core::Result<(usize, usize)> {
    let vocab = match logits.dims().last() {
        Some(&v) if v > 0 => v,
        _ => bail!("logits must be [..., vocab], got {:?}", logits.shape()),
    };
    let rows = logits.shape().elem_count() / vocab;
    for (name, layout) in [("labels", labels), ("mask", mask)] {
        if layout.shape().elem_count() != rows {
            bail!(
                "{name} has {} entries, the logits {rows} rows ({:?})",
                layout.shape().elem_count(),
                logits.shape()
            );
        }
    }
    Ok((rows, vocab))
}

/// The elements a contiguous layout covers.
fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    name: &str,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{name} must be contiguous (call .contiguous() first)"),
    }
}

fn cpu_labels<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Labels<'a>> {
    Ok(match storage.dtype() {
        DType::I64 => Labels::I64(contiguous(storage, layout, "labels")?),
        DType::I32 => Labels::I32(contiguous(storage, layout, "labels")?),
        other => bail!("labels must be I64 or I32, got {other:?}"),
    })
}

fn cpu_mask(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Vec<bool>> {
    if storage.dtype() != DType::U8 {
        bail!("mask must be U8, got {:?}", storage.dtype());
    }
    Ok(contiguous::<u8>(storage, layout, "mask")?
        .iter()
        .map(|&m| m != 0)
        .collect())
}

/// Labels and mask of the CPU op, checked against the logits: `(vocab, labels, mask)`.
fn cpu_targets<'a>(
    logits: &Layout,
    (labels, labels_layout): (&'a CpuStorage, &Layout),
    (mask, mask_layout): (&CpuStorage, &Layout),
) -> candle_core::Result<(usize, Labels<'a>, Vec<bool>)> {
    let (_, vocab) = rows_and_vocab(logits, labels_layout, mask_layout)?;
    Ok((
        vocab,
        cpu_labels(labels, labels_layout)?,
        cpu_mask(mask, mask_layout)?,
    ))
}

/// The CPU oracle over contiguous host logits of one dtype.
fn cpu_ce<T: LogitElem + WithDType>(
    (logits, layout): (&CpuStorage, &Layout),
    (vocab, labels, mask): (usize, Labels<'_>, &[bool]),
    options: &CeOptions,
    with_grad: bool,
) -> candle_core::Result<CeOutput<T>> {
    let logits = contiguous::<T>(logits, layout, "logits")?;
    let input = CeInput::new(logits, vocab, labels, mask);
    sft_collate::Device::cpu()
        .cross_entropy(&input, options, CeRequest::NONE, with_grad)
        .map_err(ours)?
        .to_host()
        .map_err(ours)
}

/// The loss alone.
fn cpu_loss<T: LogitElem + WithDType>(
    logits: (&CpuStorage, &Layout),
    targets: (usize, Labels<'_>, &[bool]),
    options: &CeOptions,
) -> candle_core::Result<f32> {
    Ok(cpu_ce::<T>(logits, targets, options, false)?.loss)
}

/// `d loss / d logits`, in the logits' dtype.
fn cpu_grad<T: LogitElem + WithDType>(
    logits: (&CpuStorage, &Layout),
    targets: (usize, Labels<'_>, &[bool]),
    options: &CeOptions,
) -> candle_core::Result<CpuStorage> {
    let grad = cpu_ce::<T>(logits, targets, options, true)?.grad;
    Ok(T::to_cpu_storage_owned(
        grad.expect("asked for the gradient"),
    ))
}

impl CustomOp3 for MaskedCrossEntropy {
    fn name(&self) -> &'static str {
        "sft-collate-masked-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        labels: &CpuStorage,
        labels_layout: &Layout,
        mask: &CpuStorage,
        mask_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (vocab, labels, mask) =
            cpu_targets(logits_layout, (labels, labels_layout), (mask, mask_layout))?;
        let loss = by_dtype!(
            logits.dtype(),
            cpu_loss(
                (logits, logits_layout),
                (vocab, labels, &mask),
                &self.options
            )
        )?;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        logits_layout: &Layout,
        labels: &candle_core::CudaStorage,
        labels_layout: &Layout,
        mask: &candle_core::CudaStorage,
        mask_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = rows_and_vocab(logits_layout, labels_layout, mask_layout)?;
        let inputs = cuda::Inputs {
            logits: (logits, logits_layout),
            labels: (labels, labels_layout),
            mask: (mask, mask_layout),
            rows,
            vocab,
        };
        Ok((cuda::loss(&inputs, &self.options)?, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = logits.apply_op2_no_bwd(
            grad_loss,
            &Gradient {
                labels: labels.clone(),
                mask: mask.clone(),
                options: self.options,
            },
        )?;
        Ok((Some(grad), None, None))
    }
}

/// `d loss / d logits` times the upstream gradient (a scalar tensor on the logits' device).
struct Gradient {
    labels: Tensor,
    mask: Tensor,
    options: CeOptions,
}

impl CustomOp2 for Gradient {
    fn name(&self) -> &'static str {
        "sft-collate-masked-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        upstream: &CpuStorage,
        upstream_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (labels_storage, labels_layout) = self.labels.storage_and_layout();
        let (mask_storage, mask_layout) = self.mask.storage_and_layout();
        let (Storage::Cpu(labels), Storage::Cpu(mask)) = (&*labels_storage, &*mask_storage) else {
            bail!("labels and mask must be on the logits' device (the CPU)");
        };
        let (vocab, labels, mask) =
            cpu_targets(logits_layout, (labels, labels_layout), (mask, mask_layout))?;
        let options = CeOptions {
            upstream: contiguous::<f32>(upstream, upstream_layout, "the upstream gradient")?[0],
            ..self.options
        };
        let storage = by_dtype!(
            logits.dtype(),
            cpu_grad((logits, logits_layout), (vocab, labels, &mask), &options)
        )?;
        Ok((storage, logits_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        logits_layout: &Layout,
        upstream: &candle_core::CudaStorage,
        upstream_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (labels_storage, labels_layout) = self.labels.storage_and_layout();
        let (mask_storage, mask_layout) = self.mask.storage_and_layout();
        let (Storage::Cuda(labels), Storage::Cuda(mask)) = (&*labels_storage, &*mask_storage)
        else {
            bail!("labels and mask must be on the logits' device (CUDA)");
        };
        let (rows, vocab) = rows_and_vocab(logits_layout, labels_layout, mask_layout)?;
        let inputs = cuda::Inputs {
            logits: (logits, logits_layout),
            labels: (labels, labels_layout),
            mask: (mask, mask_layout),
            rows,
            vocab,
        };
        let grad = cuda::gradient(&inputs, (upstream, upstream_layout), &self.options)?;
        Ok((grad, logits_layout.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda;
