//! [`MaskedCrossEntropy`]: the fused masked cross-entropy kernels on the caller's stream.

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::cuda_err;
use super::module::{self, ModuleOrigin};
use crate::loss::{ce_grid, CeOptions, CeOutput, LogitElem, LogitsShape, CE_BLOCK};
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

/// Which per-token outputs to write (the loss, sum and count are always produced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CeRequest {
    pub log_probs: bool,
    pub entropy: bool,
    pub lse: bool,
}

impl Default for CeRequest {
    fn default() -> Self {
        CeRequest {
            log_probs: true,
            entropy: true,
            lse: true,
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
    /// The gradient (dense `[N, vocab]`) when computed into a separate buffer.
    pub grad: Option<CudaSlice<T>>,
    error_flag: CudaSlice<u32>,
    stream: Arc<CudaStream>,
}

impl<T: LogitElem + DeviceRepr> DeviceCeOutput<T> {
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
    pub fn forward<T: LogitElem + DeviceRepr>(
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
    pub fn forward_backward<T: LogitElem + DeviceRepr>(
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
    pub fn forward_backward_in_place<T: LogitElem + DeviceRepr>(
        &self,
        logits: &mut CudaSlice<T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
    ) -> Result<DeviceCeOutput<T>> {
        self.run(None, targets, options, request, GradTarget::InPlace(logits))
    }

    fn run<T: LogitElem + DeviceRepr>(
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
        let one_block = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (CE_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let rows = n as u64;
        // SAFETY: one block reads `rows` mask bytes (the mask has exactly `rows`, validated above) and
        // writes one u32.
        unsafe {
            stream
                .launch_builder(&self.count)
                .arg(targets.mask)
                .arg(&rows)
                .arg(&mut out.count)
                .launch(one_block)
        }
        .map_err(cuda_err)?;

        // 0: no gradient, 1: separate buffer, 2: in place (decided before the in-place borrow below).
        let grad_kind = match &grad_target {
            GradTarget::None => 0,
            GradTarget::Separate => 1,
            GradTarget::InPlace(_) => 2,
        };
        let backward = grad_kind != 0;
        let name = format!(
            "masked_ce_{}_{}",
            if backward { "fwd_bwd" } else { "fwd" },
            T::SUFFIX
        );
        let function = &self.kernels[&name];
        let (norm_mode, norm_fixed) = options.normalization.kernel_args();
        let (vocab, logits_stride) = (shape.vocab as u64, shape.row_stride as u64);
        let labels_are_i64 = i32::from(matches!(targets.labels, DeviceLabels::I64(_)));
        let null: u64 = 0;
        let mut builder = stream.launch_builder(function);
        // In place, logits and gradient are the same buffer: its raw pointer goes in twice (the guard
        // records the kernel's use of it on this stream when dropped after the launch).
        let mut in_place_ptr: u64 = 0;
        let mut _in_place_guard = None;
        match (&logits, &mut grad_target) {
            (Some(l), _) => {
                builder.arg(*l);
            }
            (None, GradTarget::InPlace(l)) => {
                let (ptr, guard) = l.device_ptr_mut(stream);
                in_place_ptr = ptr;
                _in_place_guard = Some(guard);
                builder.arg(&in_place_ptr);
            }
            _ => unreachable!(),
        }
        builder.arg(&rows).arg(&vocab).arg(&logits_stride);
        match targets.labels {
            DeviceLabels::I32(l) => builder.arg(l),
            DeviceLabels::I64(l) => builder.arg(l),
        };
        builder.arg(&labels_are_i64).arg(targets.mask);
        match targets.weights {
            Some(w) => builder.arg(w),
            None => builder.arg(&null),
        };
        builder
            .arg(&out.count)
            .arg(&norm_mode)
            .arg(&norm_fixed)
            .arg(&options.upstream)
            .arg(&mut out.row_loss);
        for slot in [&mut out.log_probs, &mut out.entropy, &mut out.lse] {
            match slot {
                Some(s) => builder.arg(s),
                None => builder.arg(&null),
            };
        }
        let grad_stride: u64 = [0, vocab, logits_stride][grad_kind];
        match (grad_kind, &mut out.grad) {
            (1, Some(g)) => builder.arg(g),
            (2, _) => builder.arg(&in_place_ptr),
            _ => builder.arg(&null),
        };
        builder.arg(&grad_stride).arg(&mut out.error_flag);
        let cfg = LaunchConfig {
            grid_dim: (ce_grid(n), 1, 1),
            block_dim: (CE_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `validate` checked the logits hold `rows` rows of `row_stride` with `vocab` elements,
        // and that labels, mask and weights have one entry per row; per-row outputs have `rows` entries,
        // the gradient `rows × vocab` (or the logits' own layout in place). The kernel dereferences a
        // label only after checking it is in [0, vocab). The argument list matches CE_PARAMS in
        // masked_ce.cu (labels and absent outputs as raw pointers).
        unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
        drop(_in_place_guard);

        // SAFETY: one block reads `rows` row losses and the count, and writes two floats.
        unsafe {
            stream
                .launch_builder(&self.reduce)
                .arg(&out.row_loss)
                .arg(&rows)
                .arg(&out.count)
                .arg(&norm_mode)
                .arg(&norm_fixed)
                .arg(&mut out.scalars)
                .launch(one_block)
        }
        .map_err(cuda_err)?;
        Ok(out)
    }
}
