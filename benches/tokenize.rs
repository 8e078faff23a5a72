//! Tokenization alone: the fast encoder against Hugging Face `tokenizers` on the same texts, in the same
//! run. The corpus is GSM8K train (questions in the r1_zero template, and answers: what `collate` encodes)
//! with the Qwen2 tokenizer when the shared fixtures are present (`$SFT_COLLATE_SHARED`, else
//! `../shared`), otherwise `examples/sample.jsonl` with the built-in o200k_base.
//!
//! - `one_thread/*`: one core, text by text (`tokenizers`' `encode_fast`, the fast engine's `encode`),
//!   warm caches (both engines keep one); `fast_cold_cache` starts each pass from an empty cache.
//! - `all_threads/*`: both engines' batch call, on every core (rayon).
//! - `threads/N`: the fast engine on a pool of N threads, for scaling.
//! - `builtins/*`: the built-in o200k_base and cl100k_base on the same texts, one thread and all threads.
//! - `sentencepiece/*`: one core, the same texts, on the SentencePiece-style files of `tests/data/spm`
//!   (3,000-token vocabularies made as `transformers` converts Llama 2 and Gemma): `llama-legacy`, whose
//!   texts the fast engine cuts into words at `▁`, and `gemma`, whose merges cross `▁`, so that each text
//!   piece is one word on both engines.
//!
//! Throughput is in input bytes (criterion's MB/s); tokens/s per core and the cache hit rate are printed
//! to stderr. The physical limit is the CPU cores.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sft_collate::{EngineChoice, Tokenizer};

mod common;

struct Corpus {
    name: &'static str,
    source: String,
    texts: Vec<String>,
}

/// Every prompt and every output of the corpus, as separate texts (what `collate` encodes).
fn corpus() -> Corpus {
    let source = common::corpus_source();
    Corpus {
        name: source.name,
        texts: source.pairs.into_iter().flat_map(|(p, o)| [p, o]).collect(),
        source: source.tokenizer,
    }
}

/// A group over the corpus's texts, named `tokenize/{corpus}/{what}`, throughput in input bytes.
fn bench_group<'c>(
    c: &'c mut Criterion,
    corpus: &Corpus,
    what: &str,
) -> criterion::BenchmarkGroup<'c, criterion::measurement::WallTime> {
    let bytes: usize = corpus.texts.iter().map(String::len).sum();
    let mut group = c.benchmark_group(format!("tokenize/{}/{what}", corpus.name));
    group.throughput(Throughput::Bytes(bytes as u64));
    group.sample_size(10);
    group
}

/// Each text encoded in turn, on this thread.
fn encode_each(tokenizer: &Tokenizer, texts: &[&str]) {
    for t in texts {
        std::hint::black_box(tokenizer.encode(t).unwrap());
    }
}

/// `tokenizers`' ids for each text (no special tokens added), the reference every case is checked against.
fn reference_ids(hf: &tokenizers::Tokenizer, texts: &[&str]) -> Vec<Vec<u32>> {
    hf.encode_batch_fast(texts.to_vec(), false)
        .unwrap()
        .iter()
        .map(|e| e.get_ids().to_vec())
        .collect()
}

fn bench(c: &mut Criterion) {
    let corpus = corpus();
    let fast = Tokenizer::load_with(&corpus.source, EngineChoice::Fast).unwrap();
    let hf = fast.inner().unwrap().clone();
    let texts: Vec<&str> = corpus.texts.iter().map(String::as_str).collect();
    let bytes: usize = texts.iter().map(|t| t.len()).sum();
    let ids = fast.encode_batch(&texts).unwrap();
    let tokens: usize = ids.iter().map(Vec::len).sum();
    assert!(
        ids == reference_ids(&hf, &texts),
        "the engines disagree on this corpus"
    );
    eprintln!(
        "{}: {} texts, {:.2} MB, {} tokens; engine {}",
        corpus.name,
        texts.len(),
        bytes as f64 / 1e6,
        tokens,
        fast.engine()
    );

    let mut group = bench_group(c, &corpus, "one_thread");
    group.bench_function("tokenizers", |b| {
        b.iter(|| {
            for t in &texts {
                std::hint::black_box(hf.encode_fast(*t, false).unwrap());
            }
        })
    });
    let before = fast.cache_stats().unwrap();
    group.bench_function("fast", |b| b.iter(|| encode_each(&fast, &texts)));
    let after = fast.cache_stats().unwrap();
    group.bench_function("fast_cold_cache", |b| {
        b.iter_batched(
            || Tokenizer::load_with(&corpus.source, EngineChoice::Fast).unwrap(),
            |cold| encode_each(&cold, &texts),
            BatchSize::PerIteration,
        )
    });
    group.finish();
    let warm = sft_collate::tokenize::CacheStats {
        hits: after.hits - before.hits,
        misses: after.misses - before.misses,
    };
    let cold = Tokenizer::load_with(&corpus.source, EngineChoice::Fast).unwrap();
    for t in &texts {
        cold.encode(t).unwrap();
    }
    let cold = cold.cache_stats().unwrap();
    eprintln!(
        "cache hit rate: {:.2}% in one cold pass ({} hits, {} misses), {:.3}% warm",
        100.0 * cold.hit_rate(),
        cold.hits,
        cold.misses,
        100.0 * warm.hit_rate()
    );

    let mut group = bench_group(c, &corpus, "all_threads");
    group.bench_function("tokenizers", |b| {
        b.iter(|| std::hint::black_box(hf.encode_batch_fast(texts.clone(), false).unwrap()))
    });
    group.bench_function("fast", |b| {
        b.iter(|| std::hint::black_box(fast.encode_batch(&texts).unwrap()))
    });
    group.finish();

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = bench_group(c, &corpus, "threads");
    let mut n = 1;
    while n <= cores {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap();
        group.bench_function(format!("{n}"), |b| {
            b.iter(|| pool.install(|| std::hint::black_box(fast.encode_batch(&texts).unwrap())))
        });
        n = if n == cores {
            n + 1
        } else {
            (n * 2).min(cores)
        };
    }
    group.finish();
    eprintln!("tokens per pass: {tokens} (divide by a case's time for tokens/s)");
}

fn sentencepiece(c: &mut Criterion) {
    let corpus = corpus();
    let texts: Vec<&str> = corpus.texts.iter().map(String::as_str).collect();
    let mut group = bench_group(c, &corpus, "sentencepiece");
    for name in ["llama-legacy", "gemma"] {
        let path = format!("{}/tests/data/spm/{name}.json", env!("CARGO_MANIFEST_DIR"));
        let fast = Tokenizer::from_file_with(&path, EngineChoice::Fast).unwrap();
        let hf = fast.inner().unwrap().clone();
        assert!(
            fast.encode_batch(&texts).unwrap() == reference_ids(&hf, &texts),
            "{name}: the engines disagree"
        );
        eprintln!("{name}: engine {}", fast.engine());
        group.bench_function(format!("{name}/tokenizers"), |b| {
            b.iter(|| {
                for t in &texts {
                    std::hint::black_box(hf.encode_fast(*t, false).unwrap());
                }
            })
        });
        group.bench_function(format!("{name}/fast"), |b| {
            b.iter(|| encode_each(&fast, &texts))
        });
    }
    group.finish();
}

/// The built-in vocabularies (o200k_base, cl100k_base) on the same texts: one thread and all threads, the
/// fast engine only (`scripts/tokenize-peers.py --tokenizer o200k_base` times the peers on them).
fn builtins(c: &mut Criterion) {
    let corpus = corpus();
    let texts: Vec<&str> = corpus.texts.iter().map(String::as_str).collect();
    let mut group = bench_group(c, &corpus, "builtins");
    for &name in sft_collate::BUILTIN_TOKENIZERS {
        let fast = Tokenizer::builtin_with(name, EngineChoice::Fast).unwrap();
        let hf = fast.inner().unwrap();
        let ids = fast.encode_batch(&texts).unwrap();
        assert!(
            ids == reference_ids(hf, &texts),
            "{name}: the engines disagree"
        );
        let tokens: usize = ids.iter().map(Vec::len).sum();
        eprintln!("{name}: {tokens} tokens per pass");
        group.bench_function(format!("{name}/one_thread"), |b| {
            b.iter(|| encode_each(&fast, &texts))
        });
        group.bench_function(format!("{name}/all_threads"), |b| {
            b.iter(|| std::hint::black_box(fast.encode_batch(&texts).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench, sentencepiece, builtins);
criterion_main!(benches);
