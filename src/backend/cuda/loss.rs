//! [`MaskedCrossEntropy`]: the fused masked cross-entropy kernels on the caller's stream, over the
//! caller's buffers (any [`DeviceRead`] / [`DeviceWrite`]: cudarc slices and views, or memory a framework
//! owns), with the upstream gradient on the host or the device. Nothing here synchronizes the host.

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtrMut, PushKernelArg, SyncOnDrop,
};

use super::memory::{DeviceRead, DeviceWrite};
use super::module::{self, ModuleOrigin};
use super::{cuda_err, launch_config};
use crate::backend::abi::{self, CeArgs, CeCountArgs, CeReduceArgs};
use crate::loss::{CeOptions, CeOutput, CeRequest, LogitElem, LogitsShape};
use crate::{Error, Result};

/// Labels on the device, as the collator writes them.
#[derive(Clone, Copy)]
pub enum DeviceLabels<'a> {
    I32(&'a dyn DeviceRead<i32>),
    I64(&'a dyn DeviceRead<i64>),
}

impl DeviceLabels<'_> {
    fn len(&self) -> usize {
        match self {
            DeviceLabels::I32(v) => v.len(),
            DeviceLabels::I64(v) => v.len(),
        }
    }
}

/// What the loss is computed against, on the device: the logits' shape (rows, vocab, row stride),
/// labels, mask (one byte per row, 0 or 1), optional per-token weights, and optionally the upstream
/// gradient `d final loss / d this loss` as a one-element device buffer (a framework's `grad_output`),
/// which then replaces [`CeOptions::upstream`] without the host ever reading it.
#[derive(Clone, Copy)]
pub struct DeviceCeTargets<'a> {
    pub shape: LogitsShape,
    pub labels: DeviceLabels<'a>,
    pub mask: &'a dyn DeviceRead<u8>,
    pub weights: Option<&'a dyn DeviceRead<f32>>,
    pub upstream: Option<&'a dyn DeviceRead<f32>>,
}

impl<'a> DeviceCeTargets<'a> {
    /// Labels, mask and shape; no weights, the upstream gradient from [`CeOptions`].
    pub fn new(shape: LogitsShape, labels: DeviceLabels<'a>, mask: &'a dyn DeviceRead<u8>) -> Self {
        DeviceCeTargets {
            shape,
            labels,
            mask,
            weights: None,
            upstream: None,
        }
    }
}

/// Results on the device. Nothing here has synchronized the host: read [`DeviceCeOutput::to_host`] (or
/// call [`DeviceCeOutput::check`]) when the values are needed.
#[derive(Debug)]
pub struct DeviceCeOutput<T> {
    pub log_probs: Option<CudaSlice<f32>>,
    pub entropy: Option<CudaSlice<f32>>,
    pub lse: Option<CudaSlice<f32>>,
    /// Per row, `w · (-log_prob)` (0 on unmasked rows).
    pub row_loss: CudaSlice<f32>,
    /// `[sum, loss]`.
    pub scalars: CudaSlice<f32>,
    /// `[count]`.
    pub count: CudaSlice<u32>,
    /// The gradient (dense `[N, vocab]`) when computed into a new buffer.
    pub grad: Option<CudaSlice<T>>,
    error_flag: CudaSlice<u32>,
    stream: Arc<CudaStream>,
}

impl<T: LogitElem> DeviceCeOutput<T> {
    /// Turn the device-side error flag into a typed error (synchronizes the stream).
    pub fn check(&self) -> Result<()> {
        let flag = self.stream.clone_dtoh(&self.error_flag).map_err(cuda_err)?;
        if flag[0] != 0 {
            return Err(Error::DeviceLabelOutOfRange);
        }
        Ok(())
    }

    /// Copy everything to the host (synchronizes the stream), after [`DeviceCeOutput::check`]. Outputs
    /// that were not requested come back empty.
    pub fn to_host(&self) -> Result<CeOutput<T>> {
        self.check()?;
        let s = &self.stream;
        let f32s = |v: &Option<CudaSlice<f32>>| -> Result<Vec<f32>> {
            v.as_ref()
                .map_or(Ok(Vec::new()), |v| s.clone_dtoh(v).map_err(cuda_err))
        };
        let scalars = s.clone_dtoh(&self.scalars).map_err(cuda_err)?;
        Ok(CeOutput {
            log_probs: f32s(&self.log_probs)?,
            entropy: f32s(&self.entropy)?,
            lse: f32s(&self.lse)?,
            sum: scalars[0],
            count: s.clone_dtoh(&self.count).map_err(cuda_err)?[0],
            loss: scalars[1],
            grad: match &self.grad {
                Some(g) => Some(s.clone_dtoh(g).map_err(cuda_err)?),
                None => None,
            },
        })
    }
}

/// Keep the guard of an address a kernel is about to use (it records the use when dropped after the
/// launch) and return the address.
fn keep<'a>(guards: &mut Vec<SyncOnDrop<'a>>, (addr, guard): (u64, SyncOnDrop<'a>)) -> u64 {
    guards.push(guard);
    addr
}

/// [`keep`] for an output that may not have been requested (0: the kernel writes nothing there).
fn keep_optional<'a>(
    guards: &mut Vec<SyncOnDrop<'a>>,
    stream: &'a CudaStream,
    slot: &'a mut Option<CudaSlice<f32>>,
) -> u64 {
    slot.as_mut()
        .map_or(0, |s| keep(guards, s.device_ptr_mut(stream)))
}

/// Where the gradient goes.
enum Grad<'a, T> {
    None,
    /// A new dense `[N, vocab]` buffer.
    New,
    /// The caller's buffer, rows `row_stride` apart.
    Into(&'a mut dyn DeviceWrite<T>, usize),
    /// Over the logits themselves.
    InPlace,
}

/// The logits: read only, or (in place) read and overwritten with the gradient.
enum Logits<'a, T> {
    Read(&'a dyn DeviceRead<T>),
    Write(&'a mut dyn DeviceWrite<T>),
}

/// The fused masked cross-entropy kernels, loaded on the caller's stream.
pub struct MaskedCrossEntropy {
    stream: Arc<CudaStream>,
    /// `masked_ce_{fwd,fwd_bwd}_{suffix}`, looked up once.
    kernels: std::collections::HashMap<String, CudaFunction>,
    count: CudaFunction,
    reduce: CudaFunction,
    origin: ModuleOrigin,
}

impl std::fmt::Debug for MaskedCrossEntropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskedCrossEntropy")
            .field("origin", &self.origin)
            .finish()
    }
}

impl MaskedCrossEntropy {
    /// Load the kernels into the stream's context; every launch goes on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let kernel = crate::kernels::kernel("masked_ce").expect("masked_ce.cu is embedded");
        let (module, origin) = module::load(stream.context(), kernel)?;
        let mut kernels = std::collections::HashMap::new();
        for op in ["fwd", "fwd_bwd"] {
            for suffix in ["f32", "f16", "bf16"] {
                let name = format!("masked_ce_{op}_{suffix}");
                let function = module.load_function(&name).map_err(cuda_err)?;
                kernels.insert(name, function);
            }
        }
        Ok(MaskedCrossEntropy {
            count: module.load_function("masked_ce_count").map_err(cuda_err)?,
            reduce: module.load_function("masked_ce_reduce").map_err(cuda_err)?,
            kernels,
            stream,
            origin,
        })
    }

    pub fn origin(&self) -> &ModuleOrigin {
        &self.origin
    }

    /// The stream every launch goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Loss, sum, count and the requested per-token outputs. Masked rows are read once.
    pub fn forward<T: LogitElem>(
        &self,
        logits: &dyn DeviceRead<T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
    ) -> Result<DeviceCeOutput<T>> {
        self.run(Logits::Read(logits), targets, options, request, Grad::None)
    }

    /// The same plus `d loss / d logits` into a new dense `[N, vocab]` buffer (masked rows read twice,
    /// the gradient written once; unmasked rows get zeros).
    pub fn forward_backward<T: LogitElem>(
        &self,
        logits: &dyn DeviceRead<T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
    ) -> Result<DeviceCeOutput<T>> {
        self.run(Logits::Read(logits), targets, options, request, Grad::New)
    }

    /// The same with the gradient written into the caller's buffer (a framework's gradient tensor), rows
    /// `grad_row_stride` elements apart (at least `vocab`; the columns past it are not touched).
    pub fn forward_backward_into<T: LogitElem>(
        &self,
        logits: &dyn DeviceRead<T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
        grad: &mut dyn DeviceWrite<T>,
        grad_row_stride: usize,
    ) -> Result<DeviceCeOutput<T>> {
        self.run(
            Logits::Read(logits),
            targets,
            options,
            request,
            Grad::Into(grad, grad_row_stride),
        )
    }

    /// The same with the gradient written over the logits, in their layout (explicit opt-in: the logits
    /// are gone after).
    pub fn forward_backward_in_place<T: LogitElem>(
        &self,
        logits: &mut dyn DeviceWrite<T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
    ) -> Result<DeviceCeOutput<T>> {
        self.run(
            Logits::Write(logits),
            targets,
            options,
            request,
            Grad::InPlace,
        )
    }

    fn run<T: LogitElem>(
        &self,
        mut logits: Logits<'_, T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
        mut grad: Grad<'_, T>,
    ) -> Result<DeviceCeOutput<T>> {
        let stream = &self.stream;
        let shape = targets.shape;
        let logits_len = match &logits {
            Logits::Read(l) => l.len(),
            Logits::Write(l) => l.len(),
        };
        shape.validate(
            logits_len,
            targets.labels.len(),
            targets.mask.len(),
            targets.weights.map(|w| w.len()),
        )?;
        options.normalization.validate()?;
        if let Some(upstream) = targets.upstream {
            if upstream.len() != 1 {
                return Err(Error::Shape(format!(
                    "the upstream gradient has {} elements, not 1",
                    upstream.len()
                )));
            }
        }
        if let Grad::Into(buffer, stride) = &grad {
            let rows_fit = match shape.rows {
                0 => Some(0),
                r => (r - 1)
                    .checked_mul(*stride)
                    .and_then(|n| n.checked_add(shape.vocab)),
            };
            if *stride < shape.vocab || rows_fit.is_none_or(|n| n > buffer.len()) {
                return Err(Error::Shape(format!(
                    "a gradient buffer of {} elements, rows {stride} apart, cannot hold {} rows of {}",
                    buffer.len(),
                    shape.rows,
                    shape.vocab
                )));
            }
        }
        let n = shape.rows;
        // An empty batch gets empty (null) per-row outputs, as the other backends give.
        let zeros_f32 = |len: usize| {
            if len == 0 {
                stream.null::<f32>().map_err(cuda_err)
            } else {
                stream.alloc_zeros::<f32>(len).map_err(cuda_err)
            }
        };
        let optional = |wanted: bool| -> Result<Option<CudaSlice<f32>>> {
            if wanted {
                zeros_f32(n).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut out = DeviceCeOutput {
            log_probs: optional(request.log_probs)?,
            entropy: optional(request.entropy)?,
            lse: optional(request.lse)?,
            row_loss: zeros_f32(n)?,
            scalars: stream.alloc_zeros::<f32>(2).map_err(cuda_err)?,
            count: stream.alloc_zeros::<u32>(1).map_err(cuda_err)?,
            grad: match grad {
                Grad::New if n == 0 => Some(stream.null::<T>().map_err(cuda_err)?),
                // SAFETY: the kernel writes every element of every row (zeros on unmasked rows).
                Grad::New => Some(unsafe { stream.alloc::<T>(n * shape.vocab) }.map_err(cuda_err)?),
                _ => None,
            },
            error_flag: stream.alloc_zeros::<u32>(1).map_err(cuda_err)?,
            stream: stream.clone(),
        };
        if n == 0 {
            return Ok(out);
        }
        let (norm_mode, norm_fixed) = abi::norm_args(&options.normalization);
        let backward = !matches!(grad, Grad::None);
        let name = format!(
            "masked_ce_{}_{}",
            if backward { "fwd_bwd" } else { "fwd" },
            T::SUFFIX
        );
        let function = &self.kernels[&name];
        // Addresses for the argument structs; each guard records this stream's use of its buffer when
        // dropped after the launches.
        let mut guards: Vec<SyncOnDrop<'_>> = Vec::new();
        let g = &mut guards;
        let logits_addr = match &mut logits {
            Logits::Read(l) => keep(g, l.read_addr(stream)),
            // In place: logits and gradient are one buffer, read then overwritten row by row.
            Logits::Write(l) => keep(g, l.write_addr(stream)),
        };
        let (grad_addr, grad_stride) = match &mut grad {
            Grad::None => (0, 0),
            Grad::New => {
                let buffer = out.grad.as_mut().expect("allocated above");
                (keep(g, buffer.device_ptr_mut(stream)), shape.vocab as u64)
            }
            Grad::Into(buffer, stride) => (keep(g, buffer.write_addr(stream)), *stride as u64),
            Grad::InPlace => (logits_addr, shape.row_stride as u64),
        };
        let (labels, labels_are_i64) = match targets.labels {
            DeviceLabels::I32(l) => (keep(g, l.read_addr(stream)), 0),
            DeviceLabels::I64(l) => (keep(g, l.read_addr(stream)), 1),
        };
        let mask = keep(g, targets.mask.read_addr(stream));
        let weights = targets.weights.map_or(0, |w| keep(g, w.read_addr(stream)));
        let upstream_ptr = targets.upstream.map_or(0, |u| keep(g, u.read_addr(stream)));
        let count = keep(g, out.count.device_ptr_mut(stream));
        let row_loss = keep(g, out.row_loss.device_ptr_mut(stream));
        let log_probs = keep_optional(g, stream, &mut out.log_probs);
        let entropy = keep_optional(g, stream, &mut out.entropy);
        let lse = keep_optional(g, stream, &mut out.lse);
        let error_flag = keep(g, out.error_flag.device_ptr_mut(stream));
        let scalars = keep(g, out.scalars.device_ptr_mut(stream));
        let rows = n as u64;
        let args = CeArgs {
            logits: logits_addr,
            labels,
            mask,
            weights,
            count,
            upstream_ptr,
            row_loss,
            log_probs,
            entropy,
            lse,
            grad: grad_addr,
            error_flag,
            rows,
            vocab: shape.vocab as u64,
            logits_stride: shape.row_stride as u64,
            grad_stride,
            norm_fixed,
            upstream: options.upstream,
            labels_are_i64,
            norm_mode,
        };
        let count_args = CeCountArgs { mask, count, rows };
        let reduce_args = CeReduceArgs {
            row_loss,
            count,
            out: scalars,
            rows,
            norm_fixed,
            norm_mode,
        };
        // SAFETY: `validate` checked that the logits hold `rows` rows of `row_stride` with `vocab`
        // elements, and that labels, mask and weights have one entry per row (the upstream gradient one
        // element); per-row outputs have `rows` entries (absent ones are null, which the kernel checks),
        // the gradient `rows` rows of `grad_stride` (checked above for a caller's buffer; the logits' own
        // layout in place). The kernel dereferences a label only after checking it is in [0, vocab). The
        // count kernel reads `rows` mask bytes and writes one u32; the reduce kernel reads `rows` row
        // losses and the count and writes two floats. Each struct is its kernel's one parameter
        // (abi.cuh).
        unsafe {
            stream
                .launch_builder(&self.count)
                .arg(&count_args)
                .launch(launch_config(abi::ce_one_block()))
                .map_err(cuda_err)?;
            stream
                .launch_builder(function)
                .arg(&args)
                .launch(launch_config(abi::ce_rows_launch(n)))
                .map_err(cuda_err)?;
            stream
                .launch_builder(&self.reduce)
                .arg(&reduce_args)
                .launch(launch_config(abi::ce_one_block()))
                .map_err(cuda_err)?;
        }
        drop(guards);
        Ok(out)
    }
}
