//! [`CudaCollator`]: the collation kernel on the caller's stream.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice,
    PushKernelArg, SyncOnDrop,
};

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

    /// The address a kernel writes through; the guard records the write on `stream` when dropped after
    /// the launch.
    fn addr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        match self {
            DeviceIds::I32(v) => v.device_ptr_mut(stream),
            DeviceIds::I64(v) => v.device_ptr_mut(stream),
        }
    }
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
    /// Two staging buffers used in turn, so that filling one never waits for the copy of the batch just
    /// submitted (only, rarely, for the one before it).
    staging: Mutex<([Option<Staging>; 2], usize)>,
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
            staging: Mutex::new(([None, None], 0)),
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

    /// The kernel alone, on a batch already on the device (one launch, no host synchronization).
    pub fn collate_uploaded(
        &self,
        batch: &DeviceRaggedBatch,
        spec: &CollateSpec,
    ) -> Result<DeviceBatch> {
        let plan = CollatePlan::for_validated(&batch.row_offsets, batch.max_token, spec)?;
        let stream = &self.stream;
        let n = plan.len();
        let alloc_bytes = |n: usize| alloc::<u8>(stream, n);
        let mut input_ids = DeviceIds::alloc(stream, spec.id_dtype, n)?;
        let mut labels = DeviceIds::alloc(stream, spec.id_dtype, n)?;
        let mut response_mask = alloc_bytes(n)?;
        let mut attention_mask = if spec.attention_mask {
            Some(alloc_bytes(n)?)
        } else {
            None
        };

        if n > 0 {
            let (inputs, read_guard) = batch.input_addrs(stream);
            let [tokens, row_offsets, prompt_lens, trainable] = inputs;
            let scalars = CollateScalars::of(&plan);
            let (input_ids_addr, g1) = input_ids.addr_mut(stream);
            let (labels_addr, g2) = labels.addr_mut(stream);
            let (mask_addr, g3) = response_mask.device_ptr_mut(stream);
            let (attention_addr, g4) = match &mut attention_mask {
                Some(m) => {
                    let (a, g) = m.device_ptr_mut(stream);
                    (a, Some(g))
                }
                None => (0, None),
            };
            let args = CollateArgs {
                tokens,
                row_offsets,
                prompt_lens,
                trainable,
                input_ids: input_ids_addr,
                labels: labels_addr,
                response_mask: mask_addr,
                attention_mask: attention_addr,
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
            // that batch, so every `tokens[start + pos]` the kernel reads (pos < len) is in bounds. The
            // outputs hold rows × width elements, and the kernel writes only positions below width of
            // rows below rows. `args` is the kernel's one parameter (abi.cuh).
            unsafe { launch.launch(launch_config(abi::collate_launch(&plan))) }
                .map_err(cuda_err)?;
            drop((read_guard, g1, g2, g3, g4));
        }
        Ok(DeviceBatch {
            input_ids,
            labels,
            response_mask,
            attention_mask,
            stats: plan.stats_from(
                &batch.row_offsets,
                &batch.prompt_lens,
                batch.trainable.as_deref(),
            ),
            stream: stream.clone(),
        })
    }

    /// The batch (padding-free) layout, every row a document: one copy, one launch, no host sync.
    /// Bit-identical to [`crate::backend::cpu::collate_pack`].
    pub fn collate_pack(&self, batch: &RaggedBatch, spec: &CollateSpec) -> Result<DevicePack> {
        // `upload` validates the batch once; the plan reuses what it found.
        let uploaded = self.upload(batch)?;
        let plan = CollatePlan::for_validated(batch.row_offsets(), uploaded.max_token, spec)?;
        let total = CollatePlan::pack_total(batch.tokens().len(), spec)?;
        let (host_cu_seqlens, max_seqlen) =
            CollatePlan::pack_boundaries(batch.row_offsets(), total);
        let stream = &self.stream;
        let ids = |n: usize| DeviceIds::alloc(stream, spec.id_dtype, n);
        // Every position and every cu_seqlens entry is written by the kernel below.
        let (mut input_ids, mut labels, mut position_ids) = (ids(total)?, ids(total)?, ids(total)?);
        let mut response_mask = alloc::<u8>(stream, total)?;
        let mut cu_seqlens = alloc::<i32>(stream, host_cu_seqlens.len())?;
        let (inputs, read_guard) = uploaded.input_addrs(stream);
        let [tokens, row_offsets, prompt_lens, trainable] = inputs;
        let scalars = CollateScalars::of(&plan);
        let (input_ids_addr, g1) = input_ids.addr_mut(stream);
        let (labels_addr, g2) = labels.addr_mut(stream);
        let (positions_addr, g3) = position_ids.addr_mut(stream);
        let (mask_addr, g4) = response_mask.device_ptr_mut(stream);
        let (cu_seqlens_addr, g5) = cu_seqlens.device_ptr_mut(stream);
        let args = CollatePackArgs {
            tokens,
            row_offsets,
            prompt_lens,
            trainable,
            input_ids: input_ids_addr,
            labels: labels_addr,
            response_mask: mask_addr,
            position_ids: positions_addr,
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
        // token read (t + 1 < end of its document) is in bounds; the outputs hold `total` positions,
        // cu_seqlens rows + 1 (+ 1 with a pad tail) entries, and the grid has at least rows + 2 threads.
        // `args` is the kernel's one parameter (abi.cuh).
        unsafe { launch.launch(launch_config(abi::collate_pack_launch(&plan, total))) }
            .map_err(cuda_err)?;
        drop((read_guard, g1, g2, g3, g4, g5));
        Ok(DevicePack {
            input_ids,
            labels,
            response_mask,
            position_ids,
            cu_seqlens,
            host_cu_seqlens,
            max_seqlen,
            stats: plan.pack_stats(batch, total),
            stream: stream.clone(),
        })
    }

    /// Copy the ragged batch to the device in one transfer through the next staging buffer.
    fn copy_to_device(&self, batch: &RaggedBatch, layout: &InputLayout) -> Result<CudaSlice<u8>> {
        let stream = &self.stream;
        let mut guard = self
            .staging
            .lock()
            .map_err(|_| Error::Cuda("staging lock poisoned".into()))?;
        let (buffers, next) = &mut *guard;
        let slot = &mut buffers[*next];
        *next = (*next + 1) % 2;
        if slot.as_ref().is_none_or(|s| s.buffer.len() < layout.bytes) {
            let capacity = layout.bytes.next_power_of_two().max(1 << 16);
            let ctx = stream.context();
            // SAFETY: the buffer's contents are written below before the copy reads them.
            let buffer = unsafe { ctx.alloc_pinned::<u8>(capacity) }.map_err(cuda_err)?;
            let copied = ctx.new_event(None).map_err(cuda_err)?;
            *slot = Some(Staging { buffer, copied });
        }
        let staging = slot.as_mut().expect("allocated above");
        // The copy that last read this buffer (two batches ago) must be done before it is overwritten.
        staging.copied.synchronize().map_err(cuda_err)?;
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
