//! Loading a kernel family into a context: the PTX build.rs made when there is one, else (or when the
//! driver refuses it, e.g. `CUDA_ERROR_UNSUPPORTED_PTX_VERSION` from a driver older than the NVRTC that
//! made it) a compile with NVRTC at run time for the device's own architecture, cached for the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::cuda_err;
use crate::kernels::KernelSource;
use crate::{Error, Result};

/// Where the loaded module came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleOrigin {
    /// The PTX embedded at build time, for `crate::kernels::PTX_ARCH`.
    Prebuilt,
    /// Compiled at run time for this architecture; `reason` says why the prebuilt PTX was not used.
    RuntimeCompiled { arch: String, reason: String },
}

/// Load `kernel` into `ctx`.
pub(crate) fn load(
    ctx: &Arc<CudaContext>,
    kernel: &KernelSource,
) -> Result<(Arc<CudaModule>, ModuleOrigin)> {
    let reason = match kernel.ptx {
        Some(ptx) => match ctx.load_module(Ptx::from_src(ptx)) {
            Ok(module) => return Ok((module, ModuleOrigin::Prebuilt)),
            Err(e) => format!("the driver refused the prebuilt PTX: {e}"),
        },
        None => "no PTX was built (NVRTC was not available at build time)".to_string(),
    };
    let (major, minor) = ctx.compute_capability().map_err(cuda_err)?;
    let arch = format!("compute_{major}{minor}");
    let ptx = runtime_ptx(kernel, &arch).map_err(|log| Error::KernelCompile {
        kernel: kernel.name.to_string(),
        log: format!("{log} (after: {reason})"),
    })?;
    let module = ctx.load_module(Ptx::from_src(ptx)).map_err(cuda_err)?;
    Ok((module, ModuleOrigin::RuntimeCompiled { arch, reason }))
}

/// NVRTC at run time, once per (kernel, architecture) per process.
fn runtime_ptx(kernel: &KernelSource, arch: &str) -> std::result::Result<String, String> {
    static CACHE: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (kernel.name.to_string(), arch.to_string());
    if let Some(ptx) = cache.lock().expect("cache lock").get(&key) {
        return Ok(ptx.clone());
    }
    preload_nvrtc();
    // Cudarc panics on NVRTC calls without it. These names are among those cudarc tries for any CUDA
    // version; .so.13 only when this crate does not pin cudarc to 12.8 (whose loader does not try it).
    let names: &[&str] = if cfg!(feature = "cuda-12080") {
        &["libnvrtc.so.12", "libnvrtc.so", "libnvrtc.so.11"]
    } else {
        &[
            "libnvrtc.so.12",
            "libnvrtc.so.13",
            "libnvrtc.so",
            "libnvrtc.so.11",
        ]
    };
    if !super::library_present(names) {
        return Err(
            "NVRTC (libnvrtc.so.12) not found: install nvidia-cuda-nvrtc-cu12 and point SFT_COLLATE_NVRTC \
             or LD_LIBRARY_PATH at it"
                .into(),
        );
    }
    let opts = CompileOptions {
        arch: Some(Box::leak(arch.to_string().into_boxed_str())),
        options: vec!["--std=c++17".into()],
        name: Some(format!("{}.cu", kernel.name)),
        ..Default::default()
    };
    let ptx = match cudarc::nvrtc::compile_ptx_with_opts(kernel.source, opts) {
        Ok(ptx) => ptx.to_src(),
        Err(CompileError::CompileError { log, .. }) => {
            return Err(log.to_string_lossy().into_owned())
        }
        Err(e) => return Err(e.to_string()),
    };
    cache.lock().expect("cache lock").insert(key, ptx.clone());
    Ok(ptx)
}

/// cudarc finds NVRTC by soname only; `SFT_COLLATE_NVRTC` (a path to libnvrtc.so.12 or its directory) is
/// loaded by absolute path first so that the soname lookup finds it.
fn preload_nvrtc() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Some(path) = std::env::var_os("SFT_COLLATE_NVRTC").map(std::path::PathBuf::from) else {
            return;
        };
        let path = if path.is_dir() {
            path.join("libnvrtc.so.12")
        } else {
            path
        };
        // SAFETY: loading NVRTC runs only its initializers; the handle is leaked to keep it loaded.
        if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
            std::mem::forget(lib);
        }
    });
}
