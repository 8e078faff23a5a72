//! `sft-collate bench loss`: the masked cross-entropy's time, bytes moved, bandwidth and fraction of the
//! device's peak, fused and unfused ([`sft_collate::backend::cuda::bench`]); on the CPU, the oracle's time
//! for scale.

use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use sft_collate::loss::{CeInput, CeOptions, CeRequest, Labels};
use sft_collate::{Device, DeviceChoice, DeviceKind, Error, Result};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand, Debug)]
enum BenchWhat {
    /// The fused masked cross-entropy against the unfused baseline.
    Loss(BenchLossArgs),
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Args, Debug)]
struct BenchLossArgs {
    /// Rows (tokens) N.
    #[arg(long, default_value_t = 16_384)]
    rows: usize,
    /// Vocabulary size V.
    #[arg(long, default_value_t = 151_936)]
    vocab: usize,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DtypeArg,
    /// Fraction of rows masked (trained on).
    #[arg(long, default_value_t = 0.5)]
    masked: f64,
    /// cuda, cuda:N; or cpu / emulated, which time one f32 run through the same interface, for scale.
    #[arg(long, default_value = "cuda", value_parser = super::parsed::<DeviceChoice>)]
    device: DeviceChoice,
    /// Timed repetitions of each case (after one warm-up).
    #[arg(long, default_value_t = 10)]
    iters: u32,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let BenchWhat::Loss(args) = args.what;
    for (name, value) in [("rows", args.rows), ("vocab", args.vocab)] {
        if value == 0 {
            return Err(Error::InvalidOption {
                name,
                reason: "must be at least 1".into(),
            });
        }
    }
    if !(0.0..=1.0).contains(&args.masked) {
        return Err(Error::InvalidOption {
            name: "masked",
            reason: "must be in [0, 1]".into(),
        });
    }
    let device = Device::new(args.device)?;
    match device.kind() {
        DeviceKind::Cuda => cuda(&args, &device),
        _ => host(&args, &device),
    }
}

/// The interface's own call on host data, timed.
fn host(args: &BenchLossArgs, device: &Device) -> Result<()> {
    let n = args
        .rows
        .checked_mul(args.vocab)
        .ok_or(Error::InvalidOption {
            name: "rows",
            reason: "rows x vocab overflows".into(),
        })?;
    let logits: Vec<f32> = (0..n)
        .map(|i| ((i * 2_654_435_761) % 16_001) as f32 / 1000.0 - 8.0)
        .collect();
    let labels: Vec<i64> = (0..args.rows)
        .map(|r| ((r * 7919) % args.vocab) as i64)
        .collect();
    let mask: Vec<bool> = (0..args.rows)
        .map(|r| (r as f64 + 0.5) / args.rows as f64 <= args.masked)
        .collect();
    let input = CeInput::new(&logits, args.vocab, Labels::I64(&labels), &mask);
    println!(
        "device {}; {} rows x {} vocab, f32",
        device.description(),
        args.rows,
        args.vocab
    );
    for (name, grad) in [("forward", false), ("forward+backward", true)] {
        let start = Instant::now();
        for _ in 0..args.iters {
            let out =
                device.cross_entropy(&input, &CeOptions::default(), CeRequest::default(), grad)?;
            std::hint::black_box(out.to_host()?);
        }
        println!(
            "{name:<28} {:>10.3} ms",
            start.elapsed().as_secs_f64() * 1e3 / f64::from(args.iters.max(1))
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &BenchLossArgs, _: &Device) -> Result<()> {
    unreachable!("a build without CUDA has no CUDA device")
}

#[cfg(feature = "cuda")]
fn cuda(args: &BenchLossArgs, device: &Device) -> Result<()> {
    match args.dtype {
        DtypeArg::F32 => cuda_typed::<f32>(args, device),
        DtypeArg::F16 => cuda_typed::<half::f16>(args, device),
        DtypeArg::Bf16 => cuda_typed::<half::bf16>(args, device),
    }
}

#[cfg(feature = "cuda")]
fn cuda_typed<T: sft_collate::loss::LogitElem>(
    args: &BenchLossArgs,
    device: &Device,
) -> Result<()> {
    use sft_collate::backend::cuda::bench::LossBench;
    let stream = device.as_cuda().expect("a CUDA device").stream().clone();
    let bench = LossBench::<T>::new(stream, args.rows, args.vocab, args.masked)?;
    let report = bench.measure(args.iters)?;
    println!(
        "device {} (peak {:.0} GB/s); {} rows ({} masked) x {} vocab, {}",
        device.description(),
        report.peak / 1e9,
        args.rows,
        bench.masked_rows(),
        args.vocab,
        T::SUFFIX
    );
    println!(
        "bytes: forward = one read of the masked rows; forward+backward = that plus one write of the gradient"
    );
    println!(
        "{:<26} {:>10} {:>10} {:>9} {:>10}",
        "case", "time (ms)", "bytes (GB)", "GB/s", "% of peak"
    );
    let (fwd, both) = (report.forward_bytes, report.forward_backward_bytes);
    for (name, seconds, bytes) in [
        ("fused forward (lean)", report.fused_forward, fwd),
        (
            "fused forward+backward (lean)",
            report.fused_forward_backward,
            both,
        ),
        ("unfused forward", report.unfused_forward, fwd),
        (
            "unfused forward+backward",
            report.unfused_forward_backward,
            both,
        ),
    ] {
        println!(
            "{name:<26} {:>10.3} {:>10.3} {:>9.0} {:>9.1}%",
            seconds * 1e3,
            bytes / 1e9,
            bytes / seconds / 1e9,
            100.0 * bytes / seconds / report.peak
        );
    }
    match report.one_read_forward_backward {
        Some(seconds) => println!(
            "{:<26} {:>10.3} {:>10.3} {:>9.0} {:>9.1}%",
            "one-read forward+backward",
            seconds * 1e3,
            both / 1e9,
            both / seconds / 1e9,
            100.0 * both / seconds / report.peak
        ),
        None => println!(
            "one-read forward+backward: not run (needs sm_90+ clusters, and a row within 8 CTAs' shared memory)"
        ),
    }
    println!("fused, by what is asked for (forward | forward+backward):");
    for (case, forward, both_time) in &report.cases {
        println!(
            "  {:<22} {:>8.3} ms {:>6.1}% | {:>8.3} ms {:>6.1}%",
            case.name(),
            forward * 1e3,
            100.0 * fwd / forward / report.peak,
            both_time * 1e3,
            100.0 * both / both_time / report.peak
        );
    }
    println!(
        "fused speed-up over unfused: forward {:.2}x, forward+backward {:.2}x",
        report.unfused_forward / report.fused_forward,
        report.unfused_forward_backward / report.fused_forward_backward
    );
    Ok(())
}
