//! [`CudaCollator`]: the collation kernel on the caller's stream.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtrMut, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};

use super::cuda_err;
use super::module::{self, ModuleOrigin};
use crate::batch::bools_from_bytes;
use crate::plan::CollatePlan;
use crate::{Batch, BatchStats, CollateSpec, Error, IdDtype, IdTensor, PackedBatch, Result};

/// `input_ids` or `labels` on the device, in the spec's dtype.
#[derive(Debug)]
pub enum DeviceIds {
    I32(CudaSlice<i32>),
    I64(CudaSlice<i64>),
}

/// The collated tensors on the device (row-major `rows × width`, on the collator's stream), and the
/// batch's statistics (computed on the host from the packed batch: reading them needs no sync).
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

/// The packed (padding-free) layout on the device (`[total]` positions each; see
/// [`crate::PackedLayout`]). `cu_seqlens` is on the device (written by the kernel) and its host copy and
/// `max_seqlen` are known without a synchronization.
#[derive(Debug)]
pub struct DevicePackedLayout {
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

impl DevicePackedLayout {
    /// Copy back as the [`crate::PackedLayout`] the CPU path makes (synchronizes the stream).
    pub fn to_host(&self) -> Result<crate::PackedLayout> {
        let s = &self.stream;
        let ids = |d: &DeviceIds| d.to_host(s);
        let cu_seqlens = s.clone_dtoh(&self.cu_seqlens).map_err(cuda_err)?;
        if cu_seqlens != self.host_cu_seqlens {
            return Err(Error::Cuda(format!(
                "the kernel wrote cu_seqlens {cu_seqlens:?}, the host computed {:?}",
                self.host_cu_seqlens
            )));
        }
        Ok(crate::PackedLayout {
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

    /// Push as a kernel argument the kernel writes.
    fn push_mut<'a>(&'a mut self, launch: &mut cudarc::driver::LaunchArgs<'a>) {
        match self {
            DeviceIds::I32(v) => launch.arg(v),
            DeviceIds::I64(v) => launch.arg(v),
        };
    }
}

/// The scalar parameters both collation kernels take after their inputs:
/// `rows, width|total, pad_id, ignore_index, use_ignore_index`.
struct ScalarArgs {
    rows: u64,
    extent: u64,
    pad_id: u32,
    ignore_index: i64,
    use_ignore_index: i32,
}

impl ScalarArgs {
    fn new(plan: &CollatePlan, extent: usize) -> Self {
        ScalarArgs {
            rows: plan.rows as u64,
            extent: extent as u64,
            pad_id: plan.pad_id,
            ignore_index: plan.ignore_index.unwrap_or(0),
            use_ignore_index: i32::from(plan.ignore_index.is_some()),
        }
    }

    fn push<'a>(&'a self, launch: &mut cudarc::driver::LaunchArgs<'a>) {
        launch
            .arg(&self.rows)
            .arg(&self.extent)
            .arg(&self.pad_id)
            .arg(&self.ignore_index)
            .arg(&self.use_ignore_index);
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

/// A pinned host buffer for the packed batch, and the event of the copy that last read it.
struct Staging {
    buffer: PinnedHostSlice<u8>,
    copied: CudaEvent,
}

/// The collation kernel, loaded on the caller's stream.
pub struct CudaCollator {
    stream: Arc<CudaStream>,
    collate_i32: CudaFunction,
    collate_i64: CudaFunction,
    collate_packed_i32: CudaFunction,
    collate_packed_i64: CudaFunction,
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
    fn of(packed: &PackedBatch) -> Self {
        let tokens_at = packed.row_offsets().len() * 8;
        let prompt_lens_at = tokens_at + packed.tokens().len() * 4;
        let end_of_prompt_lens = prompt_lens_at + packed.prompt_lens().len() * 4;
        let trainable_at = packed.trainable().map(|_| end_of_prompt_lens);
        InputLayout {
            tokens_at,
            prompt_lens_at,
            trainable_at,
            bytes: end_of_prompt_lens + packed.trainable().map_or(0, <[u8]>::len),
        }
    }
}

/// A packed batch already on the device (one buffer), with what the host needs to launch on it: its
/// offsets (for the shape and statistics) and its largest token (for the dtype check). Made by
/// [`CudaCollator::upload`] from a validated [`PackedBatch`], so its device copy is consistent.
pub struct DevicePackedBatch {
    input: CudaSlice<u8>,
    layout: InputLayout,
    row_offsets: Vec<u64>,
    prompt_lens: Vec<u32>,
    trainable: Option<Vec<u8>>,
    max_token: u32,
}

impl std::fmt::Debug for DevicePackedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePackedBatch")
            .field("rows", &self.prompt_lens.len())
            .field("tokens", &self.row_offsets.last())
            .finish()
    }
}

/// Typed views of an uploaded batch's arrays, as the kernels take them.
struct InputViews<'a> {
    tokens: cudarc::driver::CudaView<'a, u32>,
    row_offsets: cudarc::driver::CudaView<'a, u64>,
    prompt_lens: cudarc::driver::CudaView<'a, u32>,
    /// Per-token trainable flags (multi-segment rows).
    trainable: Option<cudarc::driver::CudaView<'a, u8>>,
}

impl<'a> InputViews<'a> {
    /// Push `tokens, row_offsets, prompt_lens, trainable` (the kernels' first four parameters).
    fn push(&'a self, launch: &mut cudarc::driver::LaunchArgs<'a>, null: &'a u64) {
        launch
            .arg(&self.tokens)
            .arg(&self.row_offsets)
            .arg(&self.prompt_lens);
        match &self.trainable {
            Some(flags) => launch.arg(flags),
            None => launch.arg(null),
        };
    }
}

fn launch_config((grid, block): ([u32; 3], [u32; 3])) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid[0], grid[1], grid[2]),
        block_dim: (block[0], block[1], block[2]),
        shared_mem_bytes: 0,
    }
}

impl DevicePackedBatch {
    fn views(&self) -> InputViews<'_> {
        let layout = &self.layout;
        let tokens_len = (layout.prompt_lens_at - layout.tokens_at) / 4;
        // SAFETY: the buffer holds the layout's bytes, each array at an offset aligned for its element
        // type (row offsets at 0, the u32 arrays at multiples of 4), written by the host as exactly these
        // types; `transmute` checks each length against the bytes (a batch without tokens still has
        // room for one).
        unsafe {
            InputViews {
                row_offsets: self
                    .input
                    .slice(..layout.tokens_at)
                    .transmute::<u64>(self.row_offsets.len())
                    .expect("layout within the buffer"),
                tokens: self
                    .input
                    .slice(layout.tokens_at..)
                    .transmute::<u32>(tokens_len.max(1))
                    .expect("layout within the buffer"),
                prompt_lens: self
                    .input
                    .slice(layout.prompt_lens_at..)
                    .transmute::<u32>(self.prompt_lens.len())
                    .expect("layout within the buffer"),
                trainable: layout.trainable_at.map(|at| self.input.slice(at..)),
            }
        }
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
            collate_packed_i32: load("collate_packed_i32")?,
            collate_packed_i64: load("collate_packed_i64")?,
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

    /// Collate on the device: validate on the host, one copy of the packed batch through pinned memory,
    /// one kernel launch, no host synchronization. Bit-identical to [`crate::cpu::collate()`].
    pub fn collate(&self, packed: &PackedBatch, spec: &CollateSpec) -> Result<DeviceBatch> {
        let device_packed = self.upload(packed)?;
        self.collate_uploaded(&device_packed, spec)
    }

    /// Validate `packed` and copy it to the device (one transfer through a pinned staging buffer).
    pub fn upload(&self, packed: &PackedBatch) -> Result<DevicePackedBatch> {
        packed.validate()?;
        let layout = InputLayout::of(packed);
        let input = self.copy_to_device(packed, &layout)?;
        Ok(DevicePackedBatch {
            input,
            layout,
            row_offsets: packed.row_offsets().to_vec(),
            prompt_lens: packed.prompt_lens().to_vec(),
            trainable: packed.trainable().map(<[u8]>::to_vec),
            max_token: packed.tokens().iter().copied().max().unwrap_or(0),
        })
    }

    /// The kernel alone, on a batch already on the device (one launch, no host synchronization).
    pub fn collate_uploaded(
        &self,
        packed: &DevicePackedBatch,
        spec: &CollateSpec,
    ) -> Result<DeviceBatch> {
        let plan = CollatePlan::for_validated(&packed.row_offsets, packed.max_token, spec)?;
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
            let views = packed.views();
            let cfg = launch_config(plan.launch_shape());
            let scalars = ScalarArgs::new(&plan, plan.width);
            let null_mask: u64 = 0;
            let function = match spec.id_dtype {
                IdDtype::I32 => &self.collate_i32,
                IdDtype::I64 => &self.collate_i64,
            };
            let mut launch = stream.launch_builder(function);
            views.push(&mut launch, &null_mask);
            scalars.push(&mut launch);
            input_ids.push_mut(&mut launch);
            labels.push_mut(&mut launch);
            launch.arg(&mut response_mask);
            match &mut attention_mask {
                Some(m) => launch.arg(m),
                None => launch.arg(&null_mask),
            };
            // SAFETY: `upload` validated the packed batch on the host (offsets start at 0, never decrease
            // and end at the token count; every prompt fits its row) and the device copy is byte for byte
            // that batch, so every `tokens[start + pos]` the kernel reads (pos < len) is in
            // bounds. The outputs hold rows × width elements, the kernel writes only positions below
            // width of rows below rows, and the argument list matches COLLATE_PARAMS in collate.cu.
            unsafe { launch.launch(cfg) }.map_err(cuda_err)?;
        }
        Ok(DeviceBatch {
            input_ids,
            labels,
            response_mask,
            attention_mask,
            stats: plan.stats_from(
                &packed.row_offsets,
                &packed.prompt_lens,
                packed.trainable.as_deref(),
            ),
            stream: stream.clone(),
        })
    }

    /// The packed (padding-free) layout, every row a document: one copy, one launch, no host sync.
    /// Bit-identical to [`crate::cpu::collate_packed`].
    pub fn collate_packed(
        &self,
        packed: &PackedBatch,
        spec: &CollateSpec,
    ) -> Result<DevicePackedLayout> {
        // `upload` validates the batch once; the plan reuses what it found.
        let device_packed = self.upload(packed)?;
        let plan = CollatePlan::for_validated(packed.row_offsets(), device_packed.max_token, spec)?;
        let total = CollatePlan::packed_total(packed.tokens().len(), spec)?;
        let (host_cu_seqlens, max_seqlen) =
            CollatePlan::packed_boundaries(packed.row_offsets(), total);
        let stream = &self.stream;
        let ids = |n: usize| DeviceIds::alloc(stream, spec.id_dtype, n);
        // Every position and every cu_seqlens entry is written by the kernel below.
        let (mut input_ids, mut labels, mut position_ids) = (ids(total)?, ids(total)?, ids(total)?);
        let mut response_mask = alloc::<u8>(stream, total)?;
        let mut cu_seqlens = alloc::<i32>(stream, host_cu_seqlens.len())?;
        let views = device_packed.views();
        let null_trainable: u64 = 0;
        let cfg = launch_config(plan.packed_launch_shape(total));
        let scalars = ScalarArgs::new(&plan, total);
        let function = match spec.id_dtype {
            IdDtype::I32 => &self.collate_packed_i32,
            IdDtype::I64 => &self.collate_packed_i64,
        };
        let mut launch = stream.launch_builder(function);
        views.push(&mut launch, &null_trainable);
        scalars.push(&mut launch);
        input_ids.push_mut(&mut launch);
        labels.push_mut(&mut launch);
        launch.arg(&mut response_mask);
        position_ids.push_mut(&mut launch);
        launch.arg(&mut cu_seqlens);
        // SAFETY: `upload` validated the batch on the host and the device copy is that batch,
        // so every token read (t + 1 < end of its document) is in bounds; the outputs hold `total`
        // positions, cu_seqlens rows + 1 (+ 1 with a pad tail) entries, and the grid has at least
        // rows + 2 threads. The argument list matches COLLATE_PACKED_PARAMS in collate.cu.
        unsafe { launch.launch(cfg) }.map_err(cuda_err)?;
        Ok(DevicePackedLayout {
            input_ids,
            labels,
            response_mask,
            position_ids,
            cu_seqlens,
            host_cu_seqlens,
            max_seqlen,
            stats: plan.packed_stats(packed, total),
            stream: stream.clone(),
        })
    }

    /// Copy the packed batch to the device in one transfer through the next staging buffer.
    fn copy_to_device(&self, packed: &PackedBatch, layout: &InputLayout) -> Result<CudaSlice<u8>> {
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
        bytes[..layout.tokens_at].copy_from_slice(bytemuck::cast_slice(packed.row_offsets()));
        bytes[layout.tokens_at..layout.prompt_lens_at]
            .copy_from_slice(bytemuck::cast_slice(packed.tokens()));
        let prompt_lens_end = layout.prompt_lens_at + packed.prompt_lens().len() * 4;
        bytes[layout.prompt_lens_at..prompt_lens_end]
            .copy_from_slice(bytemuck::cast_slice(packed.prompt_lens()));
        if let (Some(at), Some(flags)) = (layout.trainable_at, packed.trainable()) {
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
