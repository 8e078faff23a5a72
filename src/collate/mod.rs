//! Collation: from a [`crate::RaggedBatch`] to the tensors a trainer takes, padded ([`Batch`]) or
//! packed padding-free ([`Pack`]).
//!
//! - [`CollateSpec`] says what the tensors look like (pad id, `max_len` and [`crate::Truncation`],
//!   `pad_to_multiple_of`, [`LabelFormat`], [`IdDtype`], attention mask).
//! - [`CollatePlan`] is what every backend checks and computes before writing an element: the resolved
//!   pad id, the shape, the statistics. A plan exists only for a valid batch and spec.
//! - [`Batch`] and [`Pack`] are the results on the host, with their safetensors form.
//!
//! The rule itself (pad, shift, the `prompt_len - 1` mask) is written once as the CPU oracle,
//! [`crate::backend::cpu::collate()`], and once as the CUDA kernel, `kernels/collate.cu`, checked against
//! it bit for bit.

mod batch;
mod plan;
mod spec;

#[cfg(any(feature = "cuda", feature = "emulation"))]
pub(crate) use batch::bool_bytes;
pub use batch::{Batch, BatchStats, IdTensor, Pack};
pub use plan::CollatePlan;
pub use spec::{CollateSpec, IdDtype, LabelFormat};

#[cfg(any(feature = "cuda", feature = "emulation"))]
pub(crate) use batch::bools_from_bytes;
