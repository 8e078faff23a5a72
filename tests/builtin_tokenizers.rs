//! The built-in tokenizers are converted from tiktoken ranks; they must give exactly the ids of tiktoken's
//! own encoder (the `tiktoken-rs` crate) on varied text.

use sft_collate::{EngineChoice, Tokenizer};

/// Text meant to exercise every branch of the split patterns and the byte-level fallbacks.
fn corpus() -> Vec<String> {
    let mut texts: Vec<String> = [
        "Hello, world! How's it going? I'm fine, they'll see; we've won; you're right; she'd go.",
        "HELLO WORLD. CamelCaseWords and snake_case_words, MiXeD cAsE. O'Neil's DON'T I'LL",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
        "Numbers: 1 12 123 1234 12345 123456789012345678901234567890 3.14159 -42 1e10 0x1F",
        "    four spaces\ttab\t\ttwo tabs   trailing   \n\n\nthree newlines\r\nCRLF\rCR only  \n  ",
        "def f(x):\n    return {\"a\": [1, 2, 3], 'b': (x ** 2) // 3}  # comment\n\tif x != y: pass\n",
        "fn main() { let v: Vec<u32> = (0..10).map(|i| i * 2).collect(); println!(\"{v:?}\"); }",
        "中文文本，包括标点符号。日本語のテキスト、ひらがなとカタカナ。한국어 텍스트입니다.",
        "العربية نص مع أرقام ١٢٣ وعلامات، ترقيم؟ עברית גם כן. हिन्दी पाठ देवनागरी में। Русский текст, Ёё.",
        "Emoji: 😀😃😄 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 flags 🇫🇷🇯🇵 and ✓ ✗ ★ → ⇒ ∀x∈ℝ: x² ≥ 0",
        "Combining: e\u{301} a\u{308} n\u{303} \u{1E9B}\u{323} Zalgo: Z\u{36B}\u{343}a\u{30A}l\u{352}g\u{35C}o",
        "<|endoftext|> is special text; <|endofprompt|> too; <|fim_prefix|> <|im_start|>user",
        "Mixed   \u{a0}nbsp\u{2003}em-space\u{200b}zero-width\u{feff}bom",
        "",
        " ",
        "\n",
        "a",
        "!!!???...,,,;;;:::---___===+++***&&&%%%$$$###@@@",
        "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D",
        "https://example.com/path?query=1&b=2#frag user@example.org C:\\Windows\\System32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Long runs where the split patterns' quantifiers matter.
    texts.push("9".repeat(1000));
    texts.push(" ".repeat(300) + "x");
    texts.push("\n".repeat(50) + &" \n".repeat(50));
    texts.push("ab".repeat(500));
    // Deterministic pseudo-random unicode from assorted blocks.
    let blocks: &[(u32, u32)] = &[
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x590, 0x6FF),
        (0x900, 0x97F),
        (0x3040, 0x30FF),
        (0x4E00, 0x4FFF),
        (0xAC00, 0xACFF),
        (0x1F300, 0x1F64F),
        (0x2000, 0x206F),
    ];
    let mut state = 0x2545F4914F6CDD1Du64;
    for _ in 0..200 {
        let mut s = String::new();
        for _ in 0..40 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let (lo, hi) = blocks[(state % blocks.len() as u64) as usize];
            let c = lo + ((state >> 20) % u64::from(hi - lo + 1)) as u32;
            s.extend(char::from_u32(c));
            if state % 5 == 0 {
                s.push(' ');
            }
        }
        texts.push(s);
    }
    texts
}

fn check(name: &str, reference: tiktoken_rs::CoreBPE) {
    let ours = Tokenizer::builtin(name).unwrap();
    let corpus = corpus();
    let refs: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let got = ours.encode_batch(&refs).unwrap();
    for (text, ids) in corpus.iter().zip(&got) {
        let want = reference.encode_with_special_tokens(text);
        assert_eq!(ids, &want, "{name} differs from tiktoken on {text:?}");
    }
}

#[test]
fn o200k_base_matches_tiktoken() {
    check("o200k_base", tiktoken_rs::o200k_base().unwrap());
}

#[test]
fn cl100k_base_matches_tiktoken() {
    check("cl100k_base", tiktoken_rs::cl100k_base().unwrap());
}

/// The tables compiled in (build.rs) are tiktoken's: every rank's bytes, the special tokens, the split
/// pattern.
#[test]
fn builtins_are_tiktokens_tables() {
    assert_eq!(
        sft_collate::tokenize::split_patterns::O200K,
        tiktoken_rs::O200K_BASE_PAT_STR
    );
    for (name, reference) in [
        ("o200k_base", tiktoken_rs::o200k_base().unwrap()),
        ("cl100k_base", tiktoken_rs::cl100k_base().unwrap()),
    ] {
        let ours = Tokenizer::builtin_with(name, EngineChoice::Fast).unwrap();
        let mut ranks = 0;
        for rank in 0u32.. {
            let Ok(bytes) = reference.decode_bytes(&[rank]) else {
                break;
            };
            let text = String::from_utf8_lossy(&bytes);
            assert_eq!(ours.token_text(rank), text, "{name} rank {rank}");
            ranks += 1;
        }
        let specials = reference.special_tokens();
        assert_eq!(ours.vocab_size(), ranks + specials.len(), "{name}");
        for special in specials {
            let id = reference.encode_with_special_tokens(special)[0];
            assert_eq!(ours.token_to_id(special), Some(id), "{name} {special}");
        }
    }
}

#[test]
fn builtins_know_their_pad_token() {
    assert_eq!(
        Tokenizer::builtin("o200k_base").unwrap().pad_id(),
        Some(199999)
    );
    assert_eq!(
        Tokenizer::builtin("cl100k_base").unwrap().pad_id(),
        Some(100257)
    );
    assert!(Tokenizer::load("no_such_tokenizer").is_err());
}

mod common;

/// A realistic corpus too: every question and answer of the GSM8K test split, when the fixtures are there.
#[test]
fn builtins_match_tiktoken_on_gsm8k() {
    let Some(shared) = common::shared_dir("builtins_match_tiktoken_on_gsm8k") else {
        return;
    };
    let text = std::fs::read_to_string(shared.join("fixtures/gsm8k/test.jsonl")).unwrap();
    let mut texts = Vec::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        texts.push(row["question"].as_str().unwrap().to_string());
        texts.push(row["answer"].as_str().unwrap().to_string());
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for (name, reference) in [
        ("o200k_base", tiktoken_rs::o200k_base().unwrap()),
        ("cl100k_base", tiktoken_rs::cl100k_base().unwrap()),
    ] {
        let got = Tokenizer::builtin(name)
            .unwrap()
            .encode_batch(&refs)
            .unwrap();
        for (text, ids) in texts.iter().zip(&got) {
            assert_eq!(ids, &reference.encode_ordinary(text), "{name} on {text:?}");
        }
    }
}

/// A built-in written as a `tokenizer.json` (`to_json`) loads back on the fast engine, in `tokenizers`
/// too, and all three give the built-in's ids on the corpus.
#[test]
fn builtins_written_as_tokenizer_json_load_back() {
    let corpus = corpus();
    let refs: Vec<&str> = corpus.iter().map(String::as_str).collect();
    for &name in sft_collate::BUILTIN_TOKENIZERS {
        let builtin = Tokenizer::builtin(name).unwrap();
        let json = builtin.to_json().unwrap();
        let again = Tokenizer::from_json_str(&json, name, EngineChoice::Fast)
            .unwrap_or_else(|e| panic!("{name}'s tokenizer.json on the fast engine: {e}"));
        let hf: tokenizers::Tokenizer = json.parse().unwrap();
        let want = builtin.encode_batch(&refs).unwrap();
        assert_eq!(again.encode_batch(&refs).unwrap(), want, "{name}");
        for (text, ids) in refs.iter().zip(&want) {
            let got = hf.encode_fast(*text, false).unwrap();
            assert_eq!(got.get_ids(), &ids[..], "{name} in tokenizers on {text:?}");
        }
    }
}
