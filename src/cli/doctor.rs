//! `sft-collate doctor`: what this build and this machine offer for the GPU path, and a self-check of the
//! kernels against the CPU oracle on every device present ([`sft_collate::backend::check`]).

use std::path::PathBuf;

use clap::Args;
use sft_collate::backend::check::{present_devices, self_check};
use sft_collate::{kernels, Error, Result};

use super::TokenizerArgs;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Also report on this tokenizer (path or built-in name): vocabulary, pad id, and which encoder runs it.
    #[arg(long)]
    tokenizer: Option<String>,
    /// The encoder to try for --tokenizer (see `collate --help`).
    #[arg(long, default_value = "auto")]
    tokenizer_engine: sft_collate::EngineChoice,
    /// Write the embedded PTX of every kernel family to DIR (for ptxas reports).
    #[arg(long, value_name = "DIR")]
    dump_ptx: Option<PathBuf>,
}

pub fn run(args: DoctorArgs) -> Result<()> {
    println!("sft-collate {}", env!("CARGO_PKG_VERSION"));
    println!(
        "features: cuda={} emulation={}",
        cfg!(feature = "cuda"),
        cfg!(feature = "emulation")
    );
    match kernels::NVRTC_VERSION {
        Some((major, minor)) => println!(
            "kernels: prebuilt PTX for {} by NVRTC {major}.{minor} ({} families)",
            kernels::PTX_ARCH,
            kernels::KERNELS.len()
        ),
        None => println!(
            "kernels: no prebuilt PTX (NVRTC was not found at build time); compiled at first use"
        ),
    }
    if let Some(dir) = &args.dump_ptx {
        for path in kernels::dump_ptx(dir)? {
            println!("  wrote {}", path.display());
        }
    }
    match sft_collate::Tokenizer::load_cache() {
        Some(cache) => println!(
            "load cache: {} ({} entries, {:.1} MB; SFT_COLLATE_CACHE=off turns it off)",
            cache.dir.display(),
            cache.entries,
            cache.bytes as f64 / 1e6
        ),
        None => println!("load cache: off"),
    }
    if let Some(name) = &args.tokenizer {
        let started = std::time::Instant::now();
        let tokenizer = TokenizerArgs {
            tokenizer: name.clone(),
            tokenizer_engine: args.tokenizer_engine,
        }
        .load()?;
        let loaded = started.elapsed();
        println!(
            "tokenizer: {} (vocab {}, pad id {:?})\ntokenizer engine: {}",
            tokenizer.name(),
            tokenizer.vocab_size(),
            tokenizer.pad_id(),
            tokenizer.engine(),
        );
        match tokenizer.cache_use() {
            Some(cache) => println!("tokenizer load: {loaded:.1?}; load cache: {cache}"),
            None => println!("tokenizer load: {loaded:.1?}"),
        }
    }
    let mut failures = 0;
    for device in present_devices() {
        match device {
            Ok(device) => {
                println!("device: {}", device.description());
                let report = self_check(&device);
                for line in &report.lines {
                    println!("{line}");
                }
                failures += report.failures;
            }
            Err(e) => println!("device: {e}"),
        }
    }
    if failures > 0 {
        return Err(Error::Cuda(format!("{failures} self-check(s) failed")));
    }
    Ok(())
}
