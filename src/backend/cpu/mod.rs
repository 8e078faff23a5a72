//! The CPU backend. It is the oracle: short, obviously right, f64 wherever numbers are summed. Every
//! fast path (CUDA kernels, their emulation, the fast tokenizer) is tested against it.

pub mod collate;
pub mod gemm;
pub mod linear;
pub mod loss;

pub use collate::{collate, collate_pack};
