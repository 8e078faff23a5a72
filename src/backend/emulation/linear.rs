//! The fused linear cross-entropy on the emulator, as the CUDA path runs it: the rows a chunk at a time,
//! each chunk's logits made by a GEMM (here the CPU's, accumulating in f32 as a GPU GEMM does, the
//! result rounded to the input's dtype as a GEMM writing that dtype rounds it), the cross-entropy kernel
//! run over the chunk with the batch's counters and its gradient written over the logits, then the
//! chunk's `d hidden = G · weight` and `d weight += Gᵀ · hidden` (f32). One chunk of logits is the
//! extra memory (with a f32 copy of it and, for f16/bf16 inputs, of the weight for the CPU GEMM).

use super::loss::CeRun;
use super::{DeviceLikeBuffer, Emulator};
use crate::backend::cpu::gemm::{gemm, Mat, MatMut};
use crate::loss::linear::{LinearCeConfig, LinearCeInput, LinearCeOutput};
use crate::loss::{CeOptions, CeRequest, LogitElem};
use crate::Result;

/// `src` as f32: itself when it is f32, else widened (exactly) into `scratch`.
fn as_f32<'s, T: LogitElem>(src: &'s [T], scratch: &'s mut Vec<f32>) -> &'s [f32] {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        return bytemuck::cast_slice(src);
    }
    scratch.clear();
    scratch.extend(src.iter().map(|x| x.to_f64() as f32));
    scratch
}

pub use crate::loss::linear::linear_row_stride;

impl Emulator {
    /// The fused linear cross-entropy of `input` (see [`crate::loss::linear`]).
    pub fn linear_cross_entropy<T: LogitElem>(
        &self,
        input: &LinearCeInput<'_, T>,
        options: &CeOptions,
        request: CeRequest,
        config: &LinearCeConfig,
    ) -> Result<LinearCeOutput<T>> {
        let chunk = input.checked_chunk_rows(options, config)?;
        let (n, v, h) = (input.rows(), input.vocab(), input.hidden_size);
        let grads = config.grads;
        let backward = grads.any();
        let mut run = CeRun::start(
            self,
            &input.ce_input::<T>(&[]),
            n * v,
            options,
            request,
            backward,
        )?;
        let mut weight_f32 = Vec::new();
        let weight = as_f32(input.weight, &mut weight_f32);
        let bias: Option<Vec<f32>> = input
            .bias
            .map(|b| b.iter().map(|x| x.to_f64() as f32).collect());
        let mut grad_hidden = grads.hidden.then(|| vec![T::default(); n * h]);
        let mut grad_weight = grads.weight.then(|| vec![0f32; v * h]);
        let mut grad_bias = (grads.bias && bias.is_some()).then(|| vec![0f32; v]);
        // The chunk's logits as the kernel reads them: aligned as device memory, each row padded to 16
        // bytes so that every row takes the kernel's vector path; and a dense f32 copy for the GEMMs.
        let stride = linear_row_stride::<T>(v);
        let chunk_bytes = chunk
            .checked_mul(stride)
            .and_then(|e| e.checked_mul(std::mem::size_of::<T>()))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| crate::Error::InvalidOption {
                name: "chunk_rows",
                reason: format!("{chunk} rows of {v} logits do not fit in memory"),
            })?;
        let mut logits = DeviceLikeBuffer::zeroed(chunk_bytes);
        let mut chunk_f32 = vec![0f32; chunk * v];
        let mut hidden_f32 = Vec::new();
        let mut dh = vec![0f32; if grads.hidden { chunk * h } else { 0 }];
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let hidden = as_f32(
                &input.hidden[start * h..(start + rows) * h],
                &mut hidden_f32,
            );
            let z = &mut chunk_f32[..rows * v];
            if let Some(bias) = &bias {
                z.chunks_exact_mut(v)
                    .for_each(|row| row.copy_from_slice(bias));
            }
            let beta = if bias.is_some() { 1.0 } else { 0.0 };
            let weight_t = Mat::rows(weight, v, h).t();
            let out = MatMut {
                data: &mut *z,
                rows,
                cols: v,
            };
            gemm(1.0, Mat::rows(hidden, rows, h), weight_t, beta, out);
            let chunk_logits = logits.as_mut_slice::<T>(rows * stride);
            for (out, row) in chunk_logits.chunks_exact_mut(stride).zip(z.chunks_exact(v)) {
                out.iter_mut()
                    .zip(row)
                    .for_each(|(o, &x)| *o = T::from_f32(x));
            }
            let at = (logits.addr(), stride);
            // SAFETY: the buffer holds `rows` rows of `stride` elements with `v` logits each (the
            // gradient goes over them in place), `start + rows <= n`, and it outlives this synchronous
            // launch.
            unsafe { run.rows(start, rows, at, if backward { at } else { (0, 0) }) };
            if !backward {
                continue;
            }
            // G = d loss / d logits of the chunk, in the input's dtype as the kernel wrote it.
            let g_src = logits.as_slice::<T>(rows * stride);
            for (row, src) in z.chunks_exact_mut(v).zip(g_src.chunks_exact(stride)) {
                row.iter_mut()
                    .zip(src)
                    .for_each(|(g, x)| *g = x.to_f64() as f32);
            }
            let g = Mat::rows(&*z, rows, v);
            if let Some(grad_hidden) = &mut grad_hidden {
                let dh = &mut dh[..rows * h];
                let out = MatMut {
                    data: &mut *dh,
                    rows,
                    cols: h,
                };
                gemm(1.0, g, Mat::rows(weight, v, h), 0.0, out);
                grad_hidden[start * h..(start + rows) * h]
                    .iter_mut()
                    .zip(dh.iter())
                    .for_each(|(o, &x)| *o = T::from_f32(x));
            }
            if let Some(grad_weight) = &mut grad_weight {
                let out = MatMut {
                    data: grad_weight.as_mut_slice(),
                    rows: v,
                    cols: h,
                };
                gemm(1.0, g.t(), Mat::rows(hidden, rows, h), 1.0, out);
            }
            if let Some(grad_bias) = &mut grad_bias {
                for row in g.data.chunks_exact(v) {
                    grad_bias.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                }
            }
        }
        Ok(LinearCeOutput {
            ce: run.finish()?,
            grad_hidden,
            grad_weight,
            grad_bias,
            chunk_rows: chunk,
        })
    }
}
