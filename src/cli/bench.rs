//! `sft-collate bench loss`: a microbenchmark of the masked cross-entropy: time, bytes moved, achieved
//! bandwidth and its fraction of the device's peak, for the fused forward and forward+backward, with the
//! unfused baseline (log-softmax written out, gather, masked sum, softmax-minus-one-hot) beside it.

use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use sft_collate::{Error, Result};

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

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum BenchDevice {
    /// The CUDA kernels on GPU 0.
    Cuda,
    /// The f64 CPU oracle (for scale only; it is not a fast path).
    Cpu,
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
    #[arg(long, value_enum, default_value = "cuda")]
    device: BenchDevice,
    /// Timed repetitions of each case (after one warm-up).
    #[arg(long, default_value_t = 10)]
    iters: u32,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let BenchWhat::Loss(args) = args.what;
    if !(0.0..=1.0).contains(&args.masked) {
        return Err(Error::InvalidOption {
            name: "masked",
            reason: "must be in [0, 1]".into(),
        });
    }
    match args.device {
        BenchDevice::Cpu => cpu(&args),
        BenchDevice::Cuda => cuda(&args),
    }
}

fn cpu(args: &BenchLossArgs) -> Result<()> {
    use sft_collate::cpu::loss::masked_cross_entropy;
    use sft_collate::loss::{CeInput, CeOptions, Labels};
    let n = args.rows * args.vocab;
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
        "device cpu (the f64 oracle; single thread); {} rows x {} vocab, f32",
        args.rows, args.vocab
    );
    for (name, grad) in [("oracle forward", false), ("oracle forward+backward", true)] {
        let start = Instant::now();
        for _ in 0..args.iters {
            std::hint::black_box(masked_cross_entropy(&input, &CeOptions::default(), grad)?);
        }
        println!(
            "{name:<28} {:>10.3} ms",
            start.elapsed().as_secs_f64() * 1e3 / f64::from(args.iters)
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &BenchLossArgs) -> Result<()> {
    Err(Error::NoDevice(
        "this build has no CUDA backend (feature `cuda`)".into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda(args: &BenchLossArgs) -> Result<()> {
    match args.dtype {
        DtypeArg::F32 => cuda_typed::<f32>(args),
        DtypeArg::F16 => cuda_typed::<half::f16>(args),
        DtypeArg::Bf16 => cuda_typed::<half::bf16>(args),
    }
}

#[cfg(feature = "cuda")]
fn cuda_typed<T: sft_collate::loss::LogitElem + cudarc::driver::DeviceRepr>(
    args: &BenchLossArgs,
) -> Result<()> {
    use sft_collate::cuda::{self, bench::LossBench};
    let info = cuda::probe(0)?;
    let stream = cuda::default_stream(0)?;
    let peak = cuda::bench::peak_bandwidth(&stream)?;
    let bench = LossBench::<T>::new(stream.clone(), args.rows, args.vocab, args.masked)?;
    println!(
        "device {} (peak {:.0} GB/s); {} rows ({} masked) x {} vocab, {}",
        info.name,
        peak / 1e9,
        args.rows,
        bench.masked_rows(),
        args.vocab,
        T::SUFFIX
    );
    println!(
        "bytes: forward = one read of the masked rows; forward+backward = that plus one write of the gradient"
    );
    let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?;
        cuda::cuda_result(stream.synchronize())?;
        let start = Instant::now();
        for _ in 0..args.iters {
            f()?;
        }
        cuda::cuda_result(stream.synchronize())?;
        Ok(start.elapsed().as_secs_f64() / f64::from(args.iters))
    };
    let fused_fwd = time(&|| bench.fused_forward())?;
    let fused_both = time(&|| bench.fused_forward_backward())?;
    let unfused_fwd = time(&|| bench.unfused_forward().map(drop))?;
    let unfused_both = time(&|| bench.unfused_forward_backward())?;
    println!(
        "{:<26} {:>10} {:>10} {:>9} {:>10}",
        "case", "time (ms)", "bytes (GB)", "GB/s", "% of peak"
    );
    for (name, seconds, bytes) in [
        ("fused forward", fused_fwd, bench.forward_bytes()),
        (
            "fused forward+backward",
            fused_both,
            bench.forward_backward_bytes(),
        ),
        ("unfused forward", unfused_fwd, bench.forward_bytes()),
        (
            "unfused forward+backward",
            unfused_both,
            bench.forward_backward_bytes(),
        ),
    ] {
        println!(
            "{name:<26} {:>10.3} {:>10.3} {:>9.0} {:>9.1}%",
            seconds * 1e3,
            bytes / 1e9,
            bytes / seconds / 1e9,
            100.0 * bytes / seconds / peak
        );
    }
    println!(
        "fused speed-up over unfused: forward {:.2}x, forward+backward {:.2}x",
        unfused_fwd / fused_fwd,
        unfused_both / fused_both
    );
    Ok(())
}
