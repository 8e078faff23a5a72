//! The fast encoder and Hugging Face `tokenizers` must give the same ids for any valid UTF-8 text.
//!
//! Tokenizers: the built-in o200k_base and cl100k_base, the SentencePiece-style files of `tests/data/spm`
//! (Llama 2 legacy, newer Llama, Gemma), and the fixtures' Qwen2 when
//! `$SFT_COLLATE_SHARED` (else `../shared` beside the crate) has it, also with the Llama 3, GPT-2, Tekken
//! and DeepSeek-V3 split patterns in place of its own (the last two through the pattern compiler).
//!
//!     cargo +nightly fuzz run fast_vs_tokenizers -- -max_total_time=300
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sft_collate::tokenize::split_patterns::{DEEPSEEK_V3, LLAMA3, TEKKEN};
use sft_collate::{EngineChoice, Tokenizer};

struct Pair {
    fast: Tokenizer,
    reference: tokenizers::Tokenizer,
}

fn pairs() -> &'static [Pair] {
    static PAIRS: OnceLock<Vec<Pair>> = OnceLock::new();
    PAIRS.get_or_init(|| {
        let mut pairs = Vec::new();
        for name in ["o200k_base", "cl100k_base"] {
            pairs.push(Pair {
                fast: Tokenizer::builtin_with(name, EngineChoice::Fast).unwrap(),
                reference: sft_collate::tokenize::builtin_tokenizer(name).unwrap(),
            });
        }
        // SentencePiece-style BPE as the converters write it (Llama 2 legacy, newer Llama, Gemma).
        let spm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/spm");
        for name in ["llama-legacy", "llama", "gemma"] {
            let path = spm.join(format!("{name}.json"));
            pairs.push(Pair {
                fast: Tokenizer::from_file_with(&path, EngineChoice::Fast).unwrap(),
                reference: tokenizers::Tokenizer::from_file(&path).unwrap(),
            });
        }
        let shared = std::env::var_os("SFT_COLLATE_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
        let qwen2 = shared.join("fixtures/qwen2/tokenizer.json");
        if qwen2.exists() {
            // Qwen2 as it is, and with the other split patterns the fast engine knows.
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&qwen2).unwrap()).unwrap();
            let dir = std::env::temp_dir().join(format!("sft-collate-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let variants = [
                ("qwen2", None),
                ("llama3", Some(split_then_byte_level(LLAMA3, false))),
                ("llama3+gpt2", Some(split_then_byte_level(LLAMA3, true))),
                ("tekken", Some(split_then_byte_level(TEKKEN, false))),
                ("deepseek-v3", Some(deepseek_v3())),
                (
                    "gpt2",
                    Some(
                        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                        "trim_offsets": true, "use_regex": true}),
                    ),
                ),
            ];
            for (name, pre_tokenizer) in variants {
                let mut json = json.clone();
                if let Some(p) = pre_tokenizer {
                    json["pre_tokenizer"] = p;
                }
                let path = dir.join(format!("{name}.json"));
                std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
                pairs.push(Pair {
                    fast: Tokenizer::from_file_with(&path, EngineChoice::Fast).unwrap(),
                    reference: tokenizers::Tokenizer::from_file(&path).unwrap(),
                });
            }
        } else {
            eprintln!(
                "fixtures not found at {}: fuzzing the built-ins only",
                shared.display()
            );
        }
        pairs
    })
}

/// DeepSeek-V3's three splits in turn, then ByteLevel without its regex.
fn deepseek_v3() -> serde_json::Value {
    let mut steps: Vec<serde_json::Value> = DEEPSEEK_V3
        .iter()
        .map(|regex| {
            serde_json::json!({"type": "Split", "pattern": {"Regex": regex},
                "behavior": "Isolated", "invert": false})
        })
        .collect();
    steps.push(
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": false}),
    );
    serde_json::json!({"type": "Sequence", "pretokenizers": steps})
}

fn split_then_byte_level(regex: &str, use_regex: bool) -> serde_json::Value {
    serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex}
    ]})
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for pair in pairs() {
        let got = pair.fast.encode(text).unwrap();
        let want = pair
            .reference
            .encode_fast(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(got, want, "{}: {text:?}", pair.fast.name());
    }
});
