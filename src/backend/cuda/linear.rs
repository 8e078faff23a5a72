//! The fused linear cross-entropy on a CUDA device (feature `cublas`): the rows a chunk at a time, each
//! chunk's logits made by a cuBLAS GEMM (`cublasGemmEx`, f32 accumulation, written in the input's
//! dtype), the cross-entropy kernels over the chunk with the batch's counters and the gradient written
//! over the logits ([`MaskedCrossEntropy::compute_chunked`]), then `d hidden = G · W` (the input's dtype)
//! and `d weight += Gᵀ · H`, `d bias += Σ G` (f32). One chunk of logits is the extra memory. The same
//! steps as the emulator's (`backend::emulation::linear`), which CI checks; cuBLAS itself runs only on a
//! GPU.
//!
//! Layouts, in cuBLAS's column-major terms (a row-major `[r, c]` matrix with rows `ld` apart is a
//! column-major `[c, r]` one with leading dimension `ld`): hidden `[N, H]` is `Hᵀ` `[H, N]`, the weight
//! `[V, H]` is `Wᵀ` `[H, V]`, a chunk of logits `[rows, V]` (rows `stride` apart) is `Zᵀ` `[V, rows]`.
//! So `Zᵀ = op_T(Wᵀ) · Hᵀ`, `d Hᵀ = Wᵀ · Gᵀ`, `d Wᵀ += Hᵀ · op_T(Gᵀ)`, `d b += Gᵀ · 1`.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, SyncOnDrop};

use super::loss::{keep, CeBuffers, DeviceCeTargets, MaskedCrossEntropy};
use super::memory::{DeviceRead, DeviceWrite};
use super::{cuda_err, cuda_result, library_present};
use crate::loss::linear::{linear_row_stride, LinearCeConfig, LinearCeInput, LinearCeOutput};
use crate::loss::{CeOptions, CeRequest, LogitElem, LogitsShape};
use crate::{Error, Result};

/// The LM head and hidden states of a fused linear cross-entropy, on the device: hidden `[N, H]`, the
/// weight `[V, H]` (as `nn.Linear` stores it), an optional bias `[V]`, all dense.
pub struct LinearCeDeviceInput<'a, T> {
    pub hidden: &'a dyn DeviceRead<T>,
    pub weight: &'a dyn DeviceRead<T>,
    pub bias: Option<&'a dyn DeviceRead<T>>,
    pub hidden_size: usize,
}

/// Where the gradients go: `d hidden` `[N, H]` written (in the input's dtype); `d weight` `[V, H]` and
/// `d bias` `[V]` **added to** what the buffers hold, in f32 (zero them for the gradient alone; leave
/// them to accumulate over micro-batches). `None`: not computed.
#[derive(Default)]
pub struct LinearCeDeviceGrads<'a, T> {
    pub hidden: Option<&'a mut dyn DeviceWrite<T>>,
    pub weight: Option<&'a mut dyn DeviceWrite<f32>>,
    pub bias: Option<&'a mut dyn DeviceWrite<f32>>,
}

/// cuBLAS on the caller's stream, for the fused linear cross-entropy.
pub struct LinearCrossEntropy {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    /// A vector of ones per dtype (the bias's broadcast and `d bias`'s column sums are GEMMs with it),
    /// uploaded once and grown as needed, so that a call copies nothing from the host.
    ones: std::sync::Mutex<Vec<(&'static str, CudaSlice<u8>)>>,
}

impl std::fmt::Debug for LinearCrossEntropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearCrossEntropy").finish_non_exhaustive()
    }
}

/// The cuBLAS data type of `T`.
fn data_type<T: LogitElem>() -> blas_sys::cudaDataType {
    match T::SUFFIX {
        "f32" => blas_sys::cudaDataType::CUDA_R_32F,
        "f16" => blas_sys::cudaDataType::CUDA_R_16F,
        _ => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// A dimension as cuBLAS takes it.
fn dim(what: &str, n: usize) -> Result<c_int> {
    c_int::try_from(n)
        .map_err(|_| Error::Shape(format!("{what} {n} is over cuBLAS's limit of 2^31 - 1")))
}

/// One matrix operand: its address, data type, leading dimension, and whether cuBLAS transposes it.
#[derive(Clone, Copy)]
struct Operand {
    addr: u64,
    dtype: blas_sys::cudaDataType,
    ld: c_int,
    transposed: bool,
}

impl LinearCrossEntropy {
    /// A cuBLAS handle on `stream` (every GEMM goes there). `Error::NoDevice` when cuBLAS is not found
    /// (cudarc would panic at the first call): `libcublas.so.12` or `libcublas.so` must be on the
    /// loader's path, e.g. from the `nvidia-cublas-cu12` wheel.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        if !library_present(&["libcublas.so.12", "libcublas.so"]) {
            return Err(Error::NoDevice(
                "cuBLAS (libcublas.so.12) was not found: the fused linear cross-entropy needs it on \
                 the loader's path (e.g. the nvidia-cublas-cu12 wheel's nvidia/cublas/lib)"
                    .into(),
            ));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err)?;
        Ok(LinearCrossEntropy {
            blas,
            stream,
            ones: Default::default(),
        })
    }

    /// The address of at least `len` ones of `T` on the device (uploaded at the first call that needs
    /// more: one host copy, which waits for the stream).
    fn ones<T: LogitElem>(&self, len: usize) -> Result<u64> {
        let mut cache = self.ones.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = len.max(1) * std::mem::size_of::<T>();
        cache.retain(|(suffix, buffer)| *suffix != T::SUFFIX || buffer.len() >= bytes);
        if !cache.iter().any(|(suffix, _)| *suffix == T::SUFFIX) {
            let ones = vec![T::from_f32(1.0); len.max(1024)];
            let buffer = cuda_result(self.stream.clone_htod(bytemuck::cast_slice::<T, u8>(&ones)))?;
            cache.push((T::SUFFIX, buffer));
        }
        let (_, buffer) = cache
            .iter()
            .find(|(suffix, _)| *suffix == T::SUFFIX)
            .expect("just made");
        // Every use is on this stream, after the upload: the buffer (freed stream-ordered if ever
        // replaced) outlives the GEMMs enqueued with its address.
        let (addr, _recorded) = buffer.read_addr(&self.stream);
        Ok(addr)
    }

    /// `C = alpha · op(A) · op(B) + beta · C` (`m × n`, inner `k`), f32 accumulation, C of `c_type`.
    ///
    /// # Safety
    /// Each operand must address a matrix of its shape and leading dimension on this stream's device,
    /// alive until the GEMM has run.
    unsafe fn gemm(
        &self,
        (m, n, k): (c_int, c_int, c_int),
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
    ) -> Result<()> {
        let op = |t: bool| match t {
            true => blas_sys::cublasOperation_t::CUBLAS_OP_T,
            false => blas_sys::cublasOperation_t::CUBLAS_OP_N,
        };
        let alpha = 1.0f32;
        // SAFETY: the caller vouches for the operands; alpha and beta are host f32s (the handle's
        // default pointer mode), as the f32 compute type takes them.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(a.transposed),
                op(b.transposed),
                m,
                n,
                k,
                &alpha as *const f32 as *const c_void,
                a.addr as *const c_void,
                a.dtype,
                a.ld,
                b.addr as *const c_void,
                b.dtype,
                b.ld,
                &beta as *const f32 as *const c_void,
                c.addr as *mut c_void,
                c.dtype,
                c.ld,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cuda_err)
    }

    /// The fused linear cross-entropy of device inputs: `targets` for `N` rows of `V` columns (its
    /// `row_stride` is ignored: the chunk's layout is this function's), the outputs into `outputs` (as
    /// [`MaskedCrossEntropy::compute`] writes them), the gradients into `grads`, `chunk_rows` rows of
    /// logits at a time in a buffer of its own. All on the stream; nothing synchronizes the host, except
    /// the first call with a bias or a `d bias` (or a larger chunk than before), which uploads a vector
    /// of ones.
    #[allow(clippy::too_many_arguments)]
    pub fn compute<T: LogitElem>(
        &self,
        ce: &MaskedCrossEntropy,
        input: &LinearCeDeviceInput<'_, T>,
        targets: &DeviceCeTargets<'_>,
        options: &CeOptions,
        grads: LinearCeDeviceGrads<'_, T>,
        outputs: &mut CeBuffers<'_>,
        chunk_rows: usize,
    ) -> Result<()> {
        let stream = &*self.stream;
        let (n, v, h) = (targets.shape.rows, targets.shape.vocab, input.hidden_size);
        let sized = |what: &str, len: usize, want: Option<usize>| match want {
            Some(w) if w == len => Ok(()),
            _ => Err(Error::Shape(format!(
                "{what} has {len} elements, not {} ({n} rows, vocab {v}, hidden {h})",
                want.map_or("that many".into(), |w| w.to_string())
            ))),
        };
        if h == 0 {
            return Err(Error::Shape("the hidden size must be at least 1".into()));
        }
        sized("hidden", input.hidden.len(), n.checked_mul(h))?;
        sized("the weight", input.weight.len(), v.checked_mul(h))?;
        if let Some(bias) = input.bias {
            sized("the bias", bias.len(), Some(v))?;
        }
        if let Some(g) = &grads.hidden {
            sized("d hidden", g.len(), n.checked_mul(h))?;
        }
        if let Some(g) = &grads.weight {
            sized("d weight", g.len(), v.checked_mul(h))?;
        }
        if let Some(g) = &grads.bias {
            sized("d bias", g.len(), Some(v))?;
        }
        let stride = linear_row_stride::<T>(v);
        let chunk = chunk_rows.clamp(1, n.max(1));
        let (vi, hi, si) = (
            dim("vocab", v)?,
            dim("hidden", h)?,
            dim("row stride", stride)?,
        );
        let elem = std::mem::size_of::<T>() as u64;
        let dtype = data_type::<T>();
        // SAFETY: the GEMMs write every one of a chunk's `v` columns before the kernel reads them; the
        // padding columns past `v` are never read.
        let mut logits: CudaSlice<T> =
            unsafe { self.stream.alloc::<T>(chunk * stride) }.map_err(cuda_err)?;
        let ones = match input.bias.is_some() || grads.bias.is_some() {
            true => Some(self.ones::<T>(chunk)?),
            false => None,
        };
        let mut guards: Vec<SyncOnDrop<'_>> = Vec::new();
        let g = &mut guards;
        let hidden = keep(g, input.hidden.read_addr(stream));
        let weight = keep(g, input.weight.read_addr(stream));
        let bias = input.bias.map(|b| keep(g, b.read_addr(stream)));
        let LinearCeDeviceGrads {
            hidden: d_hidden,
            weight: d_weight,
            bias: d_bias,
        } = grads;
        let backward = d_hidden.is_some() || d_weight.is_some() || d_bias.is_some();
        let d_hidden = d_hidden.map(|b| keep(g, b.write_addr(stream)));
        let d_weight = d_weight.map(|b| keep(g, b.write_addr(stream)));
        let d_bias = d_bias.map(|b| keep(g, b.write_addr(stream)));
        let matrix = |addr: u64, dtype, ld: c_int, transposed| Operand {
            addr,
            dtype,
            ld,
            transposed,
        };
        let f32_type = blas_sys::cudaDataType::CUDA_R_32F;
        // Row `start` of a `[N, H]` matrix of `T`.
        let row_at = |base: u64, start: usize| base + (start * h) as u64 * elem;
        cuda_result(stream.context().bind_to_thread())?;
        let chunked_targets = DeviceCeTargets {
            shape: LogitsShape {
                rows: n,
                vocab: v,
                row_stride: stride,
            },
            ..*targets
        };
        let mut fill = |start: usize, rows: usize, chunk_addr: u64| -> Result<()> {
            let r = dim("rows", rows)?;
            let z = matrix(chunk_addr, dtype, si, false);
            // SAFETY (both): the weight is `[V, H]` (`Wᵀ` `[H, V]`, ld H, checked above), the chunk's
            // hidden rows `start..start + rows` of `[N, H]` (`[H, rows]`, ld H), the bias `[V, 1]`
            // (ld V), `ones` `[1, rows]` (ld 1, `chunk >= rows` long), the logits `[V, rows]` (ld
            // `stride >= V`) in the chunk buffer of `chunk` rows.
            unsafe {
                if let (Some(bias), Some(ones)) = (bias, ones) {
                    // Each row starts as the bias; the product is added to it before one rounding.
                    self.gemm(
                        (vi, r, 1),
                        matrix(bias, dtype, vi, false),
                        matrix(ones, dtype, 1, false),
                        0.0,
                        z,
                    )?;
                }
                self.gemm(
                    (vi, r, hi),
                    matrix(weight, dtype, hi, true),
                    matrix(row_at(hidden, start), dtype, hi, false),
                    if bias.is_some() { 1.0 } else { 0.0 },
                    z,
                )
            }
        };
        let mut consume = |start: usize, rows: usize, chunk_addr: u64| -> Result<()> {
            let r = dim("rows", rows)?;
            let grad = matrix(chunk_addr, dtype, si, false);
            // SAFETY: the gradient of the chunk is `[V, rows]` (ld `stride`) over its logits; d hidden
            // `[N, H]` (rows `start..start + rows`: `[H, rows]`, ld H), d weight `[V, H]` (`[H, V]`,
            // ld H), d bias `[V, 1]` (ld V) and `ones` `[rows, 1]` (ld `rows`), all checked above.
            unsafe {
                if let Some(dh) = d_hidden {
                    self.gemm(
                        (hi, r, vi),
                        matrix(weight, dtype, hi, false),
                        grad,
                        0.0,
                        matrix(row_at(dh, start), dtype, hi, false),
                    )?;
                }
                if let Some(dw) = d_weight {
                    self.gemm(
                        (hi, vi, r),
                        matrix(row_at(hidden, start), dtype, hi, false),
                        Operand {
                            transposed: true,
                            ..grad
                        },
                        1.0,
                        matrix(dw, f32_type, hi, false),
                    )?;
                }
                if let (Some(db), Some(ones)) = (d_bias, ones) {
                    self.gemm(
                        (vi, 1, r),
                        grad,
                        matrix(ones, dtype, r, false),
                        1.0,
                        matrix(db, f32_type, vi, false),
                    )?;
                }
            }
            Ok(())
        };
        ce.compute_chunked(
            &mut logits,
            chunk,
            &chunked_targets,
            options,
            backward,
            outputs,
            &mut fill,
            &mut consume,
        )?;
        drop(guards);
        Ok(())
    }

    /// The fused linear cross-entropy of host inputs (the [`crate::Device`] call): copied up, computed
    /// with [`LinearCrossEntropy::compute`], read back (synchronizes). Without `max_chunk_bytes` (and
    /// `chunk_rows`), a chunk takes at most a quarter of the device's free memory.
    pub(crate) fn host<T: LogitElem>(
        &self,
        ce: &MaskedCrossEntropy,
        input: &LinearCeInput<'_, T>,
        options: &CeOptions,
        request: CeRequest,
        config: &LinearCeConfig,
    ) -> Result<LinearCeOutput<T>> {
        let stream = &self.stream;
        let max_chunk_bytes = match config.max_chunk_bytes {
            Some(bytes) => Some(bytes),
            None => Some(cuda_result(stream.context().mem_get_info())?.0 / 4),
        };
        let chunk = input.checked_chunk_rows(
            options,
            &LinearCeConfig {
                max_chunk_bytes,
                ..*config
            },
        )?;
        let (n, v, h) = (input.rows(), input.vocab(), input.hidden_size);
        let up = |x: &[T]| cuda_result(stream.clone_htod(x));
        let hidden = up(input.hidden)?;
        let weight = up(input.weight)?;
        let bias = input.bias.map(up).transpose()?;
        let targets = super::HostTargets::upload(
            stream,
            input.labels,
            input.mask,
            input.weights,
            input.cu_seqlens,
        )?;
        let zeros = |len: usize, wanted: bool| -> Result<Option<CudaSlice<f32>>> {
            match (wanted, len) {
                (false, _) => Ok(None),
                (true, 0) => Ok(Some(stream.null::<f32>().map_err(cuda_err)?)),
                (true, len) => Ok(Some(cuda_result(stream.alloc_zeros::<f32>(len))?)),
            }
        };
        let grads = config.grads;
        // SAFETY: every chunk's rows are written by its `d hidden` GEMM, and the chunks cover every row.
        let mut d_hidden = match grads.hidden {
            true => Some(unsafe { super::loss::uninit_or_null::<T>(stream, n * h) }?),
            false => None,
        };
        let mut d_weight = zeros(v * h, grads.weight)?;
        let mut d_bias = zeros(v, grads.bias && input.bias.is_some())?;
        let device_input = LinearCeDeviceInput {
            hidden: &hidden,
            weight: &weight,
            bias: bias.as_ref().map(|b| b as &dyn DeviceRead<T>),
            hidden_size: h,
        };
        let device_targets = targets.device(LogitsShape::dense(n, v));
        let out =
            ce.with_outputs::<T>(&device_targets, options, request, false, |buffers, _| {
                let grads = LinearCeDeviceGrads {
                    hidden: d_hidden.as_mut().map(|b| b as &mut dyn DeviceWrite<T>),
                    weight: d_weight.as_mut().map(|b| b as &mut dyn DeviceWrite<f32>),
                    bias: d_bias.as_mut().map(|b| b as &mut dyn DeviceWrite<f32>),
                };
                self.compute(
                    ce,
                    &device_input,
                    &device_targets,
                    options,
                    grads,
                    buffers,
                    chunk,
                )
            })?;
        let down =
            |b: Option<CudaSlice<f32>>| b.map(|b| cuda_result(stream.clone_dtoh(&b))).transpose();
        Ok(LinearCeOutput {
            ce: out.to_host()?,
            grad_hidden: d_hidden
                .map(|b| cuda_result(stream.clone_dtoh(&b)))
                .transpose()?,
            grad_weight: down(d_weight)?,
            grad_bias: down(d_bias)?,
            chunk_rows: chunk,
        })
    }
}
