//! [`CudaCollator`]: the collation kernel on the caller's stream.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice,
    PushKernelArg, SyncOnDrop,
};

use super::memory::DeviceWrite;
use super::module::{self, ModuleOrigin};
use super::{cuda_err, launch_config};
use crate::backend::abi::{self, CollateArgs, CollatePackArgs, CollateScalars};
use crate::collate::{
    bools_from_bytes, Batch, BatchStats, CollatePlan, CollateSpec, IdDtype, IdTensor, Pack,
};
use crate::{Error, RaggedBatch, Result};

/// `input_ids` or `labels` on the device, in the spec's dtype.
#[derive(Debug)]
pub enum DeviceIds {
    I32(CudaSlice<i32>),
    I64(CudaSlice<i64>),
}

/// The collated tensors on the device (row-major `rows × width`, on the collator's stream), and the
/// batch's statistics (computed on the host from the ragged batch: reading them needs no sync).
#[derive(Debug)]
pub struct DeviceBatch {
    pub input_ids: DeviceIds,
    pub labels: DeviceIds,
    /// One byte per element, 0 or 1 (torch.bool's layout).
    pub response_mask: CudaSlice<u8>,
    pub attention_mask: Option<CudaSlice<u8>>,
    pub stats: BatchStats,
    stream: Arc<CudaStream>,
}

impl DeviceBatch {
    /// `(rows, width)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.stats.rows, self.stats.width)
    }

    /// Copy back to the host as the same [`Batch`] the CPU path makes (this synchronizes the stream).
    pub fn to_host(&self) -> Result<Batch> {
        let s = &self.stream;
        let ids = |d: &DeviceIds| d.to_host(s);
        let input_ids = ids(&self.input_ids)?;
        let labels = ids(&self.labels)?;
        let response_mask =
            bools_from_bytes(&s.clone_dtoh(&self.response_mask).map_err(cuda_err)?)?;
        let attention_mask = match &self.attention_mask {
            Some(m) => Some(bools_from_bytes(&s.clone_dtoh(m).map_err(cuda_err)?)?),
            None => None,
        };
        Ok(Batch {
            input_ids,
            labels,
            response_mask,
            attention_mask,
            stats: self.stats.clone(),
        })
    }
}

/// The batch (padding-free) layout on the device (`[total]` positions each; see
/// [`Pack`]). `cu_seqlens` is on the device (written by the kernel) and its host copy and
/// `max_seqlen` are known without a synchronization.
#[derive(Debug)]
pub struct DevicePack {
    pub input_ids: DeviceIds,
    pub labels: DeviceIds,
    pub response_mask: CudaSlice<u8>,
    pub position_ids: DeviceIds,
    pub cu_seqlens: CudaSlice<i32>,
    pub host_cu_seqlens: Vec<i32>,
    pub max_seqlen: usize,
    pub stats: BatchStats,
    stream: Arc<CudaStream>,
}

impl DevicePack {
    /// Copy back as the [`Pack`] the CPU path makes (synchronizes the stream).
    pub fn to_host(&self) -> Result<Pack> {
        let s = &self.stream;
        let ids = |d: &DeviceIds| d.to_host(s);
        let cu_seqlens = s.clone_dtoh(&self.cu_seqlens).map_err(cuda_err)?;
        if cu_seqlens != self.host_cu_seqlens {
            return Err(Error::Cuda(format!(
                "the kernel wrote cu_seqlens {cu_seqlens:?}, the host computed {:?}",
                self.host_cu_seqlens
            )));
        }
        Ok(Pack {
            input_ids: ids(&self.input_ids)?,
            labels: ids(&self.labels)?,
            response_mask: bools_from_bytes(&s.clone_dtoh(&self.response_mask).map_err(cuda_err)?)?,
            position_ids: ids(&self.position_ids)?,
            cu_seqlens,
            max_seqlen: self.max_seqlen,
            stats: self.stats.clone(),
        })
    }
}

impl DeviceIds {
    /// Copy back (synchronizes the stream).
    fn to_host(&self, stream: &Arc<CudaStream>) -> Result<IdTensor> {
        Ok(match self {
            DeviceIds::I32(v) => IdTensor::I32(stream.clone_dtoh(v).map_err(cuda_err)?),
            DeviceIds::I64(v) => IdTensor::I64(stream.clone_dtoh(v).map_err(cuda_err)?),
        })
    }

    /// `n` uninitialized ids of `dtype` (see [`alloc`]).
    fn alloc(stream: &Arc<CudaStream>, dtype: IdDtype, n: usize) -> Result<Self> {
        Ok(match dtype {
            IdDtype::I32 => DeviceIds::I32(alloc(stream, n)?),
            IdDtype::I64 => DeviceIds::I64(alloc(stream, n)?),
        })
    }

    /// As the kernels' output argument.
    fn as_mut(&mut self) -> DeviceIdsMut<'_> {
        match self {
            DeviceIds::I32(v) => DeviceIdsMut::I32(v),
            DeviceIds::I64(v) => DeviceIdsMut::I64(v),
        }
    }
}

/// Ids a kernel writes, in the spec's dtype: any writable device memory (a `CudaSlice`, a view of part
/// of one, a framework's buffer).
pub enum DeviceIdsMut<'a> {
    I32(&'a mut dyn DeviceWrite<i32>),
    I64(&'a mut dyn DeviceWrite<i64>),
}

impl DeviceIdsMut<'_> {
    /// Refuse a buffer of the wrong dtype or with fewer than `n` elements.
    fn check(&self, name: &'static str, dtype: IdDtype, n: usize) -> Result<()> {
        let (got, len) = match self {
            DeviceIdsMut::I32(b) => (IdDtype::I32, b.len()),
            DeviceIdsMut::I64(b) => (IdDtype::I64, b.len()),
        };
        if got != dtype {
            return Err(Error::InvalidOption {
                name: "id_dtype",
                reason: format!("{name} is a buffer of {got}, the spec says {dtype}"),
            });
        }
        check_len(name, len, n)
    }

    fn write_addr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        match self {
            DeviceIdsMut::I32(b) => b.write_addr(stream),
            DeviceIdsMut::I64(b) => b.write_addr(stream),
        }
    }
}

fn check_len(name: &str, len: usize, needed: usize) -> Result<()> {
    if len < needed {
        return Err(Error::Shape(format!(
            "{name}: a buffer of {len} elements for {needed}"
        )));
    }
    Ok(())
}

/// The caller's buffers for the padded layout.
pub struct BatchBuffers<'a> {
    pub input_ids: DeviceIdsMut<'a>,
    pub labels: DeviceIdsMut<'a>,
    pub response_mask: &'a mut dyn DeviceWrite<u8>,
    pub attention_mask: Option<&'a mut dyn DeviceWrite<u8>>,
}

/// The caller's buffers for the padding-free layout.
pub struct PackBuffers<'a> {
    pub input_ids: DeviceIdsMut<'a>,
    pub labels: DeviceIdsMut<'a>,
    pub response_mask: &'a mut dyn DeviceWrite<u8>,
    pub position_ids: DeviceIdsMut<'a>,
    pub cu_seqlens: &'a mut dyn DeviceWrite<i32>,
}

/// What the host knows of a pack written to the device, without reading it back.
#[derive(Clone, Debug, PartialEq)]
pub struct PackLayout {
    pub stats: BatchStats,
    pub cu_seqlens: Vec<i32>,
    pub max_seqlen: usize,
}

/// `n` elements of uninitialized device memory (an empty slice for 0).
///
/// Callers hand the memory out only after a kernel has written every element.
fn alloc<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    if n == 0 {
        return stream.null().map_err(cuda_err);
    }
    // SAFETY: see above: every caller's kernel writes all n elements before they are read.
    unsafe { stream.alloc::<T>(n) }.map_err(cuda_err)
}

/// Pinned staging buffers an uploader keeps at most (each one copy in flight).
const MAX_STAGING: usize = 8;

/// A pinned host buffer for the ragged batch, and the event of the copy that last read it.
struct Staging {
    buffer: PinnedHostSlice<u8>,
    copied: CudaEvent,
}

/// The collation kernel, loaded on the caller's stream.
pub struct CudaCollator {
    stream: Arc<CudaStream>,
    collate_i32: CudaFunction,
    collate_i64: CudaFunction,
    collate_pack_i32: CudaFunction,
    collate_pack_i64: CudaFunction,
    origin: ModuleOrigin,
    /// Pinned staging buffers: an upload takes one whose last copy has completed, so it never waits for
    /// the device (see `copy_to_device`).
    /// submitted (only, rarely, for the one before it).
    staging: Mutex<Vec<Staging>>,
}

impl std::fmt::Debug for CudaCollator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaCollator")
            .field("origin", &self.origin)
            .finish()
    }
}

/// Byte offsets of the three arrays inside the one buffer copied per batch: row offsets first (8-byte
/// aligned at 0), then tokens, then prompt lengths.
struct InputLayout {
    tokens_at: usize,
    prompt_lens_at: usize,
    /// Per-token trainable flags (one byte each), for multi-segment rows.
    trainable_at: Option<usize>,
    bytes: usize,
}

impl InputLayout {
    fn of(batch: &RaggedBatch) -> Self {
        let tokens_at = batch.row_offsets().len() * 8;
        let prompt_lens_at = tokens_at + batch.tokens().len() * 4;
        let end_of_prompt_lens = prompt_lens_at + batch.prompt_lens().len() * 4;
        let trainable_at = batch.trainable().map(|_| end_of_prompt_lens);
        InputLayout {
            tokens_at,
            prompt_lens_at,
            trainable_at,
            bytes: end_of_prompt_lens + batch.trainable().map_or(0, <[u8]>::len),
        }
    }
}

/// A ragged batch already on the device (one buffer), with what the host needs to launch on it: its
/// offsets (for the shape and statistics) and its largest token (for the dtype check). Made by
/// [`CudaCollator::upload`] from a validated [`RaggedBatch`], so its device copy is consistent.
pub struct DeviceRaggedBatch {
    input: CudaSlice<u8>,
    layout: InputLayout,
    row_offsets: Vec<u64>,
    prompt_lens: Vec<u32>,
    trainable: Option<Vec<u8>>,
    max_token: u32,
}

impl std::fmt::Debug for DeviceRaggedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRaggedBatch")
            .field("rows", &self.prompt_lens.len())
            .field("tokens", &self.row_offsets.last())
            .finish()
    }
}

impl DeviceRaggedBatch {
    /// The addresses of `tokens, row_offsets, prompt_lens, trainable` (0 without flags) inside the one
    /// uploaded buffer; the guard records the kernel's read when dropped after the launch.
    fn input_addrs<'a>(&'a self, stream: &'a CudaStream) -> ([u64; 4], SyncOnDrop<'a>) {
        let (base, guard) = self.input.device_ptr(stream);
        let layout = &self.layout;
        let addrs = [
            base + layout.tokens_at as u64,
            base,
            base + layout.prompt_lens_at as u64,
            layout.trainable_at.map_or(0, |at| base + at as u64),
        ];
        (addrs, guard)
    }

    /// Bytes copied to the device for this batch.
    pub fn bytes(&self) -> usize {
        self.layout.bytes
    }
}

impl CudaCollator {
    /// Load the collation kernels into the stream's context. Trainers that own a context and stream pass
    /// theirs; every launch and copy goes on it.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let kernel = crate::kernels::kernel("collate").expect("collate.cu is embedded");
        let (module, origin) = module::load(stream.context(), kernel)?;
        let load = |name: &str| module.load_function(name).map_err(cuda_err);
        Ok(CudaCollator {
            collate_i32: load("collate_i32")?,
            collate_i64: load("collate_i64")?,
            collate_pack_i32: load("collate_pack_i32")?,
            collate_pack_i64: load("collate_pack_i64")?,
            stream,
            origin,
            staging: Mutex::new(Vec::new()),
        })
    }

    /// Whether the module came from the prebuilt PTX or a run-time compile.
    pub fn origin(&self) -> &ModuleOrigin {
        &self.origin
    }

    /// The stream everything runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Collate on the device: validate on the host, one copy of the ragged batch through pinned memory,
    /// one kernel launch, no host synchronization. Bit-identical to [`crate::backend::cpu::collate()`].
    pub fn collate(&self, batch: &RaggedBatch, spec: &CollateSpec) -> Result<DeviceBatch> {
        let uploaded = self.upload(batch)?;
        self.collate_uploaded(&uploaded, spec)
    }

    /// Validate `batch` and copy it to the device (one transfer through a pinned staging buffer).
    pub fn upload(&self, batch: &RaggedBatch) -> Result<DeviceRaggedBatch> {
        batch.validate()?;
        let layout = InputLayout::of(batch);
        let input = self.copy_to_device(batch, &layout)?;
        Ok(DeviceRaggedBatch {
            input,
            layout,
            row_offsets: batch.row_offsets().to_vec(),
            prompt_lens: batch.prompt_lens().to_vec(),
            trainable: batch.trainable().map(<[u8]>::to_vec),
            max_token: batch.tokens().iter().copied().max().unwrap_or(0),
        })
    }

    /// The kernel alone, on a batch already on the device (one launch, no host synchronization), into
    /// new buffers.
    pub fn collate_uploaded(
        &self,
        batch: &DeviceRaggedBatch,
        spec: &CollateSpec,
    ) -> Result<DeviceBatch> {
        let plan = CollatePlan::for_validated(&batch.row_offsets, batch.max_token, spec)?;
        let stream = &self.stream;
        let n = plan.len();
        let mut input_ids = DeviceIds::alloc(stream, spec.id_dtype, n)?;
        let mut labels = DeviceIds::alloc(stream, spec.id_dtype, n)?;
        let mut response_mask = alloc::<u8>(stream, n)?;
        let mut attention_mask = match spec.attention_mask {
            true => Some(alloc::<u8>(stream, n)?),
            false => None,
        };
        let stats = self.collate_uploaded_into(
            batch,
            spec,
            &mut BatchBuffers {
                input_ids: input_ids.as_mut(),
                labels: labels.as_mut(),
                response_mask: &mut response_mask,
                attention_mask: attention_mask
                    .as_mut()
                    .map(|m| m as &mut dyn DeviceWrite<u8>),
            },
        )?;
        Ok(DeviceBatch {
            input_ids,
            labels,
            response_mask,
            attention_mask,
            stats,
            stream: stream.clone(),
        })
    }

    /// Collate into the caller's buffers (a trainer reusing its allocations every step): one copy of
    /// the ragged batch up, one launch, no host synchronization. Each buffer needs at least `rows ×
    /// width` elements of the spec's id dtype (the first `rows × width` are written; the shape is in the
    /// returned statistics), and `attention_mask` exactly when the spec asks for it.
    pub fn collate_into(
        &self,
        batch: &RaggedBatch,
        spec: &CollateSpec,
        out: &mut BatchBuffers<'_>,
    ) -> Result<BatchStats> {
        let uploaded = self.upload(batch)?;
        self.collate_uploaded_into(&uploaded, spec, out)
    }

    /// [`CudaCollator::collate_into`] on a batch already on the device.
    pub fn collate_uploaded_into(
        &self,
        batch: &DeviceRaggedBatch,
        spec: &CollateSpec,
        out: &mut BatchBuffers<'_>,
    ) -> Result<BatchStats> {
        let plan = CollatePlan::for_validated(&batch.row_offsets, batch.max_token, spec)?;
        let stream = &self.stream;
        let n = plan.len();
        out.input_ids.check("input_ids", spec.id_dtype, n)?;
        out.labels.check("labels", spec.id_dtype, n)?;
        check_len("response_mask", out.response_mask.len(), n)?;
        match (&out.attention_mask, spec.attention_mask) {
            (Some(m), true) => check_len("attention_mask", m.len(), n)?,
            (None, false) => {}
            (given, _) => {
                return Err(Error::InvalidOption {
                    name: "attention_mask",
                    reason: format!(
                        "the spec {} an attention mask and {} buffer was given",
                        if spec.attention_mask {
                            "asks for"
                        } else {
                            "has no"
                        },
                        if given.is_some() { "a" } else { "no" }
                    ),
                })
            }
        }
        if n > 0 {
            let (inputs, read_guard) = batch.input_addrs(stream);
            let [tokens, row_offsets, prompt_lens, trainable] = inputs;
            let scalars = CollateScalars::of(&plan);
            let (input_ids, g1) = out.input_ids.write_addr(stream);
            let (labels, g2) = out.labels.write_addr(stream);
            let (response_mask, g3) = out.response_mask.write_addr(stream);
            let (attention_mask, g4) = match &mut out.attention_mask {
                Some(m) => {
                    let (a, g) = m.write_addr(stream);
                    (a, Some(g))
                }
                None => (0, None),
            };
            let args = CollateArgs {
                tokens,
                row_offsets,
                prompt_lens,
                trainable,
                input_ids,
                labels,
                response_mask,
                attention_mask,
                rows: scalars.rows,
                width: plan.width as u64,
                ignore_index: scalars.ignore_index,
                pad_id: scalars.pad_id,
                use_ignore_index: scalars.use_ignore_index,
            };
            let function = match spec.id_dtype {
                IdDtype::I32 => &self.collate_i32,
                IdDtype::I64 => &self.collate_i64,
            };
            let mut launch = stream.launch_builder(function);
            launch.arg(&args);
            // SAFETY: `upload` validated the ragged batch on the host (offsets start at 0, never decrease
            // and end at the token count; every prompt fits its row) and the device copy is byte for byte
            // that batch, so every `tokens[start + pos]` the kernel reads (pos < len) is in bounds. Every
            // output holds at least rows × width elements of its type (checked above), and the kernel
            // writes only positions below width of rows below rows. `args` is the kernel's one parameter
            // (abi.cuh).
            unsafe { launch.launch(launch_config(abi::collate_launch(&plan))) }
                .map_err(cuda_err)?;
            drop((read_guard, g1, g2, g3, g4));
        }
        Ok(plan.stats_from(
            &batch.row_offsets,
            &batch.prompt_lens,
            batch.trainable.as_deref(),
        ))
    }

    /// The padding-free layout, every row a document, into new buffers: one copy, one launch, no host
    /// sync. Bit-identical to [`crate::backend::cpu::collate_pack`].
    pub fn collate_pack(&self, batch: &RaggedBatch, spec: &CollateSpec) -> Result<DevicePack> {
        let uploaded = self.upload(batch)?;
        let plan = CollatePlan::for_validated(batch.row_offsets(), uploaded.max_token, spec)?;
        let total = CollatePlan::pack_total(batch.tokens().len(), spec)?;
        let stream = &self.stream;
        let ids = |n: usize| DeviceIds::alloc(stream, spec.id_dtype, n);
        // Every position and every cu_seqlens entry is written by the kernel.
        let (mut input_ids, mut labels, mut position_ids) = (ids(total)?, ids(total)?, ids(total)?);
        let mut response_mask = alloc::<u8>(stream, total)?;
        let mut cu_seqlens = alloc::<i32>(
            stream,
            CollatePlan::pack_boundaries(batch.row_offsets(), total)
                .0
                .len(),
        )?;
        let layout = self.pack_uploaded_into(
            &uploaded,
            &plan,
            total,
            spec,
            &mut PackBuffers {
                input_ids: input_ids.as_mut(),
                labels: labels.as_mut(),
                response_mask: &mut response_mask,
                position_ids: position_ids.as_mut(),
                cu_seqlens: &mut cu_seqlens,
            },
        )?;
        Ok(DevicePack {
            input_ids,
            labels,
            response_mask,
            position_ids,
            cu_seqlens,
            host_cu_seqlens: layout.cu_seqlens,
            max_seqlen: layout.max_seqlen,
            stats: layout.stats,
            stream: stream.clone(),
        })
    }

    /// The padding-free layout into the caller's buffers: `input_ids`, `labels`, `position_ids` and
    /// `response_mask` of at least `total` positions (the returned [`PackLayout`] says how many), and
    /// `cu_seqlens` of at least its length. The host learns `cu_seqlens` and `max_seqlen` from the
    /// offsets alone, without a device round trip.
    pub fn collate_pack_into(
        &self,
        batch: &RaggedBatch,
        spec: &CollateSpec,
        out: &mut PackBuffers<'_>,
    ) -> Result<PackLayout> {
        let uploaded = self.upload(batch)?;
        let plan = CollatePlan::for_validated(batch.row_offsets(), uploaded.max_token, spec)?;
        let total = CollatePlan::pack_total(batch.tokens().len(), spec)?;
        self.pack_uploaded_into(&uploaded, &plan, total, spec, out)
    }

    fn pack_uploaded_into(
        &self,
        uploaded: &DeviceRaggedBatch,
        plan: &CollatePlan,
        total: usize,
        spec: &CollateSpec,
        out: &mut PackBuffers<'_>,
    ) -> Result<PackLayout> {
        let (cu_seqlens, max_seqlen) = CollatePlan::pack_boundaries(&uploaded.row_offsets, total);
        out.input_ids.check("input_ids", spec.id_dtype, total)?;
        out.labels.check("labels", spec.id_dtype, total)?;
        out.position_ids
            .check("position_ids", spec.id_dtype, total)?;
        check_len("response_mask", out.response_mask.len(), total)?;
        check_len("cu_seqlens", out.cu_seqlens.len(), cu_seqlens.len())?;
        let stream = &self.stream;
        let (inputs, read_guard) = uploaded.input_addrs(stream);
        let [tokens, row_offsets, prompt_lens, trainable] = inputs;
        let scalars = CollateScalars::of(plan);
        let (input_ids, g1) = out.input_ids.write_addr(stream);
        let (labels, g2) = out.labels.write_addr(stream);
        let (position_ids, g3) = out.position_ids.write_addr(stream);
        let (response_mask, g4) = out.response_mask.write_addr(stream);
        let (cu_seqlens_addr, g5) = out.cu_seqlens.write_addr(stream);
        let args = CollatePackArgs {
            tokens,
            row_offsets,
            prompt_lens,
            trainable,
            input_ids,
            labels,
            response_mask,
            position_ids,
            cu_seqlens: cu_seqlens_addr,
            rows: scalars.rows,
            total: total as u64,
            ignore_index: scalars.ignore_index,
            pad_id: scalars.pad_id,
            use_ignore_index: scalars.use_ignore_index,
        };
        let function = match spec.id_dtype {
            IdDtype::I32 => &self.collate_pack_i32,
            IdDtype::I64 => &self.collate_pack_i64,
        };
        let mut launch = stream.launch_builder(function);
        launch.arg(&args);
        // SAFETY: `upload` validated the batch on the host and the device copy is that batch, so every
        // token read (t + 1 < end of its document) is in bounds; the outputs hold at least `total`
        // positions and cu_seqlens rows + 1 (+ 1 with a pad tail) entries (checked above), and the grid
        // has at least rows + 2 threads. `args` is the kernel's one parameter (abi.cuh).
        unsafe { launch.launch(launch_config(abi::collate_pack_launch(plan, total))) }
            .map_err(cuda_err)?;
        drop((read_guard, g1, g2, g3, g4, g5));
        Ok(PackLayout {
            stats: plan.pack_stats_from(
                &uploaded.row_offsets,
                &uploaded.prompt_lens,
                uploaded.trainable.as_deref(),
                total,
            ),
            cu_seqlens,
            max_seqlen,
        })
    }

    /// Copy the ragged batch to the device in one transfer through a pinned staging buffer. The host never
    /// waits for the device here: a buffer whose last copy is still in flight is not reused, another is
    /// taken or made (pinned memory is kept, never freed, which would synchronize), up to
    /// [`MAX_STAGING`] buffers; only with that many copies in flight does an upload wait for the oldest.
    fn copy_to_device(&self, batch: &RaggedBatch, layout: &InputLayout) -> Result<CudaSlice<u8>> {
        let stream = &self.stream;
        let mut pool = self
            .staging
            .lock()
            .map_err(|_| Error::Cuda("staging lock poisoned".into()))?;
        let ctx = stream.context();
        let new_buffer = || -> Result<Staging> {
            let capacity = layout.bytes.next_power_of_two().max(1 << 16);
            // SAFETY: the buffer's contents are written below before the copy reads them.
            let buffer = unsafe { ctx.alloc_pinned::<u8>(capacity) }.map_err(cuda_err)?;
            let copied = ctx.new_event(None).map_err(cuda_err)?;
            Ok(Staging { buffer, copied })
        };
        let free = |s: &Staging| s.copied.try_is_complete().unwrap_or(false);
        let at = match pool
            .iter()
            .position(|s| s.buffer.len() >= layout.bytes && free(s))
        {
            Some(at) => at,
            None if pool.len() < MAX_STAGING => {
                pool.push(new_buffer()?);
                pool.len() - 1
            }
            None => {
                // Every buffer is in flight or too small: the one whose copy is oldest (the front, as
                // taking moves a buffer to the back), waited for, and grown if it is too small.
                pool[0].copied.synchronize().map_err(cuda_err)?;
                if pool[0].buffer.len() < layout.bytes {
                    pool[0] = new_buffer()?;
                }
                0
            }
        };
        // Most recently used last: the front is always the oldest copy.
        let taken = pool.remove(at);
        pool.push(taken);
        let staging = pool.last_mut().expect("just pushed");
        let host = staging.buffer.as_mut_slice().map_err(cuda_err)?;
        let bytes = &mut host[..layout.bytes];
        bytes[..layout.tokens_at].copy_from_slice(bytemuck::cast_slice(batch.row_offsets()));
        bytes[layout.tokens_at..layout.prompt_lens_at]
            .copy_from_slice(bytemuck::cast_slice(batch.tokens()));
        let prompt_lens_end = layout.prompt_lens_at + batch.prompt_lens().len() * 4;
        bytes[layout.prompt_lens_at..prompt_lens_end]
            .copy_from_slice(bytemuck::cast_slice(batch.prompt_lens()));
        if let (Some(at), Some(flags)) = (layout.trainable_at, batch.trainable()) {
            bytes[at..at + flags.len()].copy_from_slice(flags);
        }

        // Room for at least one token so that the tokens view is never empty.
        let device_bytes = layout.bytes.max(layout.tokens_at + 4);
        // SAFETY: the first `layout.bytes` bytes are written by the copy below before the kernel reads
        // them; the kernel reads no byte past them.
        let mut input = unsafe { stream.alloc::<u8>(device_bytes) }.map_err(cuda_err)?;
        let (dst, _record) = input.device_ptr_mut(stream);
        // SAFETY: `dst` has device_bytes >= layout.bytes bytes; the pinned source stays alive and untouched
        // until `copied` (recorded right after, on the same stream) has completed.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, &bytes[..], stream.cu_stream()) }
            .map_err(cuda_err)?;
        drop(_record);
        staging.copied.record(stream).map_err(cuda_err)?;
        Ok(input)
    }
}
