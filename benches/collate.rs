//! Tokenize + collate throughput (tokens/s). On GSM8K train with the r1_zero template and the Qwen2
//! tokenizer when the shared fixtures are present (`$SFT_COLLATE_SHARED`, else `../shared`), otherwise on
//! `examples/sample.jsonl` with the built-in o200k_base. Batches of 64 rows, as the CLI's default.
//!
//! The physical limit here is CPU cores: tokenization is the whole cost (`collate_only` shows how small the
//! padding/shift/mask pass is beside it).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sft_collate::backend::cpu;
use sft_collate::{tokenize_pairs, CollateSpec, RaggedBatch, Tokenizer};

const BATCH: usize = 64;

mod common;

struct Corpus {
    name: &'static str,
    tokenizer: Tokenizer,
    prompts: Vec<String>,
    outputs: Vec<String>,
}

fn corpus() -> Corpus {
    let source = common::corpus_source();
    let (prompts, outputs) = source.pairs.into_iter().unzip();
    Corpus {
        name: source.name,
        tokenizer: Tokenizer::load(&source.tokenizer).unwrap(),
        prompts,
        outputs,
    }
}

fn bench(c: &mut Criterion) {
    let corpus = corpus();
    let spec = CollateSpec {
        pad_id: corpus.tokenizer.pad_id(),
        ..Default::default()
    };
    let pack_all = || -> Vec<RaggedBatch> {
        corpus
            .prompts
            .chunks(BATCH)
            .zip(corpus.outputs.chunks(BATCH))
            .map(|(p, o)| tokenize_pairs(p, o, &corpus.tokenizer, spec.limit()).unwrap())
            .collect()
    };
    let packed = pack_all();
    let tokens: usize = packed.iter().map(|p| p.tokens().len()).sum();

    let mut group = c.benchmark_group(format!("collate/{}", corpus.name));
    group.throughput(Throughput::Elements(tokens as u64));
    group.sample_size(10);
    group.bench_function("tokenize_and_collate", |b| {
        b.iter(|| {
            for p in pack_all() {
                std::hint::black_box(cpu::collate(&p, &spec).unwrap());
            }
        })
    });
    group.bench_function("collate_only", |b| {
        b.iter(|| {
            for p in &packed {
                std::hint::black_box(cpu::collate(p, &spec).unwrap());
            }
        })
    });
    // The padding-free layout of the same batches, each one pack.
    group.bench_function("pack_only", |b| {
        b.iter(|| {
            for p in &packed {
                std::hint::black_box(cpu::collate_pack(p, &spec).unwrap());
            }
        })
    });
    group.finish();
    loader(c, &corpus, &spec);
}

fn loader_rows(prompts: &[String]) -> usize {
    prompts.len()
}

/// A training loop's batch: 64 rows from a token store (memory-mapped, the rows gathered and collated on
/// the CPU, as `Loader::next_step` gives them, shuffled) against tokenizing the same 64 rows from text and
/// collating them. The store's side has no tokenization left: its cost is a gather and a copy.
fn loader(c: &mut Criterion, corpus: &Corpus, spec: &CollateSpec) {
    use sft_collate::loader::{Batching, Loader, LoaderConfig};
    use sft_collate::store::{write_store, Store, StoreConfig};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: String = corpus
        .prompts
        .iter()
        .zip(&corpus.outputs)
        .map(|(p, o)| serde_json::json!({"prompt": p, "output": o}).to_string() + "\n")
        .collect();
    std::fs::write(&input, lines).unwrap();
    let store_dir = dir.path().join("store");
    write_store(
        &StoreConfig::new(&input, &store_dir),
        &corpus.tokenizer,
        &sft_collate::dataset::Quiet,
    )
    .unwrap();
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let store_ref = store.clone();
    let mut loader = Loader::new(
        store,
        LoaderConfig {
            spec: spec.clone(),
            prefetch: 0,
            ..LoaderConfig::new(Batching::Rows(BATCH))
        },
        sft_collate::Device::cpu(),
    )
    .unwrap();
    let mut group = c.benchmark_group(format!("loader/{}", corpus.name));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("store_batch_of_64", |b| {
        b.iter(|| std::hint::black_box(loader.next_step().unwrap()))
    });
    // The two sides without the collation both share: gathering 64 rows from the store, tokenizing 64.
    let all: Vec<usize> = (0..loader_rows(&corpus.prompts)).collect();
    let mut from = 0;
    group.bench_function("store_gather_64", |b| {
        b.iter(|| {
            let rows = &all[from..(from + BATCH).min(all.len())];
            from = if from + BATCH >= all.len() {
                0
            } else {
                from + BATCH
            };
            std::hint::black_box(store_ref.ragged(rows, &spec.limit()).unwrap())
        })
    });
    // 64 rows of text at a time, round the corpus, tokenized.
    let mut at = 0;
    let mut tokenize_next = move || {
        let end = (at + BATCH).min(corpus.prompts.len());
        let ragged = tokenize_pairs(
            &corpus.prompts[at..end],
            &corpus.outputs[at..end],
            &corpus.tokenizer,
            spec.limit(),
        )
        .unwrap();
        at = if end == corpus.prompts.len() { 0 } else { end };
        ragged
    };
    group.bench_function("tokenize_64", |b| {
        b.iter(|| std::hint::black_box(tokenize_next()))
    });
    group.bench_function("text_batch_of_64", |b| {
        b.iter(|| std::hint::black_box(cpu::collate(&tokenize_next(), spec).unwrap()))
    });
    group.finish();
}

/// A synthetic batch of `rows` rows whose lengths spread over [max_len / 2, max_len] (one row exactly
/// max_len, so the width is max_len - 1), 30% prompt, ids below 150k.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn synthetic(rows: usize, max_len: usize) -> RaggedBatch {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |bound: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as usize) % bound.max(1)
    };
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..rows)
        .map(|i| {
            let len = if i == 0 {
                max_len
            } else {
                max_len / 2 + next(max_len / 2 + 1)
            };
            let prompt = len * 3 / 10;
            let ids: Vec<u32> = (0..len).map(|_| next(150_000) as u32).collect();
            (ids[..prompt].to_vec(), ids[prompt..].to_vec())
        })
        .collect();
    RaggedBatch::from_pairs(pairs)
}

/// `cuda_` cases: the kernel alone, the end-to-end path (packed host batch → device tensors) and the usual
/// path it replaces (collate padded tensors on the CPU, copy them to the GPU), for B×L from 8×512 to
/// 256×8192. Throughput counts the bytes the kernel must move: the packed input read once and the three
/// outputs written once. The physical limit is the GPU's memory bandwidth (kernel) and the PCIe/host link
/// (end to end).
#[cfg(feature = "cuda")]
fn cuda_bench(c: &mut Criterion) {
    use sft_collate::backend::cuda::{self, CudaCollator};

    if let Err(e) = cuda::device_count() {
        eprintln!("SKIPPED cuda_ benches: {e}");
        return;
    }
    let stream = cuda::default_stream(0).expect("default stream");
    let collator = CudaCollator::new(stream.clone()).expect("kernels load");
    let info = cuda::probe(0).expect("probe");
    eprintln!("cuda_ benches on {} ({:?})", info.name, collator.origin());
    let spec = CollateSpec {
        pad_id: Some(151_643),
        ..Default::default()
    };
    let time = |iters: u64, f: Box<dyn FnMut() + '_>| common::time_on_stream(&stream, iters, f);
    for (rows, max_len) in [(8usize, 512usize), (64, 2048), (256, 8192)] {
        let packed = synthetic(rows, max_len);
        let width = max_len - 1;
        let input_bytes = packed.row_offsets().len() * 8 + packed.tokens().len() * 4 + rows * 4;
        let output_bytes = rows * width * (4 + 4 + 1);
        let mut group = c.benchmark_group(format!("cuda_collate/{rows}x{max_len}"));
        group.throughput(Throughput::Bytes((input_bytes + output_bytes) as u64));
        group.sample_size(20);

        let uploaded = collator.upload(&packed).unwrap();
        group.bench_function("cuda_kernel", |b| {
            b.iter_custom(|iters| {
                time(
                    iters,
                    Box::new(|| {
                        std::hint::black_box(collator.collate_uploaded(&uploaded, &spec).unwrap());
                    }),
                )
            })
        });
        group.bench_function("cuda_end_to_end", |b| {
            b.iter_custom(|iters| {
                time(
                    iters,
                    Box::new(|| {
                        std::hint::black_box(collator.collate(&packed, &spec).unwrap());
                    }),
                )
            })
        });
        group.bench_function("cpu_collate_then_copy", |b| {
            b.iter_custom(|iters| {
                time(
                    iters,
                    Box::new(|| {
                        let batch = cpu::collate(&packed, &spec).unwrap();
                        let sft_collate::IdTensor::I32(ids) = &batch.input_ids else {
                            unreachable!()
                        };
                        let sft_collate::IdTensor::I32(labels) = &batch.labels else {
                            unreachable!()
                        };
                        std::hint::black_box((
                            stream.clone_htod(ids).unwrap(),
                            stream.clone_htod(labels).unwrap(),
                            stream.clone_htod(batch.response_mask_bytes()).unwrap(),
                        ));
                    }),
                )
            })
        });
        group.finish();
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_bench(_: &mut Criterion) {}

criterion_group!(benches, bench, cuda_bench);
criterion_main!(benches);
