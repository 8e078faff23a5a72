//! The fast encoder and Hugging Face `tokenizers` must give the same ids for any valid UTF-8 text.
//!
//! Tokenizers: the built-in o200k_base and cl100k_base, and the fixtures' Qwen2 when
//! `$SFT_COLLATE_SHARED` (else `../shared` beside the crate) has it.
//!
//!     cargo +nightly fuzz run fast_vs_tokenizers -- -max_total_time=300
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
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
        let shared = std::env::var_os("SFT_COLLATE_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
        let qwen2 = shared.join("fixtures/qwen2/tokenizer.json");
        if qwen2.exists() {
            pairs.push(Pair {
                fast: Tokenizer::from_file_with(&qwen2, EngineChoice::Fast).unwrap(),
                reference: tokenizers::Tokenizer::from_file(&qwen2).unwrap(),
            });
        } else {
            eprintln!(
                "fixtures not found at {}: fuzzing the built-ins only",
                shared.display()
            );
        }
        pairs
    })
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
