//! Tokenize + collate throughput (tokens/s). On GSM8K train with the r1_zero template and the Qwen2
//! tokenizer when the shared fixtures are present (`$SFT_COLLATE_SHARED`, else `../shared`), otherwise on
//! `examples/sample.jsonl` with the built-in o200k_base. Batches of 64 rows, as the CLI's default.
//!
//! The physical limit here is CPU cores: tokenization is the whole cost (`collate_only` shows how small the
//! padding/shift/mask pass is beside it).

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sft_collate::input::{RowFormat, Template};
use sft_collate::{cpu, tokenize_and_pack, CollateSpec, PackedBatch, Tokenizer};

const BATCH: usize = 64;

struct Corpus {
    name: &'static str,
    tokenizer: Tokenizer,
    prompts: Vec<String>,
    outputs: Vec<String>,
}

fn corpus() -> Corpus {
    let shared = std::env::var_os("SFT_COLLATE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let fixtures = shared.join("fixtures");
    let (name, tokenizer, path, format) = if fixtures.join("gsm8k/train.jsonl").exists() {
        let template = std::fs::read_to_string(fixtures.join("gsm8k/r1_zero.prompt")).unwrap();
        (
            "gsm8k_train_qwen2",
            Tokenizer::from_file(fixtures.join("qwen2/tokenizer.json")).unwrap(),
            fixtures.join("gsm8k/train.jsonl"),
            RowFormat {
                output_key: "answer".into(),
                template: Some(Template::parse(&template).unwrap()),
                ..Default::default()
            },
        )
    } else {
        eprintln!("shared fixtures not found: benchmarking examples/sample.jsonl with o200k_base");
        (
            "sample_o200k",
            Tokenizer::load("o200k_base").unwrap(),
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/sample.jsonl"),
            RowFormat::default(),
        )
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let (prompts, outputs) = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format.parse_line(l).unwrap())
        .unzip();
    Corpus {
        name,
        tokenizer,
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
    let pack_all = || -> Vec<PackedBatch> {
        corpus
            .prompts
            .chunks(BATCH)
            .zip(corpus.outputs.chunks(BATCH))
            .map(|(p, o)| tokenize_and_pack(p, o, &corpus.tokenizer, &spec).unwrap())
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
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
