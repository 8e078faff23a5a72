//! The kernel sources and their prebuilt PTX, as build.rs embedded them.

/// One `kernels/*.cu` file: its self-contained source (local includes inlined) and, when NVRTC was
/// available at build time, its PTX for [`PTX_ARCH`].
#[derive(Debug)]
pub struct KernelSource {
    /// The file stem (`collate`).
    pub name: &'static str,
    /// The source, compiled at run time when there is no PTX or the driver refuses it.
    pub source: &'static str,
    /// PTX made at build time.
    pub ptx: Option<&'static str>,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The kernel family named `name`.
pub fn kernel(name: &str) -> Option<&'static KernelSource> {
    KERNELS.iter().find(|k| k.name == name)
}
