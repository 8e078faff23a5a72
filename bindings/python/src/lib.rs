//! `sft_collate._native`: the library's operations for the Python package, mapped argument for argument.
//! Tensors cross as raw addresses (a tensor's `data_ptr()`), lengths and dtypes: the Python layer
//! (`python/sft_collate/`) allocates every output with torch or numpy, checks devices, dtypes, shapes
//! and contiguity, and keeps the tensors alive for the call; this layer wraps the addresses
//! (`ForeignSlice` on the GPU, slices on the host) and calls the library. On a GPU everything runs on the
//! stream Python names (torch's current stream), and nothing synchronizes the host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};
use sft_collate::backend::cpu;
use sft_collate::backend::cuda::{
    self, BatchBuffers, CeBuffers, CeGrad, CeLogits, CudaCollator, CudaStream, DeviceCeTargets,
    DeviceIdsMut, DeviceLabels, DeviceRead, DeviceWrite, ForeignSlice, LinearCeDeviceGrads,
    LinearCeDeviceInput, LinearCrossEntropy, MaskedCrossEntropy, PackBuffers,
};
use sft_collate::collate::CollatePlan;
use sft_collate::input::MessageFormat;
use sft_collate::loss::linear::{LinearCeConfig, LinearCeGrads, LinearCeInput};
use sft_collate::loss::{CeInput, CeOptions, Labels, LogitElem, LogitsShape, Normalization};
use sft_collate::schedule::{bucket_order as bucket, plan_packs, Overflow, PackSpec, PackStrategy};
use sft_collate::{
    BatchStats, CollateSpec, EngineChoice, IdDtype, LabelFormat, LengthLimit, RaggedBatch,
    Truncation,
};

/// A library error as a Python exception: bad input is a `ValueError`, the rest a `RuntimeError`.
fn py_err(e: sft_collate::Error) -> PyErr {
    use sft_collate::Error as E;
    let message = e.to_string();
    use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError};
    use std::io::ErrorKind;
    match e.innermost() {
        // A file's problem as Python's own OSError subclasses, so `except FileNotFoundError` works.
        E::Io { source, .. } => match source.kind() {
            ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
            ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
            _ => PyOSError::new_err(message),
        },
        E::Cuda(_) | E::NoDevice(_) | E::KernelCompile { .. } => PyRuntimeError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

fn parse<T: std::str::FromStr<Err = sft_collate::Error>>(value: &str) -> PyResult<T> {
    value.parse().map_err(py_err)
}

/// A tokenizer: a `tokenizer.json` path, a built-in name, or a `tokenizer.json` text.
#[pyclass(frozen, module = "sft_collate._native")]
struct Tokenizer {
    inner: sft_collate::Tokenizer,
}

#[pymethods]
impl Tokenizer {
    #[new]
    #[pyo3(signature = (source, engine = "auto"))]
    fn new(py: Python<'_>, source: &str, engine: &str) -> PyResult<Self> {
        let engine: EngineChoice = parse(engine)?;
        let inner = py
            .detach(|| sft_collate::Tokenizer::load_with(source, engine))
            .map_err(py_err)?;
        Ok(Tokenizer { inner })
    }

    /// From a `tokenizer.json` text (what `tokenizers.Tokenizer.to_str()` gives).
    #[staticmethod]
    #[pyo3(signature = (json, name, engine = "auto"))]
    fn from_json(py: Python<'_>, json: &str, name: &str, engine: &str) -> PyResult<Self> {
        let engine: EngineChoice = parse(engine)?;
        let inner = py
            .detach(|| sft_collate::Tokenizer::from_json_str(json, name, engine))
            .map_err(py_err)?;
        Ok(Tokenizer { inner })
    }

    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_string()
    }

    #[getter]
    fn engine(&self) -> String {
        self.inner.engine().to_string()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// What loading a `tokenizer.json` on the fast engine did with the load cache (`SFT_COLLATE_CACHE`;
    /// `None` for built-ins and files `tokenizers` runs).
    #[getter]
    fn load_cache(&self) -> Option<String> {
        self.inner.cache_use().map(|c| c.to_string())
    }

    #[getter]
    fn pad_id(&self) -> Option<u32> {
        self.inner.pad_id()
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// This tokenizer as a `tokenizer.json` text (`tokenizers.Tokenizer.from_str` reads it); for a
    /// built-in, the `tokenizers` form of its tiktoken ranks.
    fn to_json(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.inner.to_json()).map_err(py_err)
    }

    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.detach(|| self.inner.encode(text)).map_err(py_err)
    }

    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        py.detach(|| {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            self.inner.encode_batch(&refs)
        })
        .map_err(py_err)
    }

    /// `encode_batch` into one buffer: `(ids, offsets)`, numpy `uint32` and `int64` arrays; text `i`'s
    /// ids are `ids[offsets[i]:offsets[i + 1]]` (the library's `Encodings`: no list per text).
    fn encode_batch_flat<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let flat = py
            .detach(|| {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                self.inner.encode_batch_flat(&refs)
            })
            .map_err(py_err)?;
        let numpy = py.import("numpy")?;
        // A bytearray, so that the array numpy makes over it is writable.
        let array = |bytes: Bound<'py, PyByteArray>, dtype: &str| {
            numpy.call_method1("frombuffer", (bytes, dtype))
        };
        let ids = PyByteArray::new_with(py, flat.ids().len() * 4, |out| {
            for (o, id) in out.chunks_exact_mut(4).zip(flat.ids()) {
                o.copy_from_slice(&id.to_le_bytes());
            }
            Ok(())
        })?;
        let offsets = PyByteArray::new_with(py, flat.offsets().len() * 8, |out| {
            for (o, &at) in out.chunks_exact_mut(8).zip(flat.offsets()) {
                o.copy_from_slice(&(at as i64).to_le_bytes());
            }
            Ok(())
        })?;
        Ok((array(ids, "<u4")?, array(offsets, "<i8")?))
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer({:?}, engine={:?})",
            self.inner.name(),
            self.inner.engine().to_string()
        )
    }
}

/// The collation options, as Python names them.
#[derive(Clone)]
struct Spec(CollateSpec);

fn spec(
    pad_id: u32,
    pad_to_multiple_of: Option<usize>,
    ignore_index: Option<i64>,
    id_dtype: &str,
    attention_mask: bool,
) -> PyResult<Spec> {
    let spec = CollateSpec {
        pad_id: Some(pad_id),
        pad_to_multiple_of,
        label_format: match ignore_index {
            Some(v) => LabelFormat::IgnoreIndex(v),
            None => LabelFormat::Pad,
        },
        id_dtype: parse(id_dtype)?,
        attention_mask,
        ..Default::default()
    };
    spec.validate().map_err(py_err)?;
    Ok(Spec(spec))
}

/// A tokenized batch (tokens row after row), ready to collate on any device.
#[pyclass(frozen, module = "sft_collate._native")]
struct Ragged {
    inner: RaggedBatch,
}

fn limit(max_len: Option<usize>, truncation: &str) -> PyResult<LengthLimit> {
    let limit = LengthLimit {
        max_len,
        truncation: parse::<Truncation>(truncation)?,
    };
    limit.validate().map_err(py_err)?;
    Ok(limit)
}

/// Prompts and outputs, tokenized separately (no special tokens), cut to `max_len` by `truncation`.
#[pyfunction]
#[pyo3(signature = (tokenizer, prompts, outputs, max_len = None, truncation = "error"))]
fn tokenize_pairs(
    py: Python<'_>,
    tokenizer: &Tokenizer,
    prompts: Vec<String>,
    outputs: Vec<String>,
    max_len: Option<usize>,
    truncation: &str,
) -> PyResult<Ragged> {
    let limit = limit(max_len, truncation)?;
    let inner = py
        .detach(|| sft_collate::tokenize_pairs(&prompts, &outputs, &tokenizer.inner, limit))
        .map_err(py_err)?;
    Ok(Ragged { inner })
}

/// Rows of (text, trained) segments, each tokenized separately.
#[pyfunction]
#[pyo3(signature = (tokenizer, rows, max_len = None, truncation = "error"))]
fn tokenize_rows(
    py: Python<'_>,
    tokenizer: &Tokenizer,
    rows: Vec<Vec<(String, bool)>>,
    max_len: Option<usize>,
    truncation: &str,
) -> PyResult<Ragged> {
    let limit = limit(max_len, truncation)?;
    let inner = py
        .detach(|| sft_collate::tokenize_rows(&rows, &tokenizer.inner, limit))
        .map_err(py_err)?;
    Ok(Ragged { inner })
}

/// The message format of the Python arguments (written once for every call that reads conversations).
fn message_format(
    template: Option<&str>,
    train_roles: Vec<String>,
    key: &str,
    role_key: &str,
    content_key: &str,
    role_names: Vec<(String, String)>,
) -> PyResult<MessageFormat> {
    let mut format = MessageFormat::new(template, train_roles).map_err(py_err)?;
    format.key = key.to_string();
    format.role_key = role_key.to_string();
    format.content_key = content_key.to_string();
    format.role_names = role_names;
    Ok(format)
}

/// Conversations (each a JSON list of messages, by default `{"role", "content"}`) as segments, rendered
/// by a message template (`{role}`, `{content}`; what precedes `{content}` is never trained) with
/// `train_roles` trained.
#[pyfunction]
#[pyo3(signature = (conversations, template = None, train_roles = vec!["assistant".to_string()], role_key = "role", content_key = "content", role_names = Vec::new()))]
fn conversation_segments(
    conversations: Vec<String>,
    template: Option<&str>,
    train_roles: Vec<String>,
    role_key: &str,
    content_key: &str,
    role_names: Vec<(String, String)>,
) -> PyResult<Vec<Vec<(String, bool)>>> {
    let format = message_format(
        template,
        train_roles,
        "messages",
        role_key,
        content_key,
        role_names,
    )?;
    conversations
        .iter()
        .enumerate()
        .map(|(i, json)| {
            let value: serde_json::Value = serde_json::from_str(json)
                .map_err(|e| PyValueError::new_err(format!("conversation {i}: {e}")))?;
            let serde_json::Value::Array(messages) = value else {
                return Err(PyValueError::new_err(format!(
                    "conversation {i}: not a list of messages"
                )));
            };
            format
                .segments(&messages)
                .map_err(|e| PyValueError::new_err(format!("conversation {i}: {e}")))
        })
        .collect()
}

fn stats_dict<'py>(py: Python<'py>, stats: &BatchStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("rows", stats.rows)?;
    d.set_item("width", stats.width)?;
    d.set_item("tokens", stats.tokens)?;
    d.set_item("response_tokens", stats.response_tokens)?;
    d.set_item("padding_fraction", stats.padding_fraction)?;
    d.set_item("empty_response_rows", stats.empty_response_rows.clone())?;
    Ok(d)
}

/// The collators and loss kernels per (device, stream): loaded once per context, reused every call.
struct Loaded {
    stream: Arc<CudaStream>,
    collator: OnceLock<Arc<CudaCollator>>,
    cross_entropy: OnceLock<Arc<MaskedCrossEntropy>>,
    linear: OnceLock<Arc<LinearCrossEntropy>>,
}

/// [`Loaded`] per (device, stream handle).
type LoadedCache = Mutex<HashMap<(usize, u64), Arc<Loaded>>>;

fn loaded(device_index: usize, stream: u64) -> PyResult<Arc<Loaded>> {
    static CACHE: OnceLock<LoadedCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().expect("no panics while held");
    if let Some(found) = cache.get(&(device_index, stream)) {
        return Ok(found.clone());
    }
    // SAFETY: the Python layer passes torch's stream of this device (its `cuda_stream`), which torch keeps
    // alive as long as the process uses it.
    let borrowed = unsafe { cuda::borrowed_stream(device_index, stream) }.map_err(py_err)?;
    let entry = Arc::new(Loaded {
        stream: borrowed,
        collator: OnceLock::new(),
        cross_entropy: OnceLock::new(),
        linear: OnceLock::new(),
    });
    cache.insert((device_index, stream), entry.clone());
    Ok(entry)
}

impl Loaded {
    fn collator(&self) -> PyResult<Arc<CudaCollator>> {
        if let Some(c) = self.collator.get() {
            return Ok(c.clone());
        }
        let c = Arc::new(CudaCollator::new(self.stream.clone()).map_err(py_err)?);
        Ok(self.collator.get_or_init(|| c).clone())
    }

    fn cross_entropy(&self) -> PyResult<Arc<MaskedCrossEntropy>> {
        if let Some(c) = self.cross_entropy.get() {
            return Ok(c.clone());
        }
        let c = Arc::new(MaskedCrossEntropy::new(self.stream.clone()).map_err(py_err)?);
        Ok(self.cross_entropy.get_or_init(|| c).clone())
    }

    fn linear(&self) -> PyResult<Arc<LinearCrossEntropy>> {
        if let Some(c) = self.linear.get() {
            return Ok(c.clone());
        }
        let c = Arc::new(LinearCrossEntropy::new(self.stream.clone()).map_err(py_err)?);
        Ok(self.linear.get_or_init(|| c).clone())
    }

    /// `len` elements at `ptr` on this device.
    ///
    /// # Safety
    /// As [`ForeignSlice::new`]: the Python layer passes a live, contiguous tensor of that length.
    unsafe fn foreign<T>(&self, ptr: u64, len: usize) -> ForeignSlice<T> {
        unsafe { ForeignSlice::new(self.stream.clone(), ptr, len) }
    }
}

enum Ids<T32, T64> {
    I32(T32),
    I64(T64),
}

/// Foreign id buffers of the spec's dtype.
///
/// # Safety
/// As [`Loaded::foreign`].
unsafe fn foreign_ids(
    loaded: &Loaded,
    dtype: IdDtype,
    ptr: u64,
    len: usize,
) -> Ids<ForeignSlice<i32>, ForeignSlice<i64>> {
    unsafe {
        match dtype {
            IdDtype::I32 => Ids::I32(loaded.foreign(ptr, len)),
            IdDtype::I64 => Ids::I64(loaded.foreign(ptr, len)),
        }
    }
}

fn ids_mut(ids: &mut Ids<ForeignSlice<i32>, ForeignSlice<i64>>) -> DeviceIdsMut<'_> {
    match ids {
        Ids::I32(b) => DeviceIdsMut::I32(b),
        Ids::I64(b) => DeviceIdsMut::I64(b),
    }
}

/// Host memory at `ptr`, `len` elements of `T`.
///
/// # Safety
/// The Python layer passes a live, contiguous, writable CPU tensor of that length and type.
unsafe fn host_mut<'a, T>(ptr: u64, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) }
}

/// # Safety
/// As [`host_mut`], read only.
unsafe fn host<'a, T>(ptr: u64, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(ptr as *const T, len) }
}

fn write_ids(dst_ptr: u64, ids: &sft_collate::IdTensor) {
    match ids {
        // SAFETY: the Python layer allocated `ids.len()` elements of the spec's dtype at `dst_ptr`.
        sft_collate::IdTensor::I32(v) => {
            unsafe { host_mut::<i32>(dst_ptr, v.len()) }.copy_from_slice(v)
        }
        sft_collate::IdTensor::I64(v) => {
            unsafe { host_mut::<i64>(dst_ptr, v.len()) }.copy_from_slice(v)
        }
    }
}

fn write_bools(dst_ptr: u64, values: &[bool]) {
    // SAFETY: the Python layer allocated `values.len()` bools (one byte each) at `dst_ptr`.
    let dst = unsafe { host_mut::<u8>(dst_ptr, values.len()) };
    for (d, &v) in dst.iter_mut().zip(values) {
        *d = u8::from(v);
    }
}

#[pymethods]
impl Ragged {
    #[getter]
    fn rows(&self) -> usize {
        self.inner.rows()
    }

    #[getter]
    fn tokens(&self) -> usize {
        self.inner.tokens().len()
    }

    fn row_lens(&self) -> Vec<usize> {
        (0..self.inner.rows())
            .map(|i| self.inner.row_len(i))
            .collect()
    }

    /// The tokens of row `i` and which of them are trained.
    fn row(&self, i: usize) -> PyResult<(Vec<u32>, Vec<bool>)> {
        if i >= self.inner.rows() {
            return Err(PyValueError::new_err(format!(
                "row {i} of {}",
                self.inner.rows()
            )));
        }
        let trained = (0..self.inner.row_len(i))
            .map(|k| self.inner.is_trainable(i, k))
            .collect();
        Ok((self.inner.row(i).to_vec(), trained))
    }

    /// A batch of the given rows, in that order.
    fn select(&self, rows: Vec<usize>) -> PyResult<Ragged> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.inner.rows()) {
            return Err(PyValueError::new_err(format!(
                "row {bad} of {}",
                self.inner.rows()
            )));
        }
        Ok(Ragged {
            inner: self.inner.select(&rows),
        })
    }

    /// `(rows, width)` of the padded tensors.
    #[pyo3(signature = (pad_id, pad_to_multiple_of = None, ignore_index = None, id_dtype = "i64", attention_mask = false))]
    fn padded_shape(
        &self,
        pad_id: u32,
        pad_to_multiple_of: Option<usize>,
        ignore_index: Option<i64>,
        id_dtype: &str,
        attention_mask: bool,
    ) -> PyResult<(usize, usize)> {
        let spec = spec(
            pad_id,
            pad_to_multiple_of,
            ignore_index,
            id_dtype,
            attention_mask,
        )?;
        let plan = CollatePlan::new(&self.inner, &spec.0).map_err(py_err)?;
        Ok((plan.rows, plan.width))
    }

    /// `(positions, cu_seqlens entries)` of the padding-free layout.
    #[pyo3(signature = (pad_to_multiple_of = None))]
    fn pack_shape(&self, pad_to_multiple_of: Option<usize>) -> PyResult<(usize, usize)> {
        let spec = CollateSpec {
            pad_to_multiple_of,
            ..Default::default()
        };
        let total = CollatePlan::pack_total(self.inner.tokens().len(), &spec).map_err(py_err)?;
        Ok((
            total,
            CollatePlan::pack_boundaries(self.inner.row_offsets(), total)
                .0
                .len(),
        ))
    }

    /// Collate into the given tensors (`rows × width` each, of the spec's id dtype; masks one byte per
    /// element; `attention_mask` 0 for none), on the CPU or on CUDA device `device_index` on `stream`.
    /// Returns the batch's statistics.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (device, device_index, stream, pad_id, pad_to_multiple_of, ignore_index, id_dtype, attention_mask, input_ids, labels, response_mask, attention_mask_ptr))]
    fn collate<'py>(
        &self,
        py: Python<'py>,
        device: &str,
        device_index: usize,
        stream: u64,
        pad_id: u32,
        pad_to_multiple_of: Option<usize>,
        ignore_index: Option<i64>,
        id_dtype: &str,
        attention_mask: bool,
        input_ids: u64,
        labels: u64,
        response_mask: u64,
        attention_mask_ptr: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let Spec(spec) = spec(
            pad_id,
            pad_to_multiple_of,
            ignore_index,
            id_dtype,
            attention_mask,
        )?;
        let stats = match device {
            "cpu" => {
                let batch = py
                    .detach(|| cpu::collate(&self.inner, &spec))
                    .map_err(py_err)?;
                write_ids(input_ids, &batch.input_ids);
                write_ids(labels, &batch.labels);
                write_bools(response_mask, &batch.response_mask);
                if let Some(mask) = &batch.attention_mask {
                    write_bools(attention_mask_ptr, mask);
                }
                batch.stats
            }
            "cuda" => {
                let loaded = loaded(device_index, stream)?;
                let plan = CollatePlan::new(&self.inner, &spec).map_err(py_err)?;
                let n = plan.len();
                // SAFETY: the Python layer allocated each tensor with rows × width elements of the
                // spec's dtype (bytes for the masks) on this device, contiguous, alive for the call.
                let (mut ids, mut lab, mut mask, mut att) = unsafe {
                    (
                        foreign_ids(&loaded, spec.id_dtype, input_ids, n),
                        foreign_ids(&loaded, spec.id_dtype, labels, n),
                        loaded.foreign::<u8>(response_mask, n),
                        loaded.foreign::<u8>(attention_mask_ptr, n),
                    )
                };
                let mut buffers = BatchBuffers {
                    input_ids: ids_mut(&mut ids),
                    labels: ids_mut(&mut lab),
                    response_mask: &mut mask,
                    attention_mask: spec
                        .attention_mask
                        .then_some(&mut att as &mut dyn DeviceWrite<u8>),
                };
                loaded
                    .collator()?
                    .collate_into(&self.inner, &spec, &mut buffers)
                    .map_err(py_err)?
            }
            other => {
                return Err(PyValueError::new_err(format!(
                    "device {other:?}: cpu or cuda"
                )))
            }
        };
        stats_dict(py, &stats)
    }

    /// The padding-free layout into the given tensors (`positions` each, `cu_seqlens` entries, from
    /// `pack_shape`). Returns `(max_seqlen, cu_seqlens as a list, statistics)`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (device, device_index, stream, pad_id, pad_to_multiple_of, ignore_index, id_dtype, input_ids, labels, response_mask, position_ids, cu_seqlens))]
    fn collate_pack<'py>(
        &self,
        py: Python<'py>,
        device: &str,
        device_index: usize,
        stream: u64,
        pad_id: u32,
        pad_to_multiple_of: Option<usize>,
        ignore_index: Option<i64>,
        id_dtype: &str,
        input_ids: u64,
        labels: u64,
        response_mask: u64,
        position_ids: u64,
        cu_seqlens: u64,
    ) -> PyResult<(usize, Vec<i32>, Bound<'py, PyDict>)> {
        let Spec(spec) = spec(pad_id, pad_to_multiple_of, ignore_index, id_dtype, false)?;
        match device {
            "cpu" => {
                let pack = py
                    .detach(|| cpu::collate_pack(&self.inner, &spec))
                    .map_err(py_err)?;
                write_ids(input_ids, &pack.input_ids);
                write_ids(labels, &pack.labels);
                write_ids(position_ids, &pack.position_ids);
                write_bools(response_mask, &pack.response_mask);
                // SAFETY: `pack_shape` told the Python layer how many entries to allocate.
                unsafe { host_mut::<i32>(cu_seqlens, pack.cu_seqlens.len()) }
                    .copy_from_slice(&pack.cu_seqlens);
                let stats = stats_dict(py, &pack.stats)?;
                Ok((pack.max_seqlen, pack.cu_seqlens, stats))
            }
            "cuda" => {
                let loaded = loaded(device_index, stream)?;
                let (total, entries) = self.pack_shape(spec.pad_to_multiple_of)?;
                // SAFETY: allocated by the Python layer from `pack_shape`, on this device.
                let (mut ids, mut lab, mut pos, mut mask, mut cu) = unsafe {
                    (
                        foreign_ids(&loaded, spec.id_dtype, input_ids, total),
                        foreign_ids(&loaded, spec.id_dtype, labels, total),
                        foreign_ids(&loaded, spec.id_dtype, position_ids, total),
                        loaded.foreign::<u8>(response_mask, total),
                        loaded.foreign::<i32>(cu_seqlens, entries),
                    )
                };
                let layout = loaded
                    .collator()?
                    .collate_pack_into(
                        &self.inner,
                        &spec,
                        &mut PackBuffers {
                            input_ids: ids_mut(&mut ids),
                            labels: ids_mut(&mut lab),
                            response_mask: &mut mask,
                            position_ids: ids_mut(&mut pos),
                            cu_seqlens: &mut cu,
                        },
                    )
                    .map_err(py_err)?;
                let stats = stats_dict(py, &layout.stats)?;
                Ok((layout.max_seqlen, layout.cu_seqlens, stats))
            }
            other => Err(PyValueError::new_err(format!(
                "device {other:?}: cpu or cuda"
            ))),
        }
    }
}

/// Documents for packing: each row after the pack's overflow policy, with the row each came from.
#[pyfunction]
#[pyo3(signature = (ragged, max_tokens, overflow = "error", truncation = "error"))]
fn pack_documents(
    ragged: &Ragged,
    max_tokens: usize,
    overflow: &str,
    truncation: &str,
) -> PyResult<(Ragged, Vec<usize>)> {
    let pack = PackSpec {
        overflow: parse::<Overflow>(overflow)?,
        ..PackSpec::new(max_tokens)
    };
    let truncation: Truncation = parse(truncation)?;
    let mut documents = RaggedBatch::new();
    let mut source = Vec::new();
    for i in 0..ragged.inner.rows() {
        for segments in pack.fit_row(&ragged.inner, i, truncation).map_err(py_err)? {
            let refs: Vec<(&[u32], bool)> =
                segments.iter().map(|(t, f)| (t.as_slice(), *f)).collect();
            documents.push_segments(&refs);
            source.push(i);
        }
    }
    Ok((Ragged { inner: documents }, source))
}

/// Packs of documents of these lengths, at most `max_tokens` each (document indices, input order).
#[pyfunction]
#[pyo3(signature = (lens, max_tokens, strategy = "exact-fill"))]
fn pack_plan(lens: Vec<usize>, max_tokens: usize, strategy: &str) -> PyResult<Vec<Vec<usize>>> {
    let spec = PackSpec {
        strategy: parse::<PackStrategy>(strategy)?,
        ..PackSpec::new(max_tokens)
    };
    plan_packs(&lens, &spec).map_err(py_err)
}

/// Length bucketing: a seeded shuffle, then each window sorted by length.
#[pyfunction]
fn bucket_order(lens: Vec<usize>, window: usize, seed: u64) -> Vec<usize> {
    bucket(&lens, window, seed)
}

/// The masked cross-entropy of `logits` (`rows` rows `row_stride` apart, `vocab` used; dtype `f32`, `f16`,
/// `bf16` or, on the CPU, `f64`), all tensors given by address, with the options of
/// [`sft_collate::loss::CeOptions`] (`softcap` 0: none). Outputs: `row_loss`, `row_z` (rows, needed on
/// the GPU with a z-loss), optional `log_probs`, `entropy`, `lse` (0 for none; f32, or f64 for f64 logits
/// on the CPU), `argmax` (i32, 0 for none), `scalars` (sum, loss, z_sum), `count` (trained, correct,
/// documents: i32 on the CPU, u32 on the GPU), `error_flag` (GPU), and the gradient (`grad`, rows
/// `grad_stride` apart, 0 for none; `grad == logits` for in place). On the CPU a bad label is a
/// `ValueError`; on the GPU it sets the flag and makes its row NaN, and nothing waits.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, device_index, stream, dtype, rows, vocab, row_stride, logits, labels, labels_i64, mask, weights, normalization, normalize_constant, batch_size, gradient_accumulation_steps, upstream, upstream_ptr, z_loss, label_smoothing, softcap, row_loss, row_z, log_probs, entropy, lse, argmax, scalars, count, error_flag, grad, grad_stride))]
fn masked_cross_entropy(
    py: Python<'_>,
    device: &str,
    device_index: usize,
    stream: u64,
    dtype: &str,
    rows: usize,
    vocab: usize,
    row_stride: usize,
    logits: u64,
    labels: u64,
    labels_i64: bool,
    mask: u64,
    weights: u64,
    normalization: &str,
    normalize_constant: f64,
    batch_size: usize,
    gradient_accumulation_steps: usize,
    upstream: f32,
    upstream_ptr: u64,
    z_loss: f32,
    label_smoothing: f32,
    softcap: f32,
    row_loss: u64,
    row_z: u64,
    log_probs: u64,
    entropy: u64,
    lse: u64,
    argmax: u64,
    scalars: u64,
    count: u64,
    error_flag: u64,
    grad: u64,
    grad_stride: usize,
) -> PyResult<()> {
    let options = ce_options(
        normalization,
        (normalize_constant, batch_size, gradient_accumulation_steps),
        upstream,
        (z_loss, label_smoothing, softcap),
    )?;
    let shape = LogitsShape {
        rows,
        vocab,
        row_stride,
    };
    let logits_len = match rows {
        0 => 0,
        r => (r - 1) * row_stride + vocab,
    };
    let outputs = Outputs {
        row_loss,
        row_z,
        log_probs,
        entropy,
        lse,
        argmax,
        scalars,
        count,
        error_flag,
        grad,
        grad_stride,
    };
    let host = Host {
        shape,
        logits_len,
        labels,
        labels_i64,
        mask,
        weights,
        upstream_ptr,
    };
    match (device, dtype) {
        ("cpu", "f64") => py.detach(|| host.cross_entropy::<f64>(logits, &options, &outputs)),
        ("cpu", "f32") => py.detach(|| host.cross_entropy::<f32>(logits, &options, &outputs)),
        ("cpu", "f16") => py.detach(|| host.cross_entropy::<half::f16>(logits, &options, &outputs)),
        ("cpu", "bf16") => {
            py.detach(|| host.cross_entropy::<half::bf16>(logits, &options, &outputs))
        }
        ("cuda", "f32") => cuda_ce::<f32>(device_index, stream, logits, &host, &options, &outputs),
        ("cuda", "f16") => {
            cuda_ce::<half::f16>(device_index, stream, logits, &host, &options, &outputs)
        }
        ("cuda", "bf16") => {
            cuda_ce::<half::bf16>(device_index, stream, logits, &host, &options, &outputs)
        }
        (device, dtype) => Err(PyValueError::new_err(format!(
            "logits of {dtype} on {device}: f32, f16 or bf16 (and f64 on the CPU)"
        ))),
    }
}

/// The cross-entropy's options from the Python layer's arguments: the normalization by name
/// (`mean`, `sum`, or `cs336` with its constant, batch size and accumulation steps), the upstream
/// gradient, and (z-loss, label smoothing, softcap or 0 for none).
fn ce_options(
    normalization: &str,
    (normalize_constant, batch_size, gradient_accumulation_steps): (f64, usize, usize),
    upstream: f32,
    (z_loss, label_smoothing, softcap): (f32, f32, f32),
) -> PyResult<CeOptions> {
    let normalization = match normalization {
        "mean" => Normalization::TokenMean,
        "sum" => Normalization::Sum,
        "cs336" => Normalization::Cs336 {
            normalize_constant,
            batch_size,
            gradient_accumulation_steps,
        },
        other => {
            return Err(PyValueError::new_err(format!(
                "normalization {other:?}: mean, sum or cs336"
            )))
        }
    };
    let options = CeOptions {
        normalization,
        upstream,
        z_loss,
        label_smoothing,
        softcap: (softcap != 0.0).then_some(softcap),
        ignore_index: None,
    };
    options.validate().map_err(py_err)?;
    Ok(options)
}

/// The output addresses of a cross-entropy call.
struct Outputs {
    row_loss: u64,
    row_z: u64,
    log_probs: u64,
    entropy: u64,
    lse: u64,
    argmax: u64,
    scalars: u64,
    count: u64,
    error_flag: u64,
    grad: u64,
    grad_stride: usize,
}

/// The inputs of a cross-entropy call besides the logits.
struct Host {
    shape: LogitsShape,
    logits_len: usize,
    labels: u64,
    labels_i64: bool,
    mask: u64,
    weights: u64,
    upstream_ptr: u64,
}

/// A float the CPU path reads and writes: the oracle computes in f64 and rounds once to it.
trait HostFloat: sft_collate::loss::Float {
    /// Outputs beside f64 logits are f64, f32 otherwise.
    const F64_OUTPUTS: bool;
    fn from_f64(v: f64) -> Self;
}
impl HostFloat for f64 {
    const F64_OUTPUTS: bool = true;
    fn from_f64(v: f64) -> Self {
        v
    }
}
impl HostFloat for f32 {
    const F64_OUTPUTS: bool = false;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}
impl HostFloat for half::f16 {
    const F64_OUTPUTS: bool = false;
    fn from_f64(v: f64) -> Self {
        half::f16::from_f32(v as f32)
    }
}
impl HostFloat for half::bf16 {
    const F64_OUTPUTS: bool = false;
    fn from_f64(v: f64) -> Self {
        half::bf16::from_f32(v as f32)
    }
}

impl Host {
    /// The labels, the mask (as bools) and the weights.
    ///
    /// # Safety
    /// The Python layer passes contiguous CPU tensors of these lengths and types, alive for the call.
    unsafe fn targets(&self) -> (Labels<'_>, Vec<bool>, Option<&[f32]>) {
        let rows = self.shape.rows;
        unsafe {
            let labels = match self.labels_i64 {
                true => Labels::I64(host::<i64>(self.labels, rows)),
                false => Labels::I32(host::<i32>(self.labels, rows)),
            };
            let mask = host::<u8>(self.mask, rows)
                .iter()
                .map(|&m| m != 0)
                .collect();
            let weights = (self.weights != 0).then(|| host::<f32>(self.weights, rows));
            (labels, mask, weights)
        }
    }

    fn cross_entropy<T: HostFloat>(
        &self,
        logits: u64,
        options: &CeOptions,
        out: &Outputs,
    ) -> PyResult<()> {
        let rows = self.shape.rows;
        // SAFETY: the Python layer passes contiguous CPU tensors of these lengths and types, alive for
        // the call (the logits as rows `row_stride` apart).
        let (logits, (labels, mask, weights)) =
            unsafe { (host::<T>(logits, self.logits_len), self.targets()) };
        let options = CeOptions {
            // SAFETY: one f32 on the host when given.
            upstream: match self.upstream_ptr {
                0 => options.upstream,
                p => (unsafe { host::<f32>(p, 1) })[0],
            },
            ..*options
        };
        let input = CeInput {
            logits,
            shape: self.shape,
            labels,
            mask: Some(&mask),
            weights,
            cu_seqlens: None,
        };
        let result =
            cpu::loss::masked_cross_entropy(&input, &options, out.grad != 0).map_err(py_err)?;
        // SAFETY: the Python layer allocated each output with the lengths and types documented on
        // `masked_cross_entropy` (f64 outputs beside f64 logits).
        unsafe {
            out.write_reference::<T>(&result, rows);
            if let Some(grad) = &result.grad {
                let vocab = self.shape.vocab;
                for r in 0..rows {
                    let dst = host_mut::<T>(
                        out.grad + (r * out.grad_stride * size_of::<T>()) as u64,
                        vocab,
                    );
                    for (d, &g) in dst.iter_mut().zip(&grad[r * vocab..(r + 1) * vocab]) {
                        *d = T::from_f64(g);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Outputs {
    /// Write the oracle's per-row outputs, scalars and counts (f64 beside f64 logits, f32 otherwise),
    /// each output given (not 0); not the gradient.
    ///
    /// # Safety
    /// The Python layer allocated each output with the lengths and types documented on
    /// `masked_cross_entropy`.
    unsafe fn write_reference<T: HostFloat>(&self, result: &cpu::loss::CeReference, rows: usize) {
        unsafe {
            write_floats::<T>(self.row_loss, &result.row_loss);
            write_floats::<T>(self.log_probs, &result.log_probs);
            write_floats::<T>(self.entropy, &result.entropy);
            write_floats::<T>(self.lse, &result.lse);
            write_floats::<T>(self.scalars, &[result.sum, result.loss, result.z_sum]);
            if self.argmax != 0 {
                host_mut::<i32>(self.argmax, rows).copy_from_slice(&result.argmax);
            }
            let counts = [result.count, result.correct, result.documents];
            for (d, c) in host_mut::<i32>(self.count, 3).iter_mut().zip(counts) {
                *d = c as i32;
            }
        }
    }
}

/// Write `values` at `ptr` (nothing for 0) as f64 beside f64 inputs (`T::F64_OUTPUTS`), else as f32.
///
/// # Safety
/// `ptr` is 0 or holds `values.len()` writable elements of that type.
unsafe fn write_floats<T: HostFloat>(ptr: u64, values: &[f64]) {
    if ptr == 0 {
        return;
    }
    unsafe {
        if T::F64_OUTPUTS {
            host_mut::<f64>(ptr, values.len()).copy_from_slice(values);
        } else {
            for (d, &v) in host_mut::<f32>(ptr, values.len()).iter_mut().zip(values) {
                *d = v as f32;
            }
        }
    }
}

/// The foreign buffers of a cross-entropy call on the GPU, targets and outputs, for the unfused and the
/// linear paths.
struct ForeignCe {
    labels32: ForeignSlice<i32>,
    labels64: ForeignSlice<i64>,
    mask: ForeignSlice<u8>,
    weights: ForeignSlice<f32>,
    upstream: ForeignSlice<f32>,
    row_loss: ForeignSlice<f32>,
    log_probs: ForeignSlice<f32>,
    entropy: ForeignSlice<f32>,
    lse: ForeignSlice<f32>,
    row_z: ForeignSlice<f32>,
    argmax: ForeignSlice<i32>,
    scalars: ForeignSlice<f32>,
    count: ForeignSlice<u32>,
    flag: ForeignSlice<u32>,
}

impl ForeignCe {
    /// # Safety
    /// As [`Loaded::foreign`]: the Python layer passes contiguous tensors of these lengths and types on
    /// this device, alive for the call (and until the stream has run it: torch's caching allocator keeps
    /// memory on its stream).
    unsafe fn new(loaded: &Loaded, host: &Host, out: &Outputs) -> ForeignCe {
        let rows = host.shape.rows;
        unsafe {
            ForeignCe {
                labels32: loaded.foreign(host.labels, rows),
                labels64: loaded.foreign(host.labels, rows),
                mask: loaded.foreign(host.mask, rows),
                weights: loaded.foreign(host.weights, rows),
                upstream: loaded.foreign(host.upstream_ptr, 1),
                row_loss: loaded.foreign(out.row_loss, rows),
                log_probs: loaded.foreign(out.log_probs, rows),
                entropy: loaded.foreign(out.entropy, rows),
                lse: loaded.foreign(out.lse, rows),
                row_z: loaded.foreign(out.row_z, rows),
                argmax: loaded.foreign(out.argmax, rows),
                scalars: loaded.foreign(out.scalars, 3),
                count: loaded.foreign(out.count, 3),
                flag: loaded.foreign(out.error_flag, 1),
            }
        }
    }

    fn targets<'a>(
        labels32: &'a ForeignSlice<i32>,
        labels64: &'a ForeignSlice<i64>,
        mask: &'a ForeignSlice<u8>,
        weights: &'a ForeignSlice<f32>,
        upstream: &'a ForeignSlice<f32>,
        host: &Host,
    ) -> DeviceCeTargets<'a> {
        DeviceCeTargets {
            shape: host.shape,
            labels: match host.labels_i64 {
                true => DeviceLabels::I64(labels64),
                false => DeviceLabels::I32(labels32),
            },
            mask: Some(mask),
            weights: (host.weights != 0).then_some(weights as _),
            cu_seqlens: None,
            upstream: (host.upstream_ptr != 0).then_some(upstream as _),
        }
    }

    /// The targets and the output buffers (those given), borrowed together.
    fn split<'a>(&'a mut self, host: &Host, out: &Outputs) -> (DeviceCeTargets<'a>, CeBuffers<'a>) {
        let ForeignCe {
            labels32,
            labels64,
            mask,
            weights,
            upstream,
            row_loss,
            log_probs,
            entropy,
            lse,
            row_z,
            argmax,
            scalars,
            count,
            flag,
        } = self;
        let targets = ForeignCe::targets(labels32, labels64, mask, weights, upstream, host);
        let buffers = CeBuffers {
            row_loss,
            row_z: (out.row_z != 0).then_some(row_z as _),
            log_probs: (out.log_probs != 0).then_some(log_probs as _),
            entropy: (out.entropy != 0).then_some(entropy as _),
            lse: (out.lse != 0).then_some(lse as _),
            argmax: (out.argmax != 0).then_some(argmax as _),
            scalars,
            count,
            doc_trained: None,
            error_flag: flag,
        };
        (targets, buffers)
    }
}

fn cuda_ce<T: LogitElem>(
    device_index: usize,
    stream: u64,
    logits: u64,
    host: &Host,
    options: &CeOptions,
    out: &Outputs,
) -> PyResult<()> {
    let loaded = loaded(device_index, stream)?;
    let rows = host.shape.rows;
    // SAFETY: as `ForeignCe::new`, for the logits and the gradient too.
    unsafe {
        let mut logits_buffer = loaded.foreign::<T>(logits, host.logits_len);
        let grad_len = match rows {
            0 => 0,
            r => (r - 1) * out.grad_stride + host.shape.vocab,
        };
        let mut grad = loaded.foreign::<T>(out.grad, grad_len);
        let mut foreign = ForeignCe::new(&loaded, host, out);
        let (targets, mut buffers) = foreign.split(host, out);
        let kernels = loaded.cross_entropy()?;
        let result = if out.grad == 0 {
            kernels.compute(
                CeLogits::Read(&logits_buffer),
                &targets,
                options,
                CeGrad::None,
                &mut buffers,
            )
        } else if out.grad == logits {
            kernels.compute(
                CeLogits::InPlace(&mut logits_buffer),
                &targets,
                options,
                CeGrad::InPlace,
                &mut buffers,
            )
        } else {
            kernels.compute(
                CeLogits::Read(&logits_buffer),
                &targets,
                options,
                CeGrad::Into(&mut grad, out.grad_stride),
                &mut buffers,
            )
        };
        result.map_err(py_err)
    }
}

/// The fused linear cross-entropy of `hidden [rows, hidden_size]` and the LM head's `weight [vocab,
/// hidden_size]` (+ `bias [vocab]`, 0 for none), contiguous, of `dtype`; the targets and options as for
/// `masked_cross_entropy`. Outputs: `row_loss`, `log_probs` (0 for none), `scalars` (sum, loss, z_sum),
/// `count`, `error_flag` as there; `grad_hidden` (`dtype`, written), `grad_weight` and `grad_bias` (f32,
/// or f64 beside f64 inputs on the CPU; added to: pass zeros), each 0 when not wanted. On a GPU the rows
/// go a chunk at a time (`chunk_rows`, 0 for the default rule capped at a quarter of free memory)
/// through cuBLAS and the cross-entropy kernels on `stream`; on the CPU the f64 oracle runs unfused.
/// Returns the rows per chunk.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, device_index, stream, dtype, rows, hidden_size, vocab, hidden, weight, bias, labels, labels_i64, mask, weights, normalization, normalize_constant, batch_size, gradient_accumulation_steps, z_loss, label_smoothing, softcap, chunk_rows, row_loss, log_probs, scalars, count, error_flag, grad_hidden, grad_weight, grad_bias))]
fn linear_cross_entropy(
    py: Python<'_>,
    device: &str,
    device_index: usize,
    stream: u64,
    dtype: &str,
    rows: usize,
    hidden_size: usize,
    vocab: usize,
    hidden: u64,
    weight: u64,
    bias: u64,
    labels: u64,
    labels_i64: bool,
    mask: u64,
    weights: u64,
    normalization: &str,
    normalize_constant: f64,
    batch_size: usize,
    gradient_accumulation_steps: usize,
    z_loss: f32,
    label_smoothing: f32,
    softcap: f32,
    chunk_rows: usize,
    row_loss: u64,
    log_probs: u64,
    scalars: u64,
    count: u64,
    error_flag: u64,
    grad_hidden: u64,
    grad_weight: u64,
    grad_bias: u64,
) -> PyResult<usize> {
    let options = ce_options(
        normalization,
        (normalize_constant, batch_size, gradient_accumulation_steps),
        1.0,
        (z_loss, label_smoothing, softcap),
    )?;
    let linear = Linear {
        host: Host {
            shape: LogitsShape::dense(rows, vocab),
            logits_len: 0,
            labels,
            labels_i64,
            mask,
            weights,
            upstream_ptr: 0,
        },
        out: Outputs {
            row_loss,
            row_z: 0,
            log_probs,
            entropy: 0,
            lse: 0,
            argmax: 0,
            scalars,
            count,
            error_flag,
            grad: 0,
            grad_stride: 0,
        },
        hidden_size,
        hidden,
        weight,
        bias,
        grads: (grad_hidden, grad_weight, grad_bias),
        config: LinearCeConfig {
            grads: LinearCeGrads {
                hidden: grad_hidden != 0,
                weight: grad_weight != 0,
                bias: grad_bias != 0,
            },
            chunk_rows: (chunk_rows != 0).then_some(chunk_rows),
            max_chunk_bytes: None,
        },
    };
    linear.config.validate().map_err(py_err)?;
    if hidden_size == 0 {
        return Err(PyValueError::new_err("the hidden size must be at least 1"));
    }
    match (device, dtype) {
        ("cpu", "f64") => py.detach(|| linear.on_host::<f64>(&options)),
        ("cpu", "f32") => py.detach(|| linear.on_host::<f32>(&options)),
        ("cpu", "f16") => py.detach(|| linear.on_host::<half::f16>(&options)),
        ("cpu", "bf16") => py.detach(|| linear.on_host::<half::bf16>(&options)),
        ("cuda", "f32") => linear.on_cuda::<f32>(device_index, stream, &options),
        ("cuda", "f16") => linear.on_cuda::<half::f16>(device_index, stream, &options),
        ("cuda", "bf16") => linear.on_cuda::<half::bf16>(device_index, stream, &options),
        (device, dtype) => Err(PyValueError::new_err(format!(
            "inputs of {dtype} on {device}: f32, f16 or bf16 (and f64 on the CPU)"
        ))),
    }
}

/// The addresses of a fused linear cross-entropy call.
struct Linear {
    host: Host,
    out: Outputs,
    hidden_size: usize,
    hidden: u64,
    weight: u64,
    bias: u64,
    /// `d hidden`, `d weight`, `d bias` (0: not wanted).
    grads: (u64, u64, u64),
    config: LinearCeConfig,
}

impl Linear {
    fn on_host<T: HostFloat>(&self, options: &CeOptions) -> PyResult<usize> {
        let (n, v, h) = (
            self.host.shape.rows,
            self.host.shape.vocab,
            self.hidden_size,
        );
        // SAFETY: the Python layer passes contiguous CPU tensors of these lengths and types, alive for
        // the call.
        let (hidden, weight, bias, (labels, mask, weights)) = unsafe {
            (
                host::<T>(self.hidden, n * h),
                host::<T>(self.weight, v * h),
                (self.bias != 0).then(|| host::<T>(self.bias, v)),
                self.host.targets(),
            )
        };
        let input = LinearCeInput {
            hidden,
            weight,
            bias,
            hidden_size: h,
            labels,
            mask: Some(&mask),
            weights,
            cu_seqlens: None,
        };
        let result = cpu::linear::linear_cross_entropy(&input, options, self.config.grads)
            .map_err(py_err)?;
        let (d_hidden, d_weight, d_bias) = self.grads;
        // SAFETY: the Python layer allocated each output as `linear_cross_entropy` documents.
        unsafe {
            self.out.write_reference::<T>(&result.ce, n);
            if let Some(g) = &result.grad_hidden {
                for (d, &x) in host_mut::<T>(d_hidden, g.len()).iter_mut().zip(g) {
                    *d = T::from_f64(x);
                }
            }
            // Added to, as on the GPU.
            for (ptr, g) in [(d_weight, &result.grad_weight), (d_bias, &result.grad_bias)] {
                match (g, T::F64_OUTPUTS) {
                    (Some(g), true) => {
                        for (d, &x) in host_mut::<f64>(ptr, g.len()).iter_mut().zip(g) {
                            *d += x;
                        }
                    }
                    (Some(g), false) => {
                        for (d, &x) in host_mut::<f32>(ptr, g.len()).iter_mut().zip(g) {
                            *d += x as f32;
                        }
                    }
                    (None, _) => {}
                }
            }
        }
        Ok(n)
    }

    fn on_cuda<T: LogitElem>(
        &self,
        device_index: usize,
        stream: u64,
        options: &CeOptions,
    ) -> PyResult<usize> {
        let loaded = loaded(device_index, stream)?;
        let (n, v, h) = (
            self.host.shape.rows,
            self.host.shape.vocab,
            self.hidden_size,
        );
        let (free, _) = loaded
            .stream
            .context()
            .mem_get_info()
            .map_err(|e| PyRuntimeError::new_err(format!("CUDA: {e:?}")))?;
        let config = LinearCeConfig {
            max_chunk_bytes: Some(free / 4),
            ..self.config
        };
        let chunk = config
            .chunk_rows(n, v, h, std::mem::size_of::<T>())
            .map_err(py_err)?;
        let (ce, linear) = (loaded.cross_entropy()?, loaded.linear()?);
        let (d_hidden, d_weight, d_bias) = self.grads;
        // SAFETY: as `ForeignCe::new`, for the inputs and the gradients too.
        unsafe {
            let hidden = loaded.foreign::<T>(self.hidden, n * h);
            let weight = loaded.foreign::<T>(self.weight, v * h);
            let bias = loaded.foreign::<T>(self.bias, v);
            let mut grad_hidden = loaded.foreign::<T>(d_hidden, n * h);
            let mut grad_weight = loaded.foreign::<f32>(d_weight, v * h);
            let mut grad_bias = loaded.foreign::<f32>(d_bias, v);
            let mut foreign = ForeignCe::new(&loaded, &self.host, &self.out);
            let (targets, mut buffers) = foreign.split(&self.host, &self.out);
            let input = LinearCeDeviceInput {
                hidden: &hidden,
                weight: &weight,
                bias: (self.bias != 0).then_some(&bias as &dyn DeviceRead<T>),
                hidden_size: h,
            };
            let grads = LinearCeDeviceGrads {
                hidden: (d_hidden != 0).then_some(&mut grad_hidden as _),
                weight: (d_weight != 0).then_some(&mut grad_weight as _),
                bias: (d_bias != 0).then_some(&mut grad_bias as _),
            };
            linear
                .compute(&ce, &input, &targets, options, grads, &mut buffers, chunk)
                .map_err(py_err)?;
        }
        Ok(chunk)
    }
}

/// A loader over a token store (`sft_collate::loader`): steps of rows gathered and cut, for the Python
/// side to collate into tensors. Exactly one of `rows`, `tokens`, `pack` says how rows become steps.
#[pyclass(unsendable, module = "sft_collate._native")]
struct Loader {
    inner: sft_collate::loader::Loader,
}

#[pymethods]
impl Loader {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (store, rows = None, tokens = None, pack = None, window = 4096, strategy = "exact-fill", overflow = "error", max_len = None, truncation = "error", pad_to_multiple_of = None, shuffle = true, seed = 0, rank = 0, world_size = 1, prefetch = 2, pad_id = None))]
    fn new(
        py: Python<'_>,
        store: std::path::PathBuf,
        rows: Option<usize>,
        tokens: Option<usize>,
        pack: Option<usize>,
        window: usize,
        strategy: &str,
        overflow: &str,
        max_len: Option<usize>,
        truncation: &str,
        pad_to_multiple_of: Option<usize>,
        shuffle: bool,
        seed: u64,
        rank: usize,
        world_size: usize,
        prefetch: usize,
        pad_id: Option<u32>,
    ) -> PyResult<Self> {
        use sft_collate::loader::{Batching, LoaderConfig};
        let batching = match (rows, tokens, pack) {
            (Some(n), None, None) => Batching::Rows(n),
            (None, Some(tokens), None) => Batching::Tokens { tokens, window },
            (None, None, Some(max_tokens)) => Batching::Packs {
                pack: PackSpec {
                    max_tokens,
                    strategy: parse::<PackStrategy>(strategy)?,
                    overflow: parse::<Overflow>(overflow)?,
                },
                window,
            },
            _ => {
                return Err(PyValueError::new_err(
                    "give exactly one of batch_rows, batch_tokens, pack_tokens",
                ))
            }
        };
        let spec = CollateSpec {
            pad_id,
            max_len,
            truncation: parse(truncation)?,
            pad_to_multiple_of,
            ..CollateSpec::default()
        };
        let config = LoaderConfig {
            spec,
            shuffle,
            seed,
            rank,
            world_size,
            prefetch,
            ..LoaderConfig::new(batching)
        };
        let inner = py
            .detach(|| {
                let store = sft_collate::store::Store::open(&store)?;
                sft_collate::loader::Loader::new(
                    Arc::new(store),
                    config,
                    sft_collate::Device::cpu(),
                )
            })
            .map_err(py_err)?;
        Ok(Loader { inner })
    }

    fn steps_per_epoch(&self) -> PyResult<usize> {
        self.inner.steps_per_epoch().map_err(py_err)
    }

    /// The next step to give: (epoch, step).
    fn state(&self) -> (u64, usize) {
        let s = self.inner.state();
        (s.epoch, s.step)
    }

    fn set_state(&mut self, epoch: u64, step: usize) {
        self.inner
            .set_state(sft_collate::loader::LoaderState { epoch, step });
    }

    /// The pad id steps are collated with.
    #[getter]
    fn pad_id(&self) -> u32 {
        self.inner.spec().pad_id.expect("resolved when made")
    }

    /// The next step: (epoch, step, store rows, the rows gathered and cut).
    fn next_rows(&mut self) -> PyResult<(u64, usize, Vec<usize>, Ragged)> {
        let (state, rows, ragged) = self.inner.next_rows().map_err(py_err)?;
        Ok((state.epoch, state.step, rows, Ragged { inner: ragged }))
    }
}

/// Tokenize a JSONL, JSON, Parquet or Arrow file (or one shard of it) into a token store; returns the shard manifest as JSON.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (tokenizer, input, output, shard_index = 0, shard_count = 1, prompt_key = "prompt", output_key = "output", template = None, messages_key = "messages", message_template = None, train_roles = vec!["assistant".to_string()], role_key = "role", content_key = "content", role_names = Vec::new(), skip_bad_lines = false, overwrite = false))]
fn write_store(
    py: Python<'_>,
    tokenizer: &Tokenizer,
    input: std::path::PathBuf,
    output: std::path::PathBuf,
    shard_index: usize,
    shard_count: usize,
    prompt_key: &str,
    output_key: &str,
    template: Option<&str>,
    messages_key: &str,
    message_template: Option<&str>,
    train_roles: Vec<String>,
    role_key: &str,
    content_key: &str,
    role_names: Vec<(String, String)>,
    skip_bad_lines: bool,
    overwrite: bool,
) -> PyResult<String> {
    let messages = message_format(
        message_template,
        train_roles,
        messages_key,
        role_key,
        content_key,
        role_names,
    )?;
    let rows = sft_collate::input::RowFormat {
        prompt_key: prompt_key.to_string(),
        output_key: output_key.to_string(),
        template: template
            .map(sft_collate::input::Template::parse)
            .transpose()
            .map_err(py_err)?,
        messages: Some(messages),
    };
    let config = sft_collate::store::StoreConfig {
        input,
        output,
        rows,
        shard: sft_collate::store::Shard::new(shard_index, shard_count).map_err(py_err)?,
        skip_bad_lines,
        overwrite,
    };
    let manifest = py
        .detach(|| {
            sft_collate::store::write_store(&config, &tokenizer.inner, &sft_collate::io::Quiet)
        })
        .map_err(py_err)?;
    Ok(serde_json::to_string(&manifest).expect("a manifest serializes"))
}

/// Export a token store as Megatron-Bridge packed-sequence Parquet; returns the summary as JSON.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (store, output, pack_size, truncation = "error", window = 4096, packs_per_file = 100_000, overwrite = false))]
fn export_megatron(
    py: Python<'_>,
    store: std::path::PathBuf,
    output: std::path::PathBuf,
    pack_size: usize,
    truncation: &str,
    window: usize,
    packs_per_file: usize,
    overwrite: bool,
) -> PyResult<String> {
    let config = sft_collate::export::MegatronExport {
        truncation: parse::<Truncation>(truncation)?,
        window,
        packs_per_file,
        overwrite,
        ..sft_collate::export::MegatronExport::new(store, output, pack_size)
    };
    let summary = py
        .detach(|| sft_collate::export::export_megatron(&config, &sft_collate::io::Quiet))
        .map_err(py_err)?;
    Ok(serde_json::to_string(&summary).expect("a summary serializes"))
}

/// Whether a CUDA device is usable, and if not why.
#[pyfunction]
fn cuda_status() -> (bool, String) {
    match cuda::probe(0) {
        Ok(info) => (
            true,
            format!("{} ({} GiB)", info.name, info.total_memory >> 30),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// A [`Communicator`](sft_collate::loss::parallel::Communicator) over a Python callable
/// `all_gather(bytes) -> bytes` (every rank's bytes, concatenated in rank order: `torch.distributed`'s
/// `all_gather`, an MPI call, threads with a barrier). The Rust side runs without the GIL and takes it
/// only for the call.
struct PyCommunicator {
    all_gather: Py<PyAny>,
    rank: usize,
    size: usize,
}

impl sft_collate::loss::parallel::Communicator for PyCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, local: &[u8]) -> sft_collate::Result<Vec<u8>> {
        let gathered = Python::attach(|py| {
            let out = self
                .all_gather
                .call1(py, (pyo3::types::PyBytes::new(py, local),))?;
            out.extract::<Vec<u8>>(py)
        })
        .map_err(|e| sft_collate::Error::Collective(format!("all_gather raised {e}")))?;
        if gathered.len() != local.len() * self.size {
            return Err(sft_collate::Error::Collective(format!(
                "all_gather returned {} bytes for {} ranks of {}",
                gathered.len(),
                self.size,
                local.len()
            )));
        }
        Ok(gathered)
    }
}

/// The vocabulary-parallel cross-entropy of this rank's columns `start..start + width` of a vocabulary of
/// `vocab`: `logits` (f32, CPU, `rows × width` contiguous), labels (ids in the whole vocabulary, i32 or
/// i64), `mask` (bytes, 0 for none: trained where the label is not `ignore_index`), the exchange through
/// `all_gather`. Writes `row_loss` (f32, rows) and, when `grad` is not 0, the gradient of this rank's
/// columns (f32, `rows × width`; upstream 1); returns `(loss, sum, count)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (rows, width, start, vocab, logits, labels, labels_i64, mask, ignore_index, rank, size, all_gather, normalization, z_loss, label_smoothing, softcap, row_loss, grad))]
fn vocab_parallel_cross_entropy(
    py: Python<'_>,
    rows: usize,
    width: usize,
    start: usize,
    vocab: usize,
    logits: u64,
    labels: u64,
    labels_i64: bool,
    mask: u64,
    ignore_index: i64,
    rank: usize,
    size: usize,
    all_gather: Py<PyAny>,
    normalization: &str,
    z_loss: f32,
    label_smoothing: f32,
    softcap: f32,
    row_loss: u64,
    grad: u64,
) -> PyResult<(f64, f64, usize)> {
    let normalization = match normalization {
        "mean" => Normalization::TokenMean,
        "sum" => Normalization::Sum,
        other => {
            return Err(PyValueError::new_err(format!(
                "normalization {other:?}: mean or sum"
            )))
        }
    };
    if rank >= size {
        return Err(PyValueError::new_err(format!(
            "rank {rank} of a group of {size}"
        )));
    }
    let options = CeOptions {
        normalization,
        upstream: 1.0,
        z_loss,
        label_smoothing,
        softcap: (softcap != 0.0).then_some(softcap),
        ignore_index: (mask == 0).then_some(ignore_index),
    };
    let comm = PyCommunicator {
        all_gather,
        rank,
        size,
    };
    // SAFETY: the Python layer passes contiguous CPU tensors of these lengths and types, alive for the
    // call; the outputs it allocated are written only here.
    let (logits, mask_bytes, labels32, labels64) = unsafe {
        (
            host::<f32>(logits, rows * width),
            (mask != 0).then(|| host::<u8>(mask, rows)),
            (!labels_i64).then(|| host::<i32>(labels, rows)),
            labels_i64.then(|| host::<i64>(labels, rows)),
        )
    };
    let mask: Option<Vec<bool>> = mask_bytes.map(|m| m.iter().map(|&b| b != 0).collect());
    let labels = match (labels32, labels64) {
        (Some(l), _) => Labels::I32(l),
        (_, Some(l)) => Labels::I64(l),
        _ => unreachable!("one of the two"),
    };
    let input = CeInput {
        logits,
        shape: LogitsShape::dense(rows, width),
        labels,
        mask: mask.as_deref(),
        weights: None,
        cu_seqlens: None,
    };
    let shard = sft_collate::loss::parallel::VocabShard { start, vocab };
    let result = py
        .detach(|| {
            cpu::loss::vocab_parallel_cross_entropy(&input, shard, &options, &comm, grad != 0)
        })
        .map_err(py_err)?;
    // SAFETY: as above: `row_loss` holds `rows` f32, `grad` (when given) `rows × width` f32.
    unsafe {
        for (d, &v) in host_mut::<f32>(row_loss, rows)
            .iter_mut()
            .zip(&result.row_loss)
        {
            *d = v as f32;
        }
        if let (Some(g), true) = (&result.grad, grad != 0) {
            for (d, &v) in host_mut::<f32>(grad, rows * width).iter_mut().zip(g) {
                *d = v as f32;
            }
        }
    }
    Ok((result.loss, result.sum, result.count))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_class::<Ragged>()?;
    m.add_function(wrap_pyfunction!(tokenize_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(tokenize_rows, m)?)?;
    m.add_function(wrap_pyfunction!(write_store, m)?)?;
    m.add_function(wrap_pyfunction!(export_megatron, m)?)?;
    m.add_class::<Loader>()?;
    m.add_function(wrap_pyfunction!(conversation_segments, m)?)?;
    m.add_function(wrap_pyfunction!(pack_documents, m)?)?;
    m.add_function(wrap_pyfunction!(pack_plan, m)?)?;
    m.add_function(wrap_pyfunction!(bucket_order, m)?)?;
    m.add_function(wrap_pyfunction!(masked_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(linear_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_status, m)?)?;
    m.add(
        "BUILTIN_TOKENIZERS",
        sft_collate::BUILTIN_TOKENIZERS.to_vec(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
