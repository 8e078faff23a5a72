//! [`MaskedCrossEntropy`]: the fused masked cross-entropy kernels on the caller's stream, over the
//! caller's buffers (any [`DeviceRead`] / [`DeviceWrite`]: cudarc slices and views, or memory a framework
//! owns), with the upstream gradient on the host or the device. Nothing here synchronizes the host.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, PushKernelArg, SyncOnDrop};

use super::memory::{DeviceRead, DeviceWrite};
use super::module::{self, ModuleOrigin};
use super::{cuda_err, launch_config};
use crate::backend::abi::{self, CeArgs, CeVariant, ClusterPlan};
use crate::backend::CeRowKernel;
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
/// labels, optionally a mask (one byte per row, 0 or 1; without one every row whose label is not
/// [`CeOptions::ignore_index`] is trained), per-token weights, document boundaries (`cu_seqlens`, for
/// [`crate::loss::Normalization::SequenceMean`] and the document count), and the upstream gradient
/// `d final loss / d this loss` as a one-element device buffer (a framework's `grad_output`), which then
/// replaces [`CeOptions::upstream`] without the host ever reading it.
#[derive(Clone, Copy)]
pub struct DeviceCeTargets<'a> {
    pub shape: LogitsShape,
    pub labels: DeviceLabels<'a>,
    pub mask: Option<&'a dyn DeviceRead<u8>>,
    pub weights: Option<&'a dyn DeviceRead<f32>>,
    pub cu_seqlens: Option<&'a dyn DeviceRead<i32>>,
    pub upstream: Option<&'a dyn DeviceRead<f32>>,
}

impl<'a> DeviceCeTargets<'a> {
    /// Labels, mask and shape; no weights, the upstream gradient from [`CeOptions`].
    pub fn new(shape: LogitsShape, labels: DeviceLabels<'a>, mask: &'a dyn DeviceRead<u8>) -> Self {
        DeviceCeTargets {
            mask: Some(mask),
            ..Self::unmasked(shape, labels)
        }
    }

    /// Labels and shape, trained where the label is not [`CeOptions::ignore_index`] (PyTorch's way).
    pub fn unmasked(shape: LogitsShape, labels: DeviceLabels<'a>) -> Self {
        DeviceCeTargets {
            shape,
            labels,
            mask: None,
            weights: None,
            cu_seqlens: None,
            upstream: None,
        }
    }

    /// The number of documents `cu_seqlens` describes (0 without).
    fn documents(&self) -> usize {
        self.cu_seqlens.map_or(0, |cu| cu.len().saturating_sub(1))
    }
}

/// Results on the device. Nothing here has synchronized the host: read [`DeviceCeOutput::to_host`] (or
/// call [`DeviceCeOutput::check`]) when the values are needed.
#[derive(Debug)]
pub struct DeviceCeOutput<T> {
    pub log_probs: Option<CudaSlice<f32>>,
    pub entropy: Option<CudaSlice<f32>>,
    pub lse: Option<CudaSlice<f32>>,
    pub argmax: Option<CudaSlice<i32>>,
    /// Per row, `w · (ce + z)` (0 on rows not trained).
    pub row_loss: CudaSlice<f32>,
    /// Per row, `w · s · lse²`, with a z-loss.
    pub row_z: Option<CudaSlice<f32>>,
    /// `[sum, loss, z_sum]`.
    pub scalars: CudaSlice<f32>,
    /// `[trained rows, correct rows, documents]`.
    pub count: CudaSlice<u32>,
    /// The gradient (dense `[N, vocab]`) when computed into a new buffer.
    pub grad: Option<CudaSlice<T>>,
    /// Each document's trained rows, with `cu_seqlens`.
    pub doc_trained: Option<CudaSlice<u32>>,
    error_flag: CudaSlice<u32>,
    row_loss_requested: bool,
    stream: Arc<CudaStream>,
}

impl<T: LogitElem> DeviceCeOutput<T> {
    /// Turn the device-side error flag into a typed error (synchronizes the stream).
    pub fn check(&self) -> Result<()> {
        let flag = self.stream.clone_dtoh(&self.error_flag).map_err(cuda_err)?;
        abi::ce_error(flag[0])
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
        let count = s.clone_dtoh(&self.count).map_err(cuda_err)?;
        Ok(CeOutput {
            log_probs: f32s(&self.log_probs)?,
            entropy: f32s(&self.entropy)?,
            lse: f32s(&self.lse)?,
            argmax: match &self.argmax {
                Some(a) => s.clone_dtoh(a).map_err(cuda_err)?,
                None => Vec::new(),
            },
            row_loss: match self.row_loss_requested {
                true => s.clone_dtoh(&self.row_loss).map_err(cuda_err)?,
                false => Vec::new(),
            },
            sum: scalars[0],
            loss: scalars[1],
            z_sum: if self.row_z.is_some() {
                scalars[2]
            } else {
                0.0
            },
            count: count[0],
            correct: if self.argmax.is_some() { count[1] } else { 0 },
            documents: count[2],
            grad: match &self.grad {
                Some(g) => Some(s.clone_dtoh(g).map_err(cuda_err)?),
                None => None,
            },
        })
    }
}

/// `len` elements of `E` on `stream`, uninitialized; a null slice when `len` is 0 (cudarc allocates
/// nothing then).
///
/// # Safety
/// Every element must be written before it is read.
pub(super) unsafe fn uninit_or_null<E: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<E>> {
    if len == 0 {
        stream.null::<E>().map_err(cuda_err)
    } else {
        // SAFETY: the caller writes every element before reading it.
        unsafe { stream.alloc::<E>(len) }.map_err(cuda_err)
    }
}

/// Keep the guard of an address a kernel is about to use (it records the use when dropped after the
/// launch) and return the address.
pub(super) fn keep<'a>(
    guards: &mut Vec<SyncOnDrop<'a>>,
    (addr, guard): (u64, SyncOnDrop<'a>),
) -> u64 {
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

/// The caller's buffers for the outputs: per-row ones of `rows` elements (`None`: not computed; the
/// kernels leave out the entropy's and the argmax's work without them), `row_z` (needed with a z-loss),
/// `scalars` `[sum, loss, z_sum]`, `count` `[trained rows, correct rows, documents]`, `doc_trained` (one
/// per document, needed with `cu_seqlens`), `error_flag` `[1]` (`CE_ERR_*` bits: a trained row's label
/// outside `[0, vocab)`, bad `cu_seqlens`). Every element is written; nothing needs zeroing first.
pub struct CeBuffers<'a> {
    pub row_loss: &'a mut dyn DeviceWrite<f32>,
    pub row_z: Option<&'a mut dyn DeviceWrite<f32>>,
    pub log_probs: Option<&'a mut dyn DeviceWrite<f32>>,
    pub entropy: Option<&'a mut dyn DeviceWrite<f32>>,
    pub lse: Option<&'a mut dyn DeviceWrite<f32>>,
    pub argmax: Option<&'a mut dyn DeviceWrite<i32>>,
    pub scalars: &'a mut dyn DeviceWrite<f32>,
    pub count: &'a mut dyn DeviceWrite<u32>,
    pub doc_trained: Option<&'a mut dyn DeviceWrite<u32>>,
    pub error_flag: &'a mut dyn DeviceWrite<u32>,
}

/// The fused masked cross-entropy kernels, loaded on the caller's stream.
pub struct MaskedCrossEntropy {
    stream: Arc<CudaStream>,
    /// `masked_ce_{fwd,fwd_bwd}_{suffix}_{variant}`, looked up once.
    kernels: std::collections::HashMap<String, CudaFunction>,
    count: CudaFunction,
    documents: CudaFunction,
    reduce: CudaFunction,
    /// `masked_ce_shard_{fwd,bwd}_{suffix}` (vocabulary-parallel, `super::parallel`).
    pub(super) shard: std::collections::HashMap<String, CudaFunction>,
    origin: ModuleOrigin,
    /// The one-read forward+backward kernels, when asked for and the device has clusters (sm_90+).
    one_read: Option<OneRead>,
}

/// `masked_ce_fwd_bwd_{suffix}_{variant}_cluster`, the kernel choice, and the shared memory the device
/// lets one block have (each function may use all of it: set once, when loaded).
struct OneRead {
    kernels: std::collections::HashMap<String, CudaFunction>,
    kernel: CeRowKernel,
    device_limit: usize,
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
        for backward in [false, true] {
            for suffix in ["f32", "f16", "bf16"] {
                for variant in CeVariant::ALL {
                    let name = variant.kernel(backward, suffix);
                    let function = module.load_function(&name).map_err(cuda_err)?;
                    kernels.insert(name, function);
                }
            }
        }
        let mut shard = std::collections::HashMap::new();
        for op in ["fwd", "bwd"] {
            for suffix in ["f32", "f16", "bf16"] {
                let name = format!("masked_ce_shard_{op}_{suffix}");
                let function = module.load_function(&name).map_err(cuda_err)?;
                shard.insert(name, function);
            }
        }
        Ok(MaskedCrossEntropy {
            shard,
            count: module.load_function("masked_ce_count").map_err(cuda_err)?,
            documents: module
                .load_function("masked_ce_documents")
                .map_err(cuda_err)?,
            reduce: module.load_function("masked_ce_reduce").map_err(cuda_err)?,
            kernels,
            stream,
            origin,
            one_read: None,
        })
    }

    /// These kernels with `kernel` for forward+backward: [`CeRowKernel::OneRead`] loads the cluster
    /// kernels on sm_90+ (elsewhere the two-pass kernels stay).
    pub fn with_row_kernel(mut self, kernel: CeRowKernel) -> Result<Self> {
        self.one_read = None;
        if kernel == CeRowKernel::TwoPass {
            return Ok(self);
        }
        let ctx = self.stream.context();
        if ctx.compute_capability().map_err(cuda_err)?.0 < 9 {
            return Ok(self);
        }
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
        let device_limit = ctx
            .attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(cuda_err)?;
        let source =
            crate::kernels::kernel("masked_ce_cluster").expect("masked_ce_cluster.cu is embedded");
        let (module, _) = module::load(ctx, source)?;
        let mut kernels = std::collections::HashMap::new();
        for suffix in ["f32", "f16", "bf16"] {
            for variant in CeVariant::ALL {
                let name = variant.cluster_kernel(suffix);
                let function = module.load_function(&name).map_err(cuda_err)?;
                // More than 48 KiB of dynamic shared memory must be allowed per function, once.
                function
                    .set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        device_limit,
                    )
                    .map_err(cuda_err)?;
                kernels.insert(name, function);
            }
        }
        self.one_read = Some(OneRead {
            kernels,
            kernel,
            device_limit: device_limit as usize,
        });
        Ok(self)
    }

    /// Whether forward+backward runs the one-read kernels (asked for, and the device has clusters).
    pub fn has_one_read(&self) -> bool {
        self.one_read.is_some()
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
        let new_grad = matches!(grad, CeGrad::None) && !forward_only;
        let vocab = targets.shape.vocab;
        self.with_outputs(
            targets,
            options,
            request,
            new_grad,
            |buffers, new_grad| match (grad, new_grad) {
                (CeGrad::None, Some(buffer)) => {
                    let grad = CeGrad::Into(buffer, vocab);
                    self.compute(logits, targets, options, grad, buffers)
                }
                (grad, _) => self.compute(logits, targets, options, grad, buffers),
            },
        )
    }

    /// New output buffers for `targets` and `request` (with `new_grad`, a dense `[N, vocab]` gradient
    /// buffer too), filled by `compute`.
    pub(crate) fn with_outputs<T: LogitElem>(
        &self,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        request: CeRequest,
        new_grad: bool,
        compute: impl FnOnce(&mut CeBuffers<'_>, Option<&mut CudaSlice<T>>) -> Result<()>,
    ) -> Result<DeviceCeOutput<T>> {
        let stream = &self.stream;
        let n = targets.shape.rows;
        // An empty batch gets empty (null) per-row outputs, as the other backends give.
        fn alloc<E: cudarc::driver::DeviceRepr>(
            stream: &Arc<CudaStream>,
            len: usize,
        ) -> Result<CudaSlice<E>> {
            // SAFETY: the kernels write every element of each output (see `compute`).
            unsafe { uninit_or_null(stream, len) }
        }
        let optional = |wanted: bool| wanted.then(|| alloc::<f32>(stream, n)).transpose();
        let mut out = DeviceCeOutput {
            log_probs: optional(request.log_probs)?,
            entropy: optional(request.entropy)?,
            lse: optional(request.lse)?,
            argmax: request
                .argmax
                .then(|| alloc::<i32>(stream, n))
                .transpose()?,
            row_loss: alloc(stream, n)?,
            row_z: optional(options.z_loss != 0.0)?,
            scalars: alloc(stream, 3)?,
            count: alloc(stream, 3)?,
            grad: match new_grad {
                true => Some(alloc::<T>(stream, n * targets.shape.vocab)?),
                false => None,
            },
            doc_trained: targets
                .cu_seqlens
                .map(|_| alloc::<u32>(stream, targets.documents()))
                .transpose()?,
            // Cleared by the count kernel before the main one may set it.
            error_flag: alloc(stream, 1)?,
            row_loss_requested: request.row_loss,
            stream: stream.clone(),
        };
        let DeviceCeOutput {
            log_probs,
            entropy,
            lse,
            argmax,
            row_loss,
            row_z,
            scalars,
            count,
            grad,
            doc_trained,
            error_flag,
            ..
        } = &mut out;
        let mut buffers = CeBuffers {
            row_loss,
            row_z: row_z.as_mut().map(|b| b as &mut dyn DeviceWrite<f32>),
            log_probs: log_probs.as_mut().map(|b| b as &mut dyn DeviceWrite<f32>),
            entropy: entropy.as_mut().map(|b| b as &mut dyn DeviceWrite<f32>),
            lse: lse.as_mut().map(|b| b as &mut dyn DeviceWrite<f32>),
            argmax: argmax.as_mut().map(|b| b as &mut dyn DeviceWrite<i32>),
            scalars,
            count,
            doc_trained: doc_trained.as_mut().map(|b| b as &mut dyn DeviceWrite<u32>),
            error_flag,
        };
        compute(&mut buffers, grad.as_mut())?;
        Ok(out)
    }

    /// The general form every other call is made of: the loss of `logits` against `targets` into the
    /// caller's `outputs`, the gradient as `grad` says, all on this stream, nothing synchronized. The
    /// kernel variant follows the outputs given (no entropy buffer: no entropy work) and the options.
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
            targets.mask.map_or(shape.rows, |m| m.len()),
            targets.weights.map(|w| w.len()),
        )?;
        Self::validate_outputs(targets, options, outputs)?;
        let n = shape.rows;
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
        let backward = !matches!(grad, CeGrad::None);
        // Addresses for the argument struct; each guard records this stream's use of its buffer when
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
        let launch = self.launcher::<T>(targets, options, outputs, backward);
        let args = CeArgs {
            logits: logits_addr,
            grad: grad_addr,
            grad_stride,
            ..self.batch_args(targets, options, outputs, g)
        };
        // SAFETY: `validate` checked that the logits hold `rows` rows of `row_stride` with `vocab`
        // elements, and that labels, mask and weights have one entry per row; `validate_outputs` the
        // rest of `batch_args`' contract; the gradient `rows` rows of `grad_stride` (checked above; the
        // logits' own layout in place).
        unsafe {
            launch.counts(&args)?;
            launch.rows(&args)?;
            launch.reduce(&args)?;
        }
        drop(guards);
        Ok(())
    }

    /// The cross-entropy of `targets.shape.rows` rows whose logits exist a chunk at a time (the fused
    /// linear cross-entropy): the trained rows counted once over the batch; then for each chunk of up to
    /// `chunk_rows` rows (at least 1), `fill(start, rows, at)` makes their logits in `chunk` (at address
    /// `at`, rows `targets.shape.row_stride` apart), the row kernel runs over them with the batch's
    /// counters (the gradient, with `backward`, over the logits in place), and `consume(start, rows, at)`
    /// uses that gradient; then the reduction. `fill` and `consume` enqueue on this stream; nothing
    /// synchronizes the host.
    #[cfg(feature = "cublas")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn compute_chunked<T: LogitElem>(
        &self,
        chunk: &mut dyn DeviceWrite<T>,
        chunk_rows: usize,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        backward: bool,
        outputs: &mut CeBuffers<'_>,
        fill: &mut dyn FnMut(usize, usize, u64) -> Result<()>,
        consume: &mut dyn FnMut(usize, usize, u64) -> Result<()>,
    ) -> Result<()> {
        let stream = &self.stream;
        let shape = targets.shape;
        let n = shape.rows;
        debug_assert!(
            chunk_rows > 0,
            "the caller's chunk rule gives at least one row"
        );
        // The chunk's own layout: what `validate` checks of a batch's logits, for one chunk.
        let chunk_shape = LogitsShape {
            rows: chunk_rows.min(n),
            ..shape
        };
        chunk_shape.validate(chunk.len(), chunk_shape.rows, chunk_shape.rows, None)?;
        LogitsShape {
            row_stride: shape.vocab,
            ..shape
        }
        .validate(
            n.saturating_mul(shape.vocab),
            targets.labels.len(),
            targets.mask.map_or(n, |m| m.len()),
            targets.weights.map(|w| w.len()),
        )?;
        Self::validate_outputs(targets, options, outputs)?;
        let mut guards: Vec<SyncOnDrop<'_>> = Vec::new();
        let chunk_addr = keep(&mut guards, chunk.write_addr(stream));
        let launch = self.launcher::<T>(targets, options, outputs, backward);
        let args = self.batch_args(targets, options, outputs, &mut guards);
        // SAFETY: as in `compute`, with the logits of rows `start..start + rows` in `chunk` (validated
        // above for `chunk_rows` rows of `row_stride`) and the per-row inputs and outputs offset to the
        // chunk by `rows_chunk`.
        unsafe { launch.counts(&args)? };
        // The gradient over the logits in place, or none.
        let (grad, grad_stride) = match backward {
            true => (chunk_addr, shape.row_stride as u64),
            false => (0, 0),
        };
        for start in (0..n).step_by(chunk_rows) {
            let rows = chunk_rows.min(n - start);
            fill(start, rows, chunk_addr)?;
            let chunk_args = CeArgs {
                grad_stride,
                ..args
            }
            .rows_chunk(start, rows, chunk_addr, grad);
            // SAFETY: see above.
            unsafe { launch.rows(&chunk_args)? };
            consume(start, rows, chunk_addr)?;
        }
        // SAFETY: see above.
        unsafe { launch.reduce(&args)? };
        drop(guards);
        Ok(())
    }

    /// The kernels one cross-entropy of `targets` launches: the variant follows the outputs given and
    /// the options; forward+backward takes the one-read kernel where it was loaded and a row fits.
    fn launcher<T: LogitElem>(
        &self,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        outputs: &CeBuffers<'_>,
        backward: bool,
    ) -> CeLaunch<'_> {
        let request = CeRequest {
            entropy: outputs.entropy.is_some(),
            argmax: outputs.argmax.is_some(),
            ..CeRequest::NONE
        };
        let variant = CeVariant::of(options, &request);
        let one_read = self.one_read.as_ref().filter(|_| backward).and_then(|one| {
            let size = std::mem::size_of::<T>();
            ClusterPlan::for_kernel(one.kernel, one.device_limit, targets.shape.vocab, size)
                .map(|plan| (&one.kernels[&variant.cluster_kernel(T::SUFFIX)], plan))
        });
        CeLaunch {
            ce: self,
            row_kernel: &self.kernels[&variant.kernel(backward, T::SUFFIX)],
            one_read,
            documents: targets.documents(),
        }
    }

    /// Check the outputs `outputs` against `targets` and `options`: every per-row output at least
    /// `rows` long, `row_z` present with a z-loss, `doc_trained` with `cu_seqlens`, the fixed-size ones
    /// their size.
    fn validate_outputs(
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        outputs: &CeBuffers<'_>,
    ) -> Result<()> {
        options.validate()?;
        let n = targets.shape.rows;
        let documents = targets.documents();
        let short = |what: &str, len: usize, needed: usize| {
            (len < needed)
                .then(|| Error::Shape(format!("{what}: a buffer of {len} elements for {needed}")))
        };
        let missing = |what: &str, why: &str| {
            Some(Error::InvalidOption {
                name: "outputs",
                reason: format!("{what} needs a buffer {why}"),
            })
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
            targets.cu_seqlens.and_then(|cu| {
                (cu.len() < 2).then(|| {
                    Error::Shape(format!(
                        "cu_seqlens has {} entries; at least 2 (one document)",
                        cu.len()
                    ))
                })
            }),
            short("row_loss", outputs.row_loss.len(), n),
            match &outputs.row_z {
                Some(b) => short("row_z", b.len(), n),
                None if options.z_loss != 0.0 => missing("row_z", "with a z-loss"),
                None => None,
            },
            outputs
                .log_probs
                .as_ref()
                .and_then(|b| short("log_probs", b.len(), n)),
            outputs
                .entropy
                .as_ref()
                .and_then(|b| short("entropy", b.len(), n)),
            outputs.lse.as_ref().and_then(|b| short("lse", b.len(), n)),
            outputs
                .argmax
                .as_ref()
                .and_then(|b| short("argmax", b.len(), n)),
            short("scalars", outputs.scalars.len(), 3),
            short("count", outputs.count.len(), 3),
            match &outputs.doc_trained {
                Some(b) => short("doc_trained", b.len(), documents),
                None if documents > 0 => missing("doc_trained", "with cu_seqlens"),
                None => None,
            },
            short("error_flag", outputs.error_flag.len(), 1),
        ];
        match checks.into_iter().flatten().next() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The kernels' argument struct for `targets` and `outputs` (validated), everything but the
    /// logits and the gradient; the buffers' guards go to `guards`.
    fn batch_args<'s>(
        &'s self,
        targets: &DeviceCeTargets<'s>,
        options: &CeOptions,
        outputs: &'s mut CeBuffers<'_>,
        guards: &mut Vec<SyncOnDrop<'s>>,
    ) -> CeArgs {
        let stream = &*self.stream;
        let g = guards;
        let documents = targets.documents();
        let (labels, labels_are_i64) = match targets.labels {
            DeviceLabels::I32(l) => (keep(g, l.read_addr(stream)), 0),
            DeviceLabels::I64(l) => (keep(g, l.read_addr(stream)), 1),
        };
        CeArgs {
            labels,
            mask: targets.mask.map_or(0, |m| keep(g, m.read_addr(stream))),
            weights: targets.weights.map_or(0, |w| keep(g, w.read_addr(stream))),
            cu_seqlens: targets
                .cu_seqlens
                .map_or(0, |c| keep(g, c.read_addr(stream))),
            upstream_ptr: targets.upstream.map_or(0, |u| keep(g, u.read_addr(stream))),
            doc_trained: match &mut outputs.doc_trained {
                Some(b) if documents > 0 => keep(g, b.write_addr(stream)),
                _ => 0,
            },
            count: keep(g, outputs.count.write_addr(stream)),
            row_loss: keep(g, outputs.row_loss.write_addr(stream)),
            row_z: keep_optional(g, stream, &mut outputs.row_z),
            log_probs: keep_optional(g, stream, &mut outputs.log_probs),
            entropy: keep_optional(g, stream, &mut outputs.entropy),
            lse: keep_optional(g, stream, &mut outputs.lse),
            argmax: match &mut outputs.argmax {
                Some(b) => keep(g, b.write_addr(stream)),
                None => 0,
            },
            scalars: keep(g, outputs.scalars.write_addr(stream)),
            error_flag: keep(g, outputs.error_flag.write_addr(stream)),
            labels_are_i64,
            ..abi::ce_args(options, &targets.shape, documents)
        }
    }
}

/// The launches of one cross-entropy ([`MaskedCrossEntropy::launcher`]): the count (and documents)
/// kernels, the row kernel over all rows or one chunk at a time, the reduction.
struct CeLaunch<'k> {
    ce: &'k MaskedCrossEntropy,
    row_kernel: &'k CudaFunction,
    one_read: Option<(&'k CudaFunction, ClusterPlan)>,
    documents: usize,
}

impl CeLaunch<'_> {
    /// Count the trained rows (and each document's) of the batch `args` describes.
    ///
    /// # Safety
    /// `args` must satisfy the kernels' contract (`kernels/masked_ce.cu`): labels, mask and weights one
    /// entry per row, cu_seqlens documents + 1 entries, the counters and the flag writable.
    unsafe fn counts(&self, args: &CeArgs) -> Result<()> {
        let stream = &self.ce.stream;
        // SAFETY: the count kernel reads `rows` mask bytes and labels and writes three counts and the
        // flag; the documents kernel finds each document's rows by bisection within the documents + 1
        // boundaries (whatever their values; it flags bad ones and clamps the rows it counts to
        // [0, rows)). The struct is every kernel's one parameter (abi.cuh).
        unsafe {
            stream
                .launch_builder(&self.ce.count)
                .arg(args)
                .launch(launch_config(abi::ce_one_block()))
                .map_err(cuda_err)?;
            if self.documents > 0 {
                stream
                    .launch_builder(&self.ce.documents)
                    .arg(args)
                    .launch(launch_config(abi::ce_documents_launch(self.documents)))
                    .map_err(cuda_err)?;
            }
        }
        Ok(())
    }

    /// The row kernel over the `args.rows` rows `args` points at (a whole batch, or one chunk of it).
    ///
    /// # Safety
    /// `args` must satisfy the row kernel's contract: logits `rows` rows of `logits_stride` with `vocab`
    /// elements, the gradient (when not null) `rows` rows of `grad_stride`, per-row inputs and outputs
    /// `rows` entries (absent ones null; the argmax buffer selects the full variant, the only one that
    /// writes it). The kernel dereferences a label only after checking it is in [0, vocab), and finds a
    /// row's document by bisection within the documents + 1 boundaries.
    unsafe fn rows(&self, args: &CeArgs) -> Result<()> {
        let stream = &self.ce.stream;
        let rows = args.rows as usize;
        match self.one_read {
            // The cluster kernel's CTAs keep `slice` columns each in the shared memory sized for them;
            // everything else is the two-pass kernel's contract above.
            Some((kernel, plan)) => unsafe {
                launch_cluster(stream, kernel, plan, rows, &plan.args(*args))
            },
            None => unsafe {
                stream
                    .launch_builder(self.row_kernel)
                    .arg(args)
                    .launch(launch_config(abi::ce_rows_launch(rows)))
                    .map(|_| ())
                    .map_err(cuda_err)
            },
        }
    }

    /// Reduce the row losses into the scalars.
    ///
    /// # Safety
    /// `args` as for [`CeLaunch::counts`], with every row's outputs written: the reduce kernel reads
    /// `rows` row losses (row z, argmax and labels when given) and writes three floats and one count.
    unsafe fn reduce(&self, args: &CeArgs) -> Result<()> {
        // SAFETY: as documented above.
        unsafe {
            self.ce
                .stream
                .launch_builder(&self.ce.reduce)
                .arg(args)
                .launch(launch_config(abi::ce_one_block()))
                .map(|_| ())
                .map_err(cuda_err)
        }
    }
}

/// Launch a one-read kernel on `stream` in clusters of `plan.ctas` CTAs with `plan.smem_bytes` of dynamic
/// shared memory each (cudarc's launch builder sets neither, so this is `cuLaunchKernelEx` itself; the
/// function was allowed that much when it was loaded).
///
/// # Safety
/// `args` must satisfy the kernel's contract (`kernels/masked_ce_cluster.cu`) for `rows` rows.
unsafe fn launch_cluster(
    stream: &Arc<CudaStream>,
    kernel: &CudaFunction,
    plan: ClusterPlan,
    rows: usize,
    args: &CeArgs,
) -> Result<()> {
    use cudarc::driver::sys;
    stream.context().bind_to_thread().map_err(cuda_err)?;
    let launch = plan.launch(rows);
    // SAFETY: an all-zero attribute is a valid "ignored" attribute; the cluster dimension is set below.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attribute.value.clusterDim.x = plan.ctas;
    attribute.value.clusterDim.y = 1;
    attribute.value.clusterDim.z = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: launch.grid[0],
        gridDimY: launch.grid[1],
        gridDimZ: launch.grid[2],
        blockDimX: launch.block[0],
        blockDimY: launch.block[1],
        blockDimZ: launch.block[2],
        sharedMemBytes: plan.smem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: 1,
    };
    // The kernel's one parameter, the struct by value: a pointer to it, as cuLaunchKernel takes.
    let mut params = [args as *const CeArgs as *mut std::ffi::c_void];
    // SAFETY: the config, its one attribute and the parameter array outlive the call, which copies them;
    // the caller vouches for what the kernel reads and writes.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            kernel.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(cuda_err)
}
