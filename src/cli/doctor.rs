//! `sft-collate doctor`: what this build and this machine offer for the GPU path, and a self-check of the
//! kernels against the CPU oracle wherever they can run.

use std::path::PathBuf;

use clap::Args;
use sft_collate::{cpu, kernels, CollateSpec, Error, IdDtype, LabelFormat, PackedBatch, Result};

use super::TokenizerArgs;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Also report on this tokenizer (path or built-in name): vocabulary, pad id, and which encoder runs it.
    #[arg(long)]
    tokenizer: Option<String>,
    /// The encoder to try for --tokenizer (see `collate --help`).
    #[arg(long, value_enum, default_value_t = sft_collate::EngineChoice::Auto)]
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
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for kernel in kernels::KERNELS {
            let Some(ptx) = kernel.ptx else {
                return Err(Error::InvalidOption {
                    name: "dump-ptx",
                    reason: "this build has no prebuilt PTX".into(),
                });
            };
            let path = dir.join(format!("{}.ptx", kernel.name));
            std::fs::write(&path, ptx).map_err(|e| Error::io(&path, e))?;
            println!("  wrote {}", path.display());
        }
    }
    if let Some(name) = &args.tokenizer {
        let tokenizer = TokenizerArgs {
            tokenizer: name.clone(),
            tokenizer_engine: args.tokenizer_engine,
        }
        .load()?;
        println!(
            "tokenizer: {} (vocab {}, pad id {:?})\ntokenizer engine: {}",
            tokenizer.name(),
            tokenizer.vocab_size(),
            tokenizer.pad_id(),
            tokenizer.engine(),
        );
    }

    #[allow(unused_mut)] // Only the GPU and emulation checks add to it.
    let mut failures = 0;
    #[cfg(feature = "emulation")]
    {
        let emulated = sft_collate::emulation::EmulatedCollator::new();
        failures += report("emulation self-check", |p, s| emulated.collate(p, s));
        let ce = sft_collate::emulation::EmulatedMaskedCrossEntropy::new();
        failures += ce_report("emulation cross-entropy self-check", |input, options| {
            ce.forward_backward(input, options)
        });
    }
    #[cfg(feature = "cuda")]
    {
        failures += cuda_report();
    }
    if failures > 0 {
        return Err(Error::Cuda(format!("{failures} self-check(s) failed")));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_report() -> usize {
    use sft_collate::cuda;
    match cuda::probe(0) {
        Err(e) => {
            println!("cuda: {e}");
            0
        }
        Ok(info) => {
            println!(
                "cuda: {} (compute capability {}.{}, {:.1} GiB), driver CUDA {}.{}",
                info.name,
                info.compute_capability.0,
                info.compute_capability.1,
                info.total_memory as f64 / (1u64 << 30) as f64,
                info.driver_version.0,
                info.driver_version.1
            );
            let collator = match cuda::default_stream(0).and_then(cuda::CudaCollator::new) {
                Ok(c) => c,
                Err(e) => {
                    println!("cuda self-check: FAILED to load the kernels: {e}");
                    return 1;
                }
            };
            println!("cuda kernels: {:?}", collator.origin());
            let collate_failures =
                report("cuda self-check", |p, s| collator.collate(p, s)?.to_host());
            let ce = match cuda::default_stream(0).and_then(cuda::MaskedCrossEntropy::new) {
                Ok(ce) => ce,
                Err(e) => {
                    println!("cuda cross-entropy self-check: FAILED to load the kernels: {e}");
                    return collate_failures + 1;
                }
            };
            collate_failures
                + ce_report("cuda cross-entropy self-check", |input, options| {
                    let stream = cuda::default_stream(0)?;
                    let logits = cuda::cuda_result(stream.clone_htod(input.logits))?;
                    let sft_collate::loss::Labels::I64(labels) = input.labels else {
                        unreachable!("the self-check uses i64 labels")
                    };
                    let labels = cuda::cuda_result(stream.clone_htod(labels))?;
                    let mask: Vec<u8> = input.mask.iter().map(|&m| u8::from(m)).collect();
                    let mask = cuda::cuda_result(stream.clone_htod(&mask))?;
                    let targets = cuda::DeviceCeTargets {
                        shape: input.shape,
                        labels: cuda::DeviceLabels::I64(&labels),
                        mask: &mask,
                        weights: None,
                    };
                    ce.forward_backward(&logits, &targets, options, cuda::CeRequest::default())?
                        .to_host()
                })
        }
    }
}

/// Run the self-check batches through `backend` and print one line; 1 on failure.
#[cfg_attr(not(any(feature = "cuda", feature = "emulation")), allow(dead_code))]
fn report(
    what: &str,
    backend: impl Fn(&PackedBatch, &CollateSpec) -> Result<sft_collate::Batch>,
) -> usize {
    let mut checked = 0;
    for (packed, spec) in self_check_cases() {
        let want = cpu::collate(&packed, &spec).expect("valid case");
        match backend(&packed, &spec) {
            Ok(got) if got == want => checked += 1,
            Ok(_) => {
                println!("{what}: FAILED (differs from the CPU path on case {checked})");
                return 1;
            }
            Err(e) => {
                println!("{what}: FAILED ({e})");
                return 1;
            }
        }
    }
    println!("{what}: {checked} batches identical to the CPU path");
    0
}

/// Run one masked cross-entropy case through `backend` and compare with the f64 oracle (relative 1e-5 on
/// the loss, log-probs and gradient); 1 on failure.
#[cfg_attr(not(any(feature = "cuda", feature = "emulation")), allow(dead_code))]
fn ce_report(
    what: &str,
    backend: impl Fn(
        &sft_collate::loss::CeInput<'_, f32>,
        &sft_collate::loss::CeOptions,
    ) -> Result<sft_collate::loss::CeOutput<f32>>,
) -> usize {
    use sft_collate::loss::{CeInput, CeOptions, Labels};
    let (rows, vocab) = (6, 1237);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919) % 2003) as f32 / 100.0 - 10.0)
        .collect();
    let labels: Vec<i64> = (0..rows as i64).map(|r| r * 191 % vocab as i64).collect();
    let mask = vec![true, false, true, true, false, true];
    let input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
    let options = CeOptions::default();
    let want = cpu::loss::masked_cross_entropy(&input, &options, true).expect("valid case");
    let close = |g: f32, w: f64| (f64::from(g) - w).abs() <= 1e-5 * w.abs() + 1e-7;
    match backend(&input, &options) {
        Ok(got) => {
            let grad_ok = got.grad.as_ref().is_some_and(|g| {
                g.iter()
                    .zip(want.grad.as_ref().expect("asked for"))
                    .all(|(&g, &w)| close(g, w))
            });
            let ok = close(got.loss, want.loss)
                && got
                    .log_probs
                    .iter()
                    .zip(&want.log_probs)
                    .all(|(&g, &w)| close(g, w))
                && grad_ok;
            if ok {
                println!("{what}: loss, log-probs and gradient within 1e-5 of the f64 oracle");
                0
            } else {
                println!("{what}: FAILED (loss {} vs {})", got.loss, want.loss);
                1
            }
        }
        Err(e) => {
            println!("{what}: FAILED ({e})");
            1
        }
    }
}

/// Edge cases and a few pseudo-random batches over every option.
fn self_check_cases() -> Vec<(PackedBatch, CollateSpec)> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let mut cases = Vec::new();
    let edges = [
        PackedBatch::new(),
        PackedBatch::from_pairs([(vec![1], vec![])]),
        PackedBatch::from_pairs([(vec![], vec![2, 3, 4]), (vec![5, 6], vec![])]),
    ];
    for packed in edges {
        cases.push((
            packed,
            CollateSpec {
                pad_id: Some(0),
                ..Default::default()
            },
        ));
    }
    for i in 0..12 {
        let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..next(9))
            .map(|_| {
                let p = (0..next(40)).map(|_| next(150_000) as u32).collect();
                let o = (0..next(1500)).map(|_| next(150_000) as u32).collect();
                (p, o)
            })
            .collect();
        let spec = CollateSpec {
            pad_id: Some(next(150_000) as u32),
            pad_to_multiple_of: [None, Some(8), Some(64), Some(3)][i % 4],
            label_format: if i % 2 == 0 {
                LabelFormat::Pad
            } else {
                LabelFormat::IGNORE_INDEX
            },
            id_dtype: if i % 3 == 0 {
                IdDtype::I64
            } else {
                IdDtype::I32
            },
            attention_mask: i % 5 == 0,
            ..Default::default()
        };
        cases.push((PackedBatch::from_pairs(rows), spec));
    }
    cases
}
