//! Where collation and the cross-entropy run. [`Device`] is the one place that chooses (`auto`, `cpu`,
//! `cuda`, `cuda:N`, `emulated`) and the one interface every backend is used through:
//!
//! | backend | what runs | results |
//! | --- | --- | --- |
//! | [`cpu`] | the oracle: the contract written position by position, f64 losses | host |
//! | `cuda` (feature `cuda`) | the kernels of `kernels/*.cu` on a GPU, on a stream | device, [`Placed::to_host`] |
//! | `emulation` (feature `emulation`) | the same `.cu` compiled as C++, on CPU threads | host |
//!
//! The kernels' arguments and launch shapes are written once, in [`abi`], for both kernel backends.
//!
//! ```
//! use sft_collate::{CollateSpec, Device, DeviceChoice, RaggedBatch};
//! // `auto` takes GPU 0 when one is usable, else the CPU, and says why.
//! let device = Device::new(DeviceChoice::Auto)?;
//! println!("collating on {}", device.description());
//! let batch = RaggedBatch::from_pairs([(vec![1, 2], vec![3, 4])]);
//! let spec = CollateSpec { pad_id: Some(0), ..Default::default() };
//! let tensors = device.collate(&batch, &spec)?.to_host()?;
//! assert_eq!(tensors.response_mask, [false, true, true]);
//! # Ok::<(), sft_collate::Error>(())
//! ```

pub mod abi;
pub mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emulation")]
pub mod emulation;

use std::fmt;
use std::str::FromStr;

use crate::collate::{Batch, CollateSpec, Pack};
use crate::loss::{CeInput, CeOptions, CeOutput, CeRequest, LogitElem};
use crate::{Error, RaggedBatch, Result};

/// A device as users write it: `auto`, `cpu`, `cuda` (= `cuda:0`), `cuda:N` or `emulated`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// GPU 0 when it is usable (driver, device and kernels), else the CPU; [`Device::fallback`] says why.
    #[default]
    Auto,
    /// The CPU oracle.
    Cpu,
    /// The CUDA kernels on GPU N.
    Cuda(usize),
    /// The CUDA kernels run by the CPU emulator (slow; for checking).
    Emulated,
}

impl DeviceChoice {
    /// The forms [`FromStr`] takes, for help texts.
    pub const NAMES: &'static [&'static str] = &["auto", "cpu", "cuda", "cuda:N", "emulated"];
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidOption {
            name: "device",
            reason: format!("{s:?} is not one of: auto, cpu, cuda, cuda:N, emulated"),
        };
        Ok(match s {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            "cuda" => DeviceChoice::Cuda(0),
            "emulated" => DeviceChoice::Emulated,
            _ => DeviceChoice::Cuda(
                s.strip_prefix("cuda:")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(bad)?,
            ),
        })
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Emulated => f.write_str("emulated"),
        }
    }
}

/// Which backend a [`Device`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Emulated,
}

crate::names::named_enum!(DeviceKind as "device" {
    Cpu = "cpu",
    Cuda = "cuda",
    Emulated = "emulated",
});

/// Which kernel computes the cross-entropy's forward+backward on a GPU (and on the emulator, which runs
/// the same kernels). The forward alone reads each row once on every kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CeRowKernel {
    /// One block per row; the row is read twice (statistics, then the gradient, the second read from L2
    /// when it is still there). Every architecture.
    #[default]
    TwoPass,
    /// One read of each row (`kernels/masked_ce_cluster.cu`): a thread-block cluster of up to 8 CTAs holds
    /// the row in shared memory, at most `smem_per_cta` bytes each (`None`: as much as the device allows
    /// a block; the emulator then assumes an H100's 227 KiB), and writes the gradient from there. On GPUs
    /// before sm_90 (no clusters) and for rows that do not fit, the two-pass kernel runs. Checked
    /// against the oracle on the emulator; on a GPU it has not yet run here (docs/gpu-results.md).
    OneRead { smem_per_cta: Option<usize> },
}

/// A device, chosen once, that collates and computes the cross-entropy. Every backend gives the same
/// results (bit for bit for collation; within the documented tolerances for the loss).
pub struct Device {
    backend: Backend,
    description: String,
    fallback: Option<String>,
}

enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::CudaDevice>),
    #[cfg(feature = "emulation")]
    Emulated(emulation::Emulator),
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("kind", &self.kind())
            .field("description", &self.description)
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl Device {
    /// The device for `choice`. `Auto` never fails: without a usable GPU it is the CPU, and
    /// [`Device::fallback`] says why.
    pub fn new(choice: DeviceChoice) -> Result<Device> {
        match choice {
            DeviceChoice::Cpu => Ok(Device::cpu()),
            DeviceChoice::Cuda(ordinal) => Self::cuda_or_error(ordinal),
            DeviceChoice::Emulated => Self::emulated_or_error(),
            DeviceChoice::Auto => Ok(Self::cuda_or_error(0).unwrap_or_else(|e| Device {
                fallback: Some(e.to_string()),
                ..Device::cpu()
            })),
        }
    }

    /// The CPU oracle.
    pub fn cpu() -> Device {
        Device {
            backend: Backend::Cpu,
            description: "cpu".into(),
            fallback: None,
        }
    }

    /// The emulator (feature `emulation`).
    #[cfg(feature = "emulation")]
    pub fn emulated() -> Device {
        Device {
            backend: Backend::Emulated(emulation::Emulator::new()),
            description: "emulated (CUDA kernels on CPU threads)".into(),
            fallback: None,
        }
    }

    /// This device with `kernel` for the cross-entropy's forward+backward (CUDA and the emulator; the CPU
    /// oracle has no kernels and ignores it).
    pub fn with_ce_row_kernel(mut self, kernel: CeRowKernel) -> Device {
        match &mut self.backend {
            Backend::Cpu => {
                let _ = kernel; // the oracle has no kernels
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(device) => device.set_ce_row_kernel(kernel),
            #[cfg(feature = "emulation")]
            Backend::Emulated(emulator) => emulator.ce_row_kernel = kernel,
        }
        self
    }

    /// GPU `ordinal` on its default stream, with the collation kernels loaded (so a device that cannot
    /// run them is an error here, not at the first batch).
    #[cfg(feature = "cuda")]
    pub fn cuda(ordinal: usize) -> Result<Device> {
        let info = cuda::probe(ordinal)?;
        let device = cuda::CudaDevice::new(cuda::default_stream(ordinal)?)?;
        device.collator()?;
        Ok(Device {
            backend: Backend::Cuda(Box::new(device)),
            description: format!(
                "cuda:{ordinal} ({}, compute capability {}.{})",
                info.name, info.compute_capability.0, info.compute_capability.1
            ),
            fallback: None,
        })
    }

    /// The CUDA kernels on the caller's stream (a trainer's own): every copy and launch goes there.
    #[cfg(feature = "cuda")]
    pub fn cuda_on_stream(stream: std::sync::Arc<cuda::CudaStream>) -> Result<Device> {
        let ordinal = stream.context().ordinal();
        let device = cuda::CudaDevice::new(stream)?;
        Ok(Device {
            backend: Backend::Cuda(Box::new(device)),
            description: format!("cuda:{ordinal} (caller's stream)"),
            fallback: None,
        })
    }

    fn cuda_or_error(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        return Device::cuda(ordinal);
        #[cfg(not(feature = "cuda"))]
        Err(Error::NoDevice(format!(
            "cuda:{ordinal}: this build has no CUDA backend (cargo feature `cuda`)"
        )))
    }

    fn emulated_or_error() -> Result<Device> {
        #[cfg(feature = "emulation")]
        return Ok(Device::emulated());
        #[cfg(not(feature = "emulation"))]
        Err(Error::NoDevice(
            "emulated: this build has no emulator (cargo feature `emulation`)".into(),
        ))
    }

    /// Which backend this is.
    pub fn kind(&self) -> DeviceKind {
        match &self.backend {
            Backend::Cpu => DeviceKind::Cpu,
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => DeviceKind::Cuda,
            #[cfg(feature = "emulation")]
            Backend::Emulated(_) => DeviceKind::Emulated,
        }
    }

    /// A line for humans: the backend and, for a GPU, its name and compute capability.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Why `auto` is not on a GPU, when it is not.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// The CUDA device behind this one (its stream and kernels), for device-resident work.
    #[cfg(feature = "cuda")]
    pub fn as_cuda(&self) -> Option<&cuda::CudaDevice> {
        match &self.backend {
            Backend::Cuda(device) => Some(device),
            _ => None,
        }
    }

    /// Pad, shift and mask `batch` into padded tensors. On CUDA the result stays on the device (one copy
    /// of the ragged batch up, one launch, no host synchronization).
    pub fn collate(&self, batch: &RaggedBatch, spec: &CollateSpec) -> Result<Placed<Batch>> {
        Ok(match &self.backend {
            Backend::Cpu => Placed::Host(cpu::collate(batch, spec)?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(device) => Placed::Device(device.collator()?.collate(batch, spec)?),
            #[cfg(feature = "emulation")]
            Backend::Emulated(emulator) => Placed::Host(emulator.collate(batch, spec)?),
        })
    }

    /// The padding-free layout of `batch`, every row a document (see [`Pack`]).
    pub fn collate_pack(&self, batch: &RaggedBatch, spec: &CollateSpec) -> Result<Placed<Pack>> {
        Ok(match &self.backend {
            Backend::Cpu => Placed::Host(cpu::collate_pack(batch, spec)?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(device) => Placed::Device(device.collator()?.collate_pack(batch, spec)?),
            #[cfg(feature = "emulation")]
            Backend::Emulated(emulator) => Placed::Host(emulator.collate_pack(batch, spec)?),
        })
    }

    /// The masked cross-entropy of host logits: the loss, sum, count, the requested per-token outputs
    /// and, with `with_grad`, `d loss / d logits`. The CPU computes it in f64 and rounds once; the kernels
    /// compute it in f32. On CUDA the inputs are copied up and the results stay on the device.
    pub fn cross_entropy<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        options: &CeOptions,
        request: CeRequest,
        with_grad: bool,
    ) -> Result<Placed<CeOutput<T>>> {
        Ok(match &self.backend {
            Backend::Cpu => Placed::Host(
                cpu::loss::masked_cross_entropy(input, options, with_grad)?.to_output(request),
            ),
            #[cfg(feature = "cuda")]
            Backend::Cuda(device) => {
                Placed::Device(device.cross_entropy(input, options, request, with_grad)?)
            }
            #[cfg(feature = "emulation")]
            Backend::Emulated(emulator) => {
                let grad = match with_grad {
                    true => emulation::Grad::Separate,
                    false => emulation::Grad::None,
                };
                Placed::Host(emulator.cross_entropy(input, options, request, grad)?)
            }
        })
    }

    /// The fused linear cross-entropy of host inputs (see [`crate::loss::linear`]): the loss of
    /// `hidden · weightᵀ + bias` and the gradients `config` asks for, one chunk of logits at a time. The
    /// CPU is the oracle (unfused, f64, the whole `[N, V]` logits: small shapes); the emulator runs the
    /// chunked path with the cross-entropy kernel and CPU GEMMs; CUDA the same with cuBLAS GEMMs
    /// (cargo feature `cublas`, on by default; without it, [`Error::Unsupported`]). Not yet run on a
    /// GPU: see `docs/gpu-results.md`.
    pub fn linear_cross_entropy<T: LogitElem>(
        &self,
        input: &crate::loss::linear::LinearCeInput<'_, T>,
        options: &CeOptions,
        request: CeRequest,
        config: &crate::loss::linear::LinearCeConfig,
    ) -> Result<crate::loss::linear::LinearCeOutput<T>> {
        match &self.backend {
            Backend::Cpu => {
                // The oracle runs unfused, but refuses the configurations every backend refuses.
                config.validate()?;
                Ok(
                    cpu::linear::linear_cross_entropy(input, options, config.grads)?
                        .to_output(request),
                )
            }
            #[cfg(feature = "cublas")]
            Backend::Cuda(cuda) => cuda.linear_cross_entropy(input, options, request, config),
            #[cfg(all(feature = "cuda", not(feature = "cublas")))]
            Backend::Cuda(_) => Err(Error::Unsupported(
                "the fused linear cross-entropy on CUDA needs cuBLAS: this build lacks the cargo \
                 feature `cublas`"
                    .into(),
            )),
            #[cfg(feature = "emulation")]
            Backend::Emulated(emulator) => {
                emulator.linear_cross_entropy(input, options, request, config)
            }
        }
    }

    /// The cross-entropy of a vocabulary split over the ranks of `comm` (see [`crate::loss::parallel`]):
    /// `input` holds this rank's columns `shard.start..` of `shard.vocab`, and every rank passes the
    /// same rows, labels, mask, weights and options. Every rank gets the whole vocabulary's outputs and
    /// loss, and the gradient of its own columns. The CPU computes it in f64; the emulator and CUDA run
    /// the partials and gradient kernels (`masked_ce_shard_{fwd,bwd}_*`) around the same exchanges, so
    /// ranks on any backend form one group. Host inputs and outputs (the exchange goes through the host:
    /// on CUDA the partials' copy back synchronizes the stream).
    pub fn vocab_parallel_cross_entropy<T: LogitElem>(
        &self,
        input: &CeInput<'_, T>,
        shard: crate::loss::parallel::VocabShard,
        options: &CeOptions,
        request: CeRequest,
        comm: &dyn crate::loss::parallel::Communicator,
        with_grad: bool,
    ) -> Result<CeOutput<T>> {
        match &self.backend {
            Backend::Cpu => Ok(cpu::loss::vocab_parallel_cross_entropy(
                input, shard, options, comm, with_grad,
            )?
            .to_output(request)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(device) => device
                .masked_cross_entropy()?
                .vocab_parallel(input, shard, options, request, comm, with_grad),
            #[cfg(feature = "emulation")]
            Backend::Emulated(emulator) => emulator
                .vocab_parallel_cross_entropy(input, shard, options, request, comm, with_grad),
        }
    }
}

/// Copying a device result back to the host.
pub trait ToHost {
    /// The host form.
    type Host;
    /// Copy back (this synchronizes the device's stream).
    fn to_host(&self) -> Result<Self::Host>;
}

/// A result type that has a device form.
pub trait Placeable: Sized {
    /// What a device backend returns in its place.
    type OnDevice: ToHost<Host = Self>;
}

/// A result where the backend left it: on the host (CPU, emulator) or on the device (CUDA).
#[derive(Debug)]
pub enum Placed<T: Placeable> {
    Host(T),
    Device(T::OnDevice),
}

impl<T: Placeable> Placed<T> {
    /// The result on the host: as it is, or copied back (synchronizing the device's stream).
    pub fn to_host(self) -> Result<T> {
        match self {
            Placed::Host(t) => Ok(t),
            Placed::Device(d) => d.to_host(),
        }
    }
}

/// The device form of results in a build without a device backend: it cannot be made.
#[derive(Debug)]
pub struct NoDevice<T>(std::convert::Infallible, std::marker::PhantomData<T>);

impl<T> ToHost for NoDevice<T> {
    type Host = T;
    fn to_host(&self) -> Result<T> {
        match self.0 {}
    }
}

#[cfg(feature = "cuda")]
mod placed {
    use super::{cuda, Placeable};
    use crate::collate::{Batch, Pack};
    use crate::loss::{CeOutput, LogitElem};

    impl Placeable for Batch {
        type OnDevice = cuda::DeviceBatch;
    }
    impl Placeable for Pack {
        type OnDevice = cuda::DevicePack;
    }
    impl<T: LogitElem> Placeable for CeOutput<T> {
        type OnDevice = cuda::DeviceCeOutput<T>;
    }
}

#[cfg(not(feature = "cuda"))]
mod placed {
    use super::{NoDevice, Placeable};
    use crate::collate::{Batch, Pack};
    use crate::loss::{CeOutput, LogitElem};

    impl Placeable for Batch {
        type OnDevice = NoDevice<Batch>;
    }
    impl Placeable for Pack {
        type OnDevice = NoDevice<Pack>;
    }
    impl<T: LogitElem> Placeable for CeOutput<T> {
        type OnDevice = NoDevice<CeOutput<T>>;
    }
}
