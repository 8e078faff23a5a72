//! Choosing where collation runs: `--device auto|cpu|cuda|emulated`.

use clap::ValueEnum;
use sft_collate::{cpu, Batch, CollateSpec, PackedBatch, Result};

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The GPU when one is usable, else the CPU (the choice is said on stderr).
    Auto,
    /// The CPU path (the oracle).
    Cpu,
    /// The CUDA kernels on GPU 0.
    #[cfg(feature = "cuda")]
    Cuda,
    /// The CUDA kernels run by the CPU emulator (slow; for checking).
    #[cfg(feature = "emulation")]
    Emulated,
}

pub enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<sft_collate::cuda::CudaCollator>),
    #[cfg(feature = "emulation")]
    Emulated(sft_collate::emulation::EmulatedCollator),
}

impl Backend {
    /// The backend for `device`, and a line describing the choice.
    pub fn select(device: Device) -> Result<(Backend, String)> {
        match device {
            Device::Cpu => Ok((Backend::Cpu, "cpu".into())),
            #[cfg(feature = "emulation")]
            Device::Emulated => Ok((
                Backend::Emulated(sft_collate::emulation::EmulatedCollator::new()),
                "emulated (CUDA kernels on CPU threads)".into(),
            )),
            #[cfg(feature = "cuda")]
            Device::Cuda => cuda(),
            Device::Auto => {
                #[cfg(feature = "cuda")]
                match cuda() {
                    Ok(found) => return Ok(found),
                    Err(e) => return Ok((Backend::Cpu, format!("cpu ({e})"))),
                }
                #[allow(unreachable_code)]
                Ok((Backend::Cpu, "cpu (built without CUDA)".into()))
            }
        }
    }

    /// A short name for manifests.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => "cuda",
            #[cfg(feature = "emulation")]
            Backend::Emulated(_) => "emulated",
        }
    }

    /// Collate one pack in the padding-free layout to host tensors.
    pub fn collate_packed(
        &self,
        packed: &PackedBatch,
        spec: &CollateSpec,
    ) -> Result<sft_collate::PackedLayout> {
        match self {
            Backend::Cpu => cpu::collate_packed(packed, spec),
            #[cfg(feature = "cuda")]
            Backend::Cuda(c) => c.collate_packed(packed, spec)?.to_host(),
            #[cfg(feature = "emulation")]
            Backend::Emulated(e) => e.collate_packed(packed, spec),
        }
    }

    /// Collate one batch to host tensors.
    pub fn collate(&self, packed: &PackedBatch, spec: &CollateSpec) -> Result<Batch> {
        match self {
            Backend::Cpu => cpu::collate(packed, spec),
            #[cfg(feature = "cuda")]
            Backend::Cuda(c) => c.collate(packed, spec)?.to_host(),
            #[cfg(feature = "emulation")]
            Backend::Emulated(e) => e.collate(packed, spec),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<(Backend, String)> {
    let info = sft_collate::cuda::probe(0)?;
    let collator = sft_collate::cuda::CudaCollator::new(sft_collate::cuda::default_stream(0)?)?;
    Ok((
        Backend::Cuda(Box::new(collator)),
        format!(
            "cuda ({}, compute capability {}.{})",
            info.name, info.compute_capability.0, info.compute_capability.1
        ),
    ))
}
