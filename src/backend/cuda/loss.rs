//! [`MaskedCrossEntropy`]: the fused masked cross-entropy kernels on the caller's stream.

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PushKernelArg, SyncOnDrop,
};

use super::module::{self, ModuleOrigin};
use super::{cuda_err, launch_config};
use crate::backend::abi::{self, CeArgs, CeCountArgs, CeReduceArgs};
use crate::loss::{CeOptions, CeOutput, CeRequest, LogitElem, LogitsShape};
use crate::{Error, Result};

/// Labels on the device, as the collator writes them.
#[derive(Clone, Copy, Debug)]
pub enum DeviceLabels<'a> {
    I32(&'a CudaSlice<i32>),
    I64(&'a CudaSlice<i64>),
}

impl DeviceLabels<'_> {
    fn len(&self) -> usize {
        match self {
            DeviceLabels::I32(v) => v.len(),
            DeviceLabels::I64(v) => v.len(),
        }
    }
}

/// What the loss is computed against: the logits' shape, labels, mask (one byte per row, 0 or 1) and
/// optional per-token weights, all on the device.
#[derive(Clone, Copy, Debug)]
pub struct DeviceCeTargets<'a> {
    pub shape: LogitsShape,
    pub labels: DeviceLabels<'a>,
    pub mask: &'a CudaSlice<u8>,
    pub weights: Option<&'a CudaSlice<f32>>,
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
    /// The gradient (dense `[N, vocab]`) when computed into a separate buffer.
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

enum GradTarget<'a, T> {
    None,
    Separate,
    InPlace(&'a mut CudaSlice<T>),
}

impl MaskedCrossEntropy {
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

    /// Loss, sum, count and the requested per-token outputs. Masked rows are read once.
    pub fn forward<T: LogitElem>(
        &self,
        logits: &CudaSlice<T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
    ) -> Result<DeviceCeOutput<T>> {
        self.run(Some(logits), targets, options, request, GradTarget::None)
    }

    /// The same plus `d loss / d logits` into a new dense `[N, vocab]` buffer (masked rows read twice,
    /// the gradient written once; unmasked rows get zeros).
    pub fn forward_backward<T: LogitElem>(
        &self,
        logits: &CudaSlice<T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
    ) -> Result<DeviceCeOutput<T>> {
        self.run(
            Some(logits),
            targets,
            options,
            request,
            GradTarget::Separate,
        )
    }

    /// The same with the gradient written over the logits (explicit opt-in: the logits are gone after).
    pub fn forward_backward_in_place<T: LogitElem>(
        &self,
        logits: &mut CudaSlice<T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
    ) -> Result<DeviceCeOutput<T>> {
        self.run(None, targets, options, request, GradTarget::InPlace(logits))
    }

    fn run<T: LogitElem>(
        &self,
        logits: Option<&CudaSlice<T>>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
        mut grad_target: GradTarget<'_, T>,
    ) -> Result<DeviceCeOutput<T>> {
        let stream = &self.stream;
        let shape = targets.shape;
        let logits_len = match (&logits, &grad_target) {
            (Some(l), _) => l.len(),
            (None, GradTarget::InPlace(l)) => l.len(),
            _ => unreachable!("logits come one way or the other"),
        };
        shape.validate(
            logits_len,
            targets.labels.len(),
            targets.mask.len(),
            targets.weights.map(|w| w.len()),
        )?;
        options.normalization.validate()?;
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
            grad: match grad_target {
                GradTarget::Separate => {
                    // SAFETY: the kernel writes every element of every row (zeros on unmasked rows).
                    Some(if n == 0 {
                        stream.null::<T>().map_err(cuda_err)?
                    } else {
                        unsafe { stream.alloc::<T>(n * shape.vocab) }.map_err(cuda_err)?
                    })
                }
                _ => None,
            },
            error_flag: stream.alloc_zeros::<u32>(1).map_err(cuda_err)?,
            stream: stream.clone(),
        };
        if n == 0 {
            return Ok(out);
        }
        let (norm_mode, norm_fixed) = abi::norm_args(&options.normalization);
        let backward = !matches!(grad_target, GradTarget::None);
        let name = format!(
            "masked_ce_{}_{}",
            if backward { "fwd_bwd" } else { "fwd" },
            T::SUFFIX
        );
        let function = &self.kernels[&name];
        // Addresses for the argument structs; each guard records this stream's use of its buffer when
        // dropped after the launches.
        let mut guards: Vec<SyncOnDrop<'_>> = Vec::new();
        let (logits_addr, grad_addr, grad_stride) = match (logits, &mut grad_target) {
            (Some(l), GradTarget::Separate) => {
                let (l, g) = l.device_ptr(stream);
                guards.push(g);
                let grad = out.grad.as_mut().expect("allocated above");
                let (d, g) = grad.device_ptr_mut(stream);
                guards.push(g);
                (l, d, shape.vocab as u64)
            }
            (Some(l), _) => {
                let (l, g) = l.device_ptr(stream);
                guards.push(g);
                (l, 0, 0)
            }
            // In place: logits and gradient are one buffer, read then overwritten row by row.
            (None, GradTarget::InPlace(l)) => {
                let (ptr, g) = l.device_ptr_mut(stream);
                guards.push(g);
                (ptr, ptr, shape.row_stride as u64)
            }
            (None, _) => unreachable!("logits come one way or the other"),
        };
        let g = &mut guards;
        let (labels, labels_are_i64) = match targets.labels {
            DeviceLabels::I32(l) => (keep(g, l.device_ptr(stream)), 0),
            DeviceLabels::I64(l) => (keep(g, l.device_ptr(stream)), 1),
        };
        let mask = keep(g, targets.mask.device_ptr(stream));
        let weights = targets.weights.map_or(0, |w| keep(g, w.device_ptr(stream)));
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
        // elements, and that labels, mask and weights have one entry per row; per-row outputs have
        // `rows` entries (absent ones are null, which the kernel checks), the gradient `rows × vocab`
        // (or the logits' own layout in place). The kernel dereferences a label only after checking it
        // is in [0, vocab). The count kernel reads `rows` mask bytes and writes one u32; the reduce
        // kernel reads `rows` row losses and the count and writes two floats. Each struct is its
        // kernel's one parameter (abi.cuh).
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
