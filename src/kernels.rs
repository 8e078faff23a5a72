//! The kernel sources and their prebuilt PTX, as build.rs embedded them.

/// One `kernels/*.cu` file: its self-contained source (local includes inlined) and, when NVRTC was
/// available at build time, its PTX for `arch`.
#[derive(Debug)]
pub struct KernelSource {
    /// The file stem (`collate`).
    pub name: &'static str,
    /// The virtual architecture of its PTX: [`PTX_ARCH`], or the family's minimum where it needs a newer
    /// one (`masked_ce_cluster`: thread-block clusters, `compute_90`).
    pub arch: &'static str,
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

/// Write the embedded PTX of every kernel family to `dir` (for ptxas reports); the paths written.
pub fn dump_ptx(dir: &std::path::Path) -> crate::Result<Vec<std::path::PathBuf>> {
    use crate::Error;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::new();
    for kernel in KERNELS {
        let ptx = kernel.ptx.ok_or_else(|| Error::InvalidOption {
            name: "dump_ptx",
            reason: "this build has no prebuilt PTX".into(),
        })?;
        let path = dir.join(format!("{}.ptx", kernel.name));
        std::fs::write(&path, ptx).map_err(|e| Error::io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}
