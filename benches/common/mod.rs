//! What the benches share: the corpus they tokenize, and timing a loop of GPU work.
#![allow(dead_code)] // each bench uses part of it

use std::path::PathBuf;

use sft_collate::input::{RowFormat, Template};

/// The text corpus: GSM8K train with the r1_zero template and the Qwen2 tokenizer when the shared
/// fixtures are present (`$SFT_COLLATE_SHARED`, else `../shared`), otherwise `examples/sample.jsonl`
/// with the built-in o200k_base.
pub struct CorpusSource {
    pub name: &'static str,
    /// A tokenizer.json path or a built-in name, for `Tokenizer::load_with`.
    pub tokenizer: String,
    /// (prompt, output) pairs, in file order.
    pub pairs: Vec<(String, String)>,
}

pub fn corpus_source() -> CorpusSource {
    let shared = std::env::var_os("SFT_COLLATE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let fixtures = shared.join("fixtures");
    let (name, tokenizer, path, format) = if fixtures.join("gsm8k/train.jsonl").exists() {
        let template = std::fs::read_to_string(fixtures.join("gsm8k/r1_zero.prompt")).unwrap();
        (
            "gsm8k_train_qwen2",
            fixtures.join("qwen2/tokenizer.json").display().to_string(),
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
            "o200k_base".to_string(),
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/sample.jsonl"),
            RowFormat::default(),
        )
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let pairs = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format.parse_line(l).unwrap())
        .collect();
    CorpusSource {
        name,
        tokenizer,
        pairs,
    }
}

/// `iters` calls of `f` between two synchronizations of `stream`: the time the GPU work took, for
/// criterion's `iter_custom`.
#[cfg(feature = "cuda")]
pub fn time_on_stream(
    stream: &sft_collate::backend::cuda::CudaStream,
    iters: u64,
    mut f: impl FnMut(),
) -> std::time::Duration {
    stream.synchronize().unwrap();
    let start = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    stream.synchronize().unwrap();
    start.elapsed()
}
