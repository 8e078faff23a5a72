//! [`Batch`]: the collated tensors on the host, their statistics, and their safetensors form.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::io::write_atomically;
use crate::{Error, IdDtype, Result};

/// A row-major `rows × width` tensor of token ids, in the dtype the spec asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdTensor {
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl IdTensor {
    /// The dtype of the elements.
    pub fn dtype(&self) -> IdDtype {
        match self {
            IdTensor::I32(_) => IdDtype::I32,
            IdTensor::I64(_) => IdDtype::I64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            IdTensor::I32(v) => v.len(),
            IdTensor::I64(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`, widened to `i64`.
    pub fn get(&self, i: usize) -> i64 {
        match self {
            IdTensor::I32(v) => i64::from(v[i]),
            IdTensor::I64(v) => v[i],
        }
    }

    /// All elements widened to `i64` (for tests and display; costs a copy).
    pub fn to_i64(&self) -> Vec<i64> {
        match self {
            IdTensor::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            IdTensor::I64(v) => v.clone(),
        }
    }

    /// The little-endian bytes of the elements, as safetensors stores them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            IdTensor::I32(v) => bytemuck::cast_slice(v),
            IdTensor::I64(v) => bytemuck::cast_slice(v),
        }
    }

    fn safetensors_dtype(&self) -> Dtype {
        match self {
            IdTensor::I32(_) => Dtype::I32,
            IdTensor::I64(_) => Dtype::I64,
        }
    }
}

/// Numbers about a batch, so a trainer can log them and drop rows with nothing to train on.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchStats {
    /// Number of rows.
    pub rows: usize,
    /// The tensors' width (`L - 1`, rounded up to `pad_to_multiple_of`).
    pub width: usize,
    /// Tokens in the sequences (prompt + output, after truncation), padding not counted.
    pub tokens: usize,
    /// Positions whose label is an output token (the number of true entries of `response_mask`).
    pub response_tokens: usize,
    /// Label positions that are padding, as a fraction of `rows × width`: `1 - Σ max(len_i - 1, 0) /
    /// (rows × width)`, 0 for an empty tensor.
    pub padding_fraction: f64,
    /// Rows whose `response_mask` is all false (empty output, or an output cut away by truncation). A
    /// per-row mean over them would divide by zero.
    pub empty_response_rows: Vec<usize>,
}

/// The collated tensors of one batch, row-major, all `rows × width`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `padded[:, :L-1]`: what the model sees.
    pub input_ids: IdTensor,
    /// `padded[:, 1:]`: what it should predict (`pad_id` or the ignore index where nothing is to be
    /// learned, per [`crate::LabelFormat`]).
    pub labels: IdTensor,
    /// True where the label is an output token.
    pub response_mask: Vec<bool>,
    /// True where `input_ids` holds a real token (only when the spec asks for it).
    pub attention_mask: Option<Vec<bool>>,
    /// Shape and counts.
    pub stats: BatchStats,
}

impl Batch {
    /// `(rows, width)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.stats.rows, self.stats.width)
    }

    /// `response_mask` as bytes (0 or 1 each, torch.bool's layout), without a copy.
    pub fn response_mask_bytes(&self) -> &[u8] {
        bool_bytes(&self.response_mask)
    }

    /// Serialize to the safetensors format: tensors `input_ids`, `labels` (I32 or I64), `response_mask`
    /// and, when present, `attention_mask` (BOOL), each of shape `[rows, width]`, plus the given metadata.
    pub fn to_safetensors(&self, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
        let (rows, width) = self.shape();
        let shape = vec![rows, width];
        // BOOL in safetensors is one byte per element, 0 or 1, which is exactly Rust's `bool` repr.
        let mask = bool_bytes(&self.response_mask);
        fn view<'a>(dtype: Dtype, shape: &[usize], data: &'a [u8]) -> Result<TensorView<'a>> {
            TensorView::new(dtype, shape.to_vec(), data)
                .map_err(|e| Error::Safetensors(e.to_string()))
        }
        let mut tensors = vec![
            (
                "input_ids",
                view(
                    self.input_ids.safetensors_dtype(),
                    &shape,
                    self.input_ids.as_bytes(),
                )?,
            ),
            (
                "labels",
                view(
                    self.labels.safetensors_dtype(),
                    &shape,
                    self.labels.as_bytes(),
                )?,
            ),
            ("response_mask", view(Dtype::BOOL, &shape, mask)?),
        ];
        if let Some(attention_mask) = &self.attention_mask {
            tensors.push((
                "attention_mask",
                view(Dtype::BOOL, &shape, bool_bytes(attention_mask))?,
            ));
        }
        safetensors::serialize(tensors, metadata).map_err(|e| Error::Safetensors(e.to_string()))
    }

    /// Write [`Batch::to_safetensors`] to `path` without ever leaving a partial file there: the bytes go to
    /// a temporary file beside it, which is renamed over `path` once complete.
    pub fn write_safetensors(
        &self,
        path: &Path,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<()> {
        let bytes = self.to_safetensors(metadata)?;
        write_atomically(path, &bytes)
    }
}

/// Booleans from a device mask (one byte per element), refusing any byte other than 0 or 1 instead of
/// making an invalid `bool`.
#[cfg(any(feature = "cuda", feature = "emulation"))]
pub(crate) fn bools_from_bytes(bytes: &[u8]) -> Result<Vec<bool>> {
    bytes
        .iter()
        .map(|&b| match b {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(Error::Cuda(format!("a mask byte is {other}, not 0 or 1"))),
        })
        .collect()
}

/// View a `bool` slice as bytes (each `bool` is one byte holding 0 or 1).
pub(crate) fn bool_bytes(v: &[bool]) -> &[u8] {
    // SAFETY: `bool` has size 1, alignment 1, and only the values 0 and 1, so every bool is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len()) }
}

/// One pack in the padding-free layout: all documents of the pack concatenated into a single row
/// (`[1, T]` tensors), the shift done per document, and what flash-attention's variable-length kernels
/// take: `position_ids` restarting at 0 for each document, `cu_seqlens` (`[documents + 1]`, i32) and
/// `max_seqlen`. No dense attention mask.
#[derive(Clone, Debug, PartialEq)]
pub struct Pack {
    pub input_ids: IdTensor,
    /// The next token of the same document; `pad_id` or the ignore index at each document's last token.
    pub labels: IdTensor,
    /// True where the label is a trainable (output) token of the same document.
    pub response_mask: Vec<bool>,
    pub position_ids: IdTensor,
    /// Document boundaries: document `d` is positions `cu_seqlens[d]..cu_seqlens[d + 1]`. A padded tail
    /// (`pad_to_multiple_of`) is one more segment of its own.
    pub cu_seqlens: Vec<i32>,
    /// The longest segment.
    pub max_seqlen: usize,
    /// `rows` = documents, `width` = T, `padding_fraction` = the padded tail's share of T.
    pub stats: BatchStats,
}

impl Pack {
    /// Serialize: `input_ids`, `labels`, `position_ids` (I32 or I64), `response_mask` (BOOL), all `[1, T]`;
    /// `cu_seqlens` (I32, `[documents + 1]`) and `max_seqlen` (I64 scalar).
    pub fn to_safetensors(&self, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
        let t = self.response_mask.len();
        fn view<'a>(dtype: Dtype, shape: Vec<usize>, data: &'a [u8]) -> Result<TensorView<'a>> {
            TensorView::new(dtype, shape, data).map_err(|e| Error::Safetensors(e.to_string()))
        }
        let max_seqlen = self.max_seqlen as i64;
        let tensors = vec![
            (
                "input_ids",
                view(
                    self.input_ids.safetensors_dtype(),
                    vec![1, t],
                    self.input_ids.as_bytes(),
                )?,
            ),
            (
                "labels",
                view(
                    self.labels.safetensors_dtype(),
                    vec![1, t],
                    self.labels.as_bytes(),
                )?,
            ),
            (
                "response_mask",
                view(Dtype::BOOL, vec![1, t], bool_bytes(&self.response_mask))?,
            ),
            (
                "position_ids",
                view(
                    self.position_ids.safetensors_dtype(),
                    vec![1, t],
                    self.position_ids.as_bytes(),
                )?,
            ),
            (
                "cu_seqlens",
                view(
                    Dtype::I32,
                    vec![self.cu_seqlens.len()],
                    bytemuck::cast_slice(&self.cu_seqlens),
                )?,
            ),
            (
                "max_seqlen",
                view(Dtype::I64, vec![], bytemuck::bytes_of(&max_seqlen))?,
            ),
        ];
        safetensors::serialize(tensors, metadata).map_err(|e| Error::Safetensors(e.to_string()))
    }
}
