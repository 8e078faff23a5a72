//! [`MaskedCrossEntropy`]: the fused masked cross-entropy kernels on the caller's stream, over the
//! caller's buffers (any [`DeviceRead`] / [`DeviceWrite`]: cudarc slices and views, or memory a framework
//! owns), with the upstream gradient on the host or the device. Nothing here synchronizes the host.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, PushKernelArg, SyncOnDrop};

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
    slot: &'a mut Option<&mut dyn DeviceWrite<f32>>,
) -> u64 {
    match slot {
        Some(buffer) => keep(guards, buffer.write_addr(stream)),
        None => 0,
    }
}

/// Where the gradient goes.
pub enum CeGrad<'a, T> {
    /// No gradient (forward only).
    None,
    /// Into the caller's buffer, rows `row_stride` elements apart (at least `vocab`; the columns past it
    /// are not touched).
    Into(&'a mut dyn DeviceWrite<T>, usize),
    /// Over the logits themselves, in their layout ([`CeLogits::InPlace`]).
    InPlace,
}

/// The logits: read, or (with [`CeGrad::InPlace`]) read and overwritten with the gradient.
pub enum CeLogits<'a, T> {
    Read(&'a dyn DeviceRead<T>),
    InPlace(&'a mut dyn DeviceWrite<T>),
}

/// The caller's buffers for the outputs: per-row ones of `rows` elements (`None`: not computed),
/// `scalars` `[sum, loss]`, `count` `[masked rows]`, `error_flag` `[1]` (set when a masked row's label
/// is outside `[0, vocab)`). Every element is written; nothing needs zeroing first.
pub struct CeBuffers<'a> {
    pub row_loss: &'a mut dyn DeviceWrite<f32>,
    pub log_probs: Option<&'a mut dyn DeviceWrite<f32>>,
    pub entropy: Option<&'a mut dyn DeviceWrite<f32>>,
    pub lse: Option<&'a mut dyn DeviceWrite<f32>>,
    pub scalars: &'a mut dyn DeviceWrite<f32>,
    pub count: &'a mut dyn DeviceWrite<u32>,
    pub error_flag: &'a mut dyn DeviceWrite<u32>,
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
        self.run(
            CeLogits::Read(logits),
            targets,
            options,
            request,
            CeGrad::None,
            true,
        )
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
        self.run(
            CeLogits::Read(logits),
            targets,
            options,
            request,
            CeGrad::None,
            false,
        )
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
            CeLogits::Read(logits),
            targets,
            options,
            request,
            CeGrad::Into(grad, grad_row_stride),
            true,
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
            CeLogits::InPlace(logits),
            targets,
            options,
            request,
            CeGrad::InPlace,
            true,
        )
    }

    /// Allocate the outputs (and, with `CeGrad::None` and `!forward_only`, a new gradient buffer) and
    /// compute into them.
    fn run<T: LogitElem>(
        &self,
        logits: CeLogits<'_, T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
        grad: CeGrad<'_, T>,
        forward_only: bool,
    ) -> Result<DeviceCeOutput<T>> {
        let stream = &self.stream;
        let n = targets.shape.rows;
        // An empty batch gets empty (null) per-row outputs, as the other backends give.
        let floats = |len: usize| {
            if len == 0 {
                stream.null::<f32>().map_err(cuda_err)
            } else {
                // SAFETY: the kernels write every element (see `compute`).
                unsafe { stream.alloc::<f32>(len) }.map_err(cuda_err)
            }
        };
        let optional = |wanted: bool| wanted.then(|| floats(n)).transpose();
        let mut out = DeviceCeOutput {
            log_probs: optional(request.log_probs)?,
            entropy: optional(request.entropy)?,
            lse: optional(request.lse)?,
            row_loss: floats(n)?,
            scalars: floats(2)?,
            // SAFETY: written by the count kernel.
            count: unsafe { stream.alloc::<u32>(1) }.map_err(cuda_err)?,
            grad: match (&grad, forward_only) {
                (CeGrad::None, false) if n == 0 => Some(stream.null::<T>().map_err(cuda_err)?),
                // SAFETY: the kernel writes every element of every row (zeros on unmasked rows).
                (CeGrad::None, false) => {
                    Some(unsafe { stream.alloc::<T>(n * targets.shape.vocab) }.map_err(cuda_err)?)
                }
                _ => None,
            },
            // SAFETY: cleared by the count kernel before the main one may set it.
            error_flag: unsafe { stream.alloc::<u32>(1) }.map_err(cuda_err)?,
            stream: stream.clone(),
        };
        let vocab = targets.shape.vocab;
        let DeviceCeOutput {
            log_probs,
            entropy,
            lse,
            row_loss,
            scalars,
            count,
            grad: new_grad,
            error_flag,
            ..
        } = &mut out;
        let mut buffers = CeBuffers {
            row_loss,
            log_probs: log_probs.as_mut().map(|b| b as &mut dyn DeviceWrite<f32>),
            entropy: entropy.as_mut().map(|b| b as &mut dyn DeviceWrite<f32>),
            lse: lse.as_mut().map(|b| b as &mut dyn DeviceWrite<f32>),
            scalars,
            count,
            error_flag,
        };
        match (grad, new_grad.as_mut()) {
            (CeGrad::None, Some(buffer)) => {
                let grad = CeGrad::Into(buffer, vocab);
                self.compute(logits, targets, options, grad, &mut buffers)?
            }
            (grad, _) => self.compute(logits, targets, options, grad, &mut buffers)?,
        }
        Ok(out)
    }

    /// The general form every other call is made of: the loss of `logits` against `targets` into the
    /// caller's `outputs`, the gradient as `grad` says, all on this stream, nothing synchronized.
    pub fn compute<T: LogitElem>(
        &self,
        mut logits: CeLogits<'_, T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        mut grad: CeGrad<'_, T>,
        outputs: &mut CeBuffers<'_>,
    ) -> Result<()> {
        let stream = &self.stream;
        let shape = targets.shape;
        let logits_len = match &logits {
            CeLogits::Read(l) => l.len(),
            CeLogits::InPlace(l) => l.len(),
        };
        shape.validate(
            logits_len,
            targets.labels.len(),
            targets.mask.len(),
            targets.weights.map(|w| w.len()),
        )?;
        options.normalization.validate()?;
        let n = shape.rows;
        let short = |what: &str, len: usize, needed: usize| {
            (len < needed)
                .then(|| Error::Shape(format!("{what}: a buffer of {len} elements for {needed}")))
        };
        let checks = [
            targets.upstream.and_then(|u| {
                (u.len() != 1).then(|| {
                    Error::Shape(format!(
                        "the upstream gradient has {} elements, not 1",
                        u.len()
                    ))
                })
            }),
            short("row_loss", outputs.row_loss.len(), n),
            outputs
                .log_probs
                .as_ref()
                .and_then(|b| short("log_probs", b.len(), n)),
            outputs
                .entropy
                .as_ref()
                .and_then(|b| short("entropy", b.len(), n)),
            outputs.lse.as_ref().and_then(|b| short("lse", b.len(), n)),
            short("scalars", outputs.scalars.len(), 2),
            short("count", outputs.count.len(), 1),
            short("error_flag", outputs.error_flag.len(), 1),
        ];
        if let Some(error) = checks.into_iter().flatten().next() {
            return Err(error);
        }
        match (&logits, &grad) {
            (CeLogits::InPlace(_), CeGrad::InPlace) | (CeLogits::Read(_), _) => {}
            _ => {
                return Err(Error::InvalidOption {
                    name: "grad",
                    reason: "logits given for writing are for an in-place gradient only".into(),
                })
            }
        }
        if let CeGrad::InPlace = &grad {
            if !matches!(logits, CeLogits::InPlace(_)) {
                return Err(Error::InvalidOption {
                    name: "grad",
                    reason: "an in-place gradient needs the logits given for writing".into(),
                });
            }
        }
        if let CeGrad::Into(buffer, stride) = &grad {
            let rows_fit = match n {
                0 => Some(0),
                r => (r - 1)
                    .checked_mul(*stride)
                    .and_then(|x| x.checked_add(shape.vocab)),
            };
            if *stride < shape.vocab || rows_fit.is_none_or(|x| x > buffer.len()) {
                return Err(Error::Shape(format!(
                    "a gradient buffer of {} elements, rows {stride} apart, cannot hold {n} rows of {}",
                    buffer.len(),
                    shape.vocab
                )));
            }
        }
        let (norm_mode, norm_fixed) = abi::norm_args(&options.normalization);
        let backward = !matches!(grad, CeGrad::None);
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
            CeLogits::Read(l) => keep(g, l.read_addr(stream)),
            // In place: logits and gradient are one buffer, read then overwritten row by row.
            CeLogits::InPlace(l) => keep(g, l.write_addr(stream)),
        };
        let (grad_addr, grad_stride) = match &mut grad {
            CeGrad::None => (0, 0),
            CeGrad::Into(buffer, stride) => (keep(g, buffer.write_addr(stream)), *stride as u64),
            CeGrad::InPlace => (logits_addr, shape.row_stride as u64),
        };
        let (labels, labels_are_i64) = match targets.labels {
            DeviceLabels::I32(l) => (keep(g, l.read_addr(stream)), 0),
            DeviceLabels::I64(l) => (keep(g, l.read_addr(stream)), 1),
        };
        let mask = keep(g, targets.mask.read_addr(stream));
        let weights = targets.weights.map_or(0, |w| keep(g, w.read_addr(stream)));
        let upstream_ptr = targets.upstream.map_or(0, |u| keep(g, u.read_addr(stream)));
        let count = keep(g, outputs.count.write_addr(stream));
        let row_loss = keep(g, outputs.row_loss.write_addr(stream));
        let log_probs = keep_optional(g, stream, &mut outputs.log_probs);
        let entropy = keep_optional(g, stream, &mut outputs.entropy);
        let lse = keep_optional(g, stream, &mut outputs.lse);
        let error_flag = keep(g, outputs.error_flag.write_addr(stream));
        let scalars = keep(g, outputs.scalars.write_addr(stream));
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
        let count_args = CeCountArgs {
            mask,
            count,
            error_flag,
            rows,
        };
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
        // element); per-row outputs have at least `rows` entries (absent ones are null, which the kernel
        // checks), the gradient `rows` rows of `grad_stride` (checked above; the logits' own layout in
        // place). The kernel dereferences a label only after checking it is in [0, vocab). The count
        // kernel reads `rows` mask bytes and writes the count and the cleared flag; the reduce kernel
        // reads `rows` row losses and the count and writes two floats. With no rows, the kernels write
        // only the count, the flag and the two scalars. Each struct is its kernel's one parameter
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
        Ok(())
    }
}
