//! The fused masked cross-entropy on a GPU: forward and forward+backward at N = 16,384 rows with
//! V = 32,000, 128,256 and 151,936 (bf16), 25%, 50% and 100% of rows masked, against the unfused baseline
//! (log-softmax written out in f32, gather, masked sum, softmax-minus-one-hot backward) in the same run,
//! and on sm_90+ the one-read forward+backward (`one_read_forward_backward`: a thread-block cluster per
//! row, the row held in shared memory). With the `cublas` feature, the fused linear cross-entropy too
//! (`linear_ce/…`: hidden states and an LM head instead of logits; the default chunk against the whole
//! logits at once).
//!
//! Throughput counts the bytes the fused kernel must move: one read of the masked rows (forward), plus one
//! write of the gradient (forward+backward). The physical limit is HBM bandwidth; time should be
//! proportional to the number of masked rows. Without a GPU the bench says so and measures nothing.

use criterion::{criterion_group, criterion_main, Criterion};

mod common;

#[cfg(feature = "cuda")]
fn masked_ce(c: &mut Criterion) {
    use criterion::Throughput;
    use sft_collate::backend::cuda;
    use sft_collate::backend::cuda::bench::{LossBench, LossCase};

    if let Err(e) = cuda::device_count() {
        eprintln!("SKIPPED masked_ce benches: {e}");
        return;
    }
    let stream = cuda::default_stream(0).expect("stream");
    let info = cuda::probe(0).expect("probe");
    let peak = cuda::bench::peak_bandwidth(&stream).expect("attributes");
    eprintln!(
        "masked_ce benches on {} (peak {:.0} GB/s)",
        info.name,
        peak / 1e9
    );
    let rows = 16_384;
    for vocab in [32_000usize, 128_256, 151_936] {
        for masked in [0.25, 0.5, 1.0] {
            let bench =
                LossBench::<half::bf16>::new(stream.clone(), rows, vocab, masked).expect("inputs");
            let mut group = c.benchmark_group(format!(
                "masked_ce/bf16/{rows}x{vocab}/masked{:.0}",
                masked * 100.0
            ));
            group.sample_size(10);
            let time = |iters: u64, f: &dyn Fn()| common::time_on_stream(&stream, iters, f);
            group.throughput(Throughput::Bytes(bench.forward_bytes() as u64));
            group.bench_function("fused_forward", |b| {
                b.iter_custom(|n| time(n, &|| bench.fused_forward().unwrap()))
            });
            if vocab == 151_936 && masked == 0.5 {
                for case in [LossCase::Entropy, LossCase::AllOptions] {
                    let name = format!("fused_forward/{}", case.name().replace([' ', ','], ""));
                    group.bench_function(name, |b| {
                        b.iter_custom(|n| time(n, &|| bench.fused_forward_case(case).unwrap()))
                    });
                }
            }
            group.bench_function("unfused_forward", |b| {
                b.iter_custom(|n| time(n, &|| drop(bench.unfused_forward().unwrap())))
            });
            group.throughput(Throughput::Bytes(bench.forward_backward_bytes() as u64));
            group.bench_function("fused_forward_backward", |b| {
                b.iter_custom(|n| time(n, &|| bench.fused_forward_backward().unwrap()))
            });
            // The one-read kernel (a cluster per row), where the device has clusters (sm_90+).
            if bench.one_read_forward_backward().is_some() {
                group.bench_function("one_read_forward_backward", |b| {
                    b.iter_custom(|n| {
                        time(n, &|| bench.one_read_forward_backward().unwrap().unwrap())
                    })
                });
            }
            group.bench_function("unfused_forward_backward", |b| {
                b.iter_custom(|n| time(n, &|| bench.unfused_forward_backward().unwrap()))
            });
            group.finish();
        }
    }
    #[cfg(feature = "cublas")]
    linear(c, &stream);
}

/// The fused linear cross-entropy at the shape of issue #14 (N = 16,384, H = 3,584, V = 151,936, bf16,
/// half the rows trained), forward+backward with `d hidden` and `d weight`: at the default chunk
/// (Liger's rule) against the unfused computation (one chunk of all N rows: the whole logits), by the
/// same code in the same run. Throughput counts the GEMMs' flops (3 GEMMs of 2·N·V·H).
#[cfg(feature = "cublas")]
fn linear(c: &mut Criterion, stream: &std::sync::Arc<sft_collate::backend::cuda::CudaStream>) {
    use criterion::Throughput;
    use sft_collate::backend::cuda::bench::LinearBench;

    let (rows, hidden, vocab) = (16_384, 3_584, 151_936);
    let mut bench = match LinearBench::<half::bf16>::new(stream.clone(), rows, hidden, vocab, 0.5) {
        Ok(bench) => bench,
        Err(e) => {
            eprintln!("SKIPPED linear benches: {e}");
            return;
        }
    };
    let chunk = bench.default_chunk();
    eprintln!(
        "linear: default chunk {chunk} rows = {:.1} MB of logits; unfused {:.1} MB ({}x)",
        bench.chunk_bytes(chunk) as f64 / 1e6,
        bench.chunk_bytes(rows) as f64 / 1e6,
        bench.chunk_bytes(rows) / bench.chunk_bytes(chunk).max(1)
    );
    let mut group = c.benchmark_group(format!("linear_ce/bf16/{rows}x{hidden}x{vocab}/masked50"));
    group.sample_size(10);
    group.throughput(Throughput::Elements((3 * 2 * rows * vocab * hidden) as u64));
    for (name, chunk) in [
        ("fused_forward_backward", chunk),
        ("unfused_forward_backward", rows),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|n| common::time_on_stream(stream, n, || bench.run(chunk).unwrap()))
        });
    }
    group.finish();
    eprintln!("linear: loss {}", bench.loss().unwrap());
}

#[cfg(not(feature = "cuda"))]
fn masked_ce(_: &mut Criterion) {
    eprintln!("SKIPPED masked_ce benches: built without the `cuda` feature");
}

criterion_group!(benches, masked_ce);
criterion_main!(benches);
