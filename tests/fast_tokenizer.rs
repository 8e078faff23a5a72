//! The fast encoder against Hugging Face `tokenizers`: the same ids for every input, on the Qwen2
//! tokenizer of the fixtures, on variants of it that exercise the other supported configurations (Llama 3
//! and GPT-2 split patterns, no normalizer, normalized added tokens, `ignore_merges`), on the built-in
//! o200k_base and cl100k_base, and on SentencePiece-style files (`tests/data/spm`, Llama 2 / newer Llama /
//! Gemma as `transformers` converts them) and variants of them, and 22 real hub files when
//! `scripts/fetch-hub-tokenizers.py` has fetched them. Texts: GSM8K train and test (raw and templated), hand-written hard cases
//! (scripts, code, digit and whitespace runs, CR/LF mixes, emoji, combining marks, special-token
//! look-alikes), and random unicode (proptest).

mod common;

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sft_collate::tokenize::split_patterns::{DEEPSEEK_V3, LLAMA3, TEKKEN};
use sft_collate::tokenize::{Engine, EngineChoice};
use sft_collate::Tokenizer;

/// A tokenizer on both engines.
struct Pair {
    label: String,
    fast: Tokenizer,
    reference: tokenizers::Tokenizer,
}

impl Pair {
    fn file(label: &str, path: &Path) -> Pair {
        let fast = Tokenizer::from_file_with(path, EngineChoice::Fast)
            .unwrap_or_else(|e| panic!("{label}: fast engine refused it: {e}"));
        assert_eq!(fast.engine().name(), "fast");
        Pair {
            label: label.to_string(),
            fast,
            reference: tokenizers::Tokenizer::from_file(path).unwrap(),
        }
    }

    fn builtin(name: &str) -> Pair {
        Pair {
            label: name.to_string(),
            fast: Tokenizer::builtin_with(name, EngineChoice::Fast).unwrap(),
            reference: sft_collate::tokenize::builtin_tokenizer(name).unwrap(),
        }
    }

    fn reference_ids(&self, texts: &[&str]) -> Vec<Vec<u32>> {
        self.reference
            .encode_batch_fast(texts.to_vec(), false)
            .unwrap()
            .iter()
            .map(|e| e.get_ids().to_vec())
            .collect()
    }

    /// Panics with the first text whose ids differ, shown escaped, and both id lists.
    fn check(&self, texts: &[&str]) {
        let got = self.fast.encode_batch(texts).unwrap();
        let flat = self.fast.encode_batch_flat(texts).unwrap();
        assert!(
            flat.iter().eq(got.iter().map(Vec::as_slice)),
            "{}: encode_batch_flat differs from encode_batch",
            self.label
        );
        let want = self.reference_ids(texts);
        for ((text, g), w) in texts.iter().zip(&got).zip(&want) {
            assert!(
                g == w,
                "{}: ids differ for {:?}\n fast:       {:?}\n tokenizers: {:?}",
                self.label,
                text,
                g,
                w
            );
        }
    }

    /// The same as `check`, for proptest.
    fn agree(&self, text: &str) -> Result<(), TestCaseError> {
        let got = self.fast.encode(text).unwrap();
        let want = self.reference_ids(&[text]).pop().unwrap();
        prop_assert_eq!(got, want, "{}: {:?}", self.label, text);
        Ok(())
    }
}

/// Hand-written texts for the places split patterns and BPE go wrong.
fn hard_cases() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "a",
        "Hello, world!",
        "  leading and trailing  ",
        "I'm here, you're there, he'll go, she'd say, they've been, it's it'S IT'S",
        "'s 's' ''s '''",
        "don\u{2019}t can\u{2019}t",
        "It'ſ long-s: 'ſ 'S 'ﬅ 'ẞ 'ß",
        "1234567890 12 123 1234 12345 3.14159 1,000,000 0x1F -42 +7",
        "٣٤٥ ١٢ 一二三 ⅫⅣ ½ ²³ ①②",
        "\t\ttabs\tand  spaces   \u{a0}nbsp\u{2003}em\u{3000}ideographic",
        "line1\nline2\r\nline3\rline4\n\n\nline5\r\n\r\n  \n \n",
        "trailing spaces   \n   ",
        "   ",
        "\n",
        "\r\n",
        " \r\n \t \n",
        "x\u{85}y\u{2028}z\u{2029}w\u{b}v\u{c}u",
        "中文文本，包含标点符号。日本語のテキスト、カタカナとひらがな。한국어 텍스트입니다.",
        "العربية نص مع أرقام ١٢٣ and mixed English",
        "हिन्दी पाठ देवनागरी लिपि में है। संस्कृतम्",
        "Русский текст с ЗАГЛАВНЫМИ буквами и ёЁ. Українська: їЇ ґҐ",
        "Ελληνικά: ΑΒΓ αβγ ΣΊΣΥΦΟΣ σίσυφος",
        "emoji 😀😃😄 👩‍👩‍👧‍👦 🏳️‍🌈 ❤️ 👍🏽 flags 🇺🇸🇯🇵",
        "combining: e\u{301} a\u{300}\u{316} n\u{303} \u{301}alone Z\u{36b}\u{343}a\u{33e}l\u{357}g\u{349}o",
        "NFC vs NFD: \u{e9} e\u{301} \u{212b} A\u{30a} \u{1e9b}\u{323}",
        "Hangul jamo: \u{1100}\u{1161}\u{11a8} vs \u{ac01}",
        "<|endoftext|>",
        "before<|endoftext|>after",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|<|endoftext|>|><|im_start|<|im_end|>",
        "< |endoftext| > <|endoftext <|EndOfText|> <|fim_prefix|>",
        "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
        "def f(x):\n\tif x >= 0 and x != 1:\n\t\treturn x ** 2  # square\n\treturn None\n",
        "<div class=\"a\">&nbsp;&lt;tag&gt;</div> /* comment */ // path/to/file.rs a//b ///c",
        "$$\\frac{a}{b} + \\sqrt{x^2}$$ \\begin{align} x &= 1 \\\\ \\end{align}",
        "URL: https://example.com/path?q=1&r=2#frag mail@example.org",
        "CamelCaseWords HTTPServer iPhone XMLHttpRequest ABCdef abcDEF",
        "MixedÄÖÜäöüßẞ ÀÉÎÕÜ àéîõü Œœ Ǆǅǆ ǲ",
        "!!!??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
        " !a  !b   !c \n!d \r\n!e",
        "a\u{0}b\u{1}c\u{7f}d\u{9f}e",
        "\u{feff}BOM and \u{200b}zero\u{200c}width\u{200d}joiners",
        "𝒜𝒷𝒸 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚 𐍈 𓀀 \u{10ffff}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Long runs: digits, whitespace, one letter, one CJK character, marks, punctuation.
    v.push("9".repeat(1000));
    v.push(" ".repeat(500) + "x");
    v.push("\n".repeat(300) + " \r\n".repeat(100).as_str());
    v.push("a".repeat(5000));
    v.push("ab".repeat(2000) + " " + &"xyz".repeat(1000));
    v.push("字".repeat(700));
    v.push("e\u{301}".repeat(300));
    v.push("!?".repeat(800));
    v.push("A".repeat(300) + &"b".repeat(300));
    v
}

fn gsm8k_texts(shared: &Path) -> Vec<String> {
    let template =
        std::fs::read_to_string(shared.join("fixtures/gsm8k/r1_zero.prompt")).unwrap_or_default();
    let mut texts = Vec::new();
    for split in ["train", "test"] {
        let path = shared.join(format!("fixtures/gsm8k/{split}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let q = row["question"].as_str().unwrap_or_default();
            let a = row["answer"].as_str().unwrap_or_default();
            texts.push(template.replace("{question}", q));
            texts.push(a.to_string());
        }
    }
    texts
}

/// The Qwen2 file with its JSON changed by `edit`, written to `dir`.
fn variant(
    shared: &Path,
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let path = shared.join("fixtures/qwen2/tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut json);
    let out = dir.join(format!("{name}.json"));
    std::fs::write(&out, serde_json::to_string(&json).unwrap()).unwrap();
    out
}

fn split_then_byte_level(regex: &str, use_regex: bool) -> serde_json::Value {
    serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex}
    ]})
}

/// GPT-2's byte-level alphabet: the printable character each byte is written as.
fn gpt2_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// A change to the Qwen2 file's JSON.
type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

/// Every tokenizer configuration the fast engine claims, on both engines. `None` without the fixtures.
fn all_pairs(test: &str, dir: &Path) -> Option<Vec<Pair>> {
    let shared = common::shared_dir(test)?;
    let qwen2 = shared.join("fixtures/qwen2/tokenizer.json");
    let mut pairs = vec![
        Pair::file("qwen2", &qwen2),
        Pair::builtin("o200k_base"),
        Pair::builtin("cl100k_base"),
    ];
    let variants: Vec<(&str, Edit)> = vec![
        (
            "llama3-split",
            Box::new(|j| j["pre_tokenizer"] = split_then_byte_level(LLAMA3, false)),
        ),
        (
            // Compiled, not hand-written: Mistral's Tekken pattern, and DeepSeek-V3's three in turn.
            "tekken-split",
            Box::new(|j| j["pre_tokenizer"] = split_then_byte_level(TEKKEN, false)),
        ),
        (
            "deepseek-v3-splits",
            Box::new(|j| {
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
                j["pre_tokenizer"] =
                    serde_json::json!({"type": "Sequence", "pretokenizers": steps});
                j["normalizer"] = serde_json::Value::Null;
            }),
        ),
        (
            "gpt2-byte-level",
            Box::new(|j| {
                j["pre_tokenizer"] = serde_json::json!({"type": "ByteLevel",
                    "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
                j["normalizer"] = serde_json::Value::Null;
            }),
        ),
        (
            // Split with Removed and invert: the matches are the pieces, the rest is dropped (here
            // whitespace and punctuation, which no alternative matches).
            "letters-digits-removed-inverted",
            Box::new(|j| {
                j["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": r"\p{L}+| ?\p{N}{1,3}"}, "behavior": "Removed",
                        "invert": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                        "use_regex": false}
                ]})
            }),
        ),
        (
            "llama3-split+gpt2-regex",
            Box::new(|j| j["pre_tokenizer"] = split_then_byte_level(LLAMA3, true)),
        ),
        (
            "qwen2-ignore-merges-no-nfc-normalized-added",
            Box::new(|j| {
                j["model"]["ignore_merges"] = true.into();
                j["normalizer"] = serde_json::Value::Null;
                for t in j["added_tokens"].as_array_mut().unwrap() {
                    t["normalized"] = true.into();
                }
            }),
        ),
        (
            "qwen2-nfc-normalized-added",
            Box::new(|j| {
                for t in j["added_tokens"]
                    .as_array_mut()
                    .unwrap()
                    .iter_mut()
                    .step_by(2)
                {
                    t["normalized"] = true.into();
                }
            }),
        ),
        (
            // As `transformers`' converters write Qwen and GPT-2 files: empty strings, not absent keys.
            "qwen2-empty-subword-prefix-and-suffix",
            Box::new(|j| {
                j["model"]["continuing_subword_prefix"] = "".into();
                j["model"]["end_of_word_suffix"] = "".into();
            }),
        ),
        (
            // As GPT-NeoX / Pythia: no tokens for the bytes UTF-8 never uses (nor merges of them). The
            // vocabulary shrinks, so `tokenizers` numbers the added tokens from its new size.
            "qwen2-without-non-utf8-bytes",
            Box::new(|j| {
                let alphabet = gpt2_alphabet();
                let gone: Vec<char> = [0xC0u8, 0xC1]
                    .into_iter()
                    .chain(0xF5..=0xFF)
                    .map(|b| alphabet[b as usize])
                    .collect();
                let has_gone = |t: &str| t.chars().any(|c| gone.contains(&c));
                let vocab = j["model"]["vocab"].as_object_mut().unwrap();
                vocab.retain(|token, _| !has_gone(token));
                j["model"]["merges"].as_array_mut().unwrap().retain(|m| {
                    !m.as_array()
                        .unwrap()
                        .iter()
                        .any(|t| has_gone(t.as_str().unwrap()))
                });
            }),
        ),
        (
            // Normalizers other than NFC, in front of byte-level BPE.
            "qwen2-nfkc-lowercase-strip",
            Box::new(|j| {
                j["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
                    {"type": "NFKC"}, {"type": "Lowercase"},
                    {"type": "Strip", "strip_left": true, "strip_right": false}]});
            }),
        ),
        (
            "qwen2-nfkd-stripaccents-replace-prepend",
            Box::new(|j| {
                j["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
                    {"type": "NFKD"}, {"type": "StripAccents"},
                    {"type": "Replace", "pattern": {"String": "  "}, "content": "\t"},
                    {"type": "Prepend", "prepend": " "}]});
            }),
        ),
        (
            // A file from before "type" was written: the model is a BPE because it has merges.
            "qwen2-model-without-type",
            Box::new(|j| {
                j["model"].as_object_mut().unwrap().remove("type");
            }),
        ),
        (
            // Hand-edited ids: `tokenizers` ignores them and numbers the added tokens itself.
            "qwen2-added-ids-as-written-by-hand",
            Box::new(|j| {
                for (k, t) in j["added_tokens"]
                    .as_array_mut()
                    .unwrap()
                    .iter_mut()
                    .enumerate()
                {
                    t["id"] = (200_000 + 7 * k).into();
                }
            }),
        ),
    ];
    for (name, edit) in variants {
        let path = variant(&shared, dir, name, edit);
        pairs.push(Pair::file(name, &path));
    }
    pairs.extend(sentencepiece_pairs(dir));
    // `Digits` on cl100k_base's vocabulary (Qwen2's has no multi-digit tokens, so it cannot tell single
    // digits from runs): as Command R writes it, single digits then ByteLevel with its regex; and runs
    // of digits before a Split.
    let cl100k: serde_json::Value = serde_json::from_str(
        &sft_collate::tokenize::builtin_tokenizer("cl100k_base")
            .unwrap()
            .to_string(false)
            .unwrap(),
    )
    .unwrap();
    let byte_level = |use_regex: bool| {
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": use_regex})
    };
    for (name, steps) in [
        (
            "cl100k-digits-then-byte-level",
            vec![
                serde_json::json!({"type": "Digits", "individual_digits": true}),
                byte_level(true),
            ],
        ),
        (
            "cl100k-digit-runs-then-llama3-split",
            vec![
                serde_json::json!({"type": "Digits", "individual_digits": false}),
                serde_json::json!({"type": "Split", "pattern": {"Regex": LLAMA3},
                    "behavior": "Isolated", "invert": false}),
                byte_level(false),
            ],
        ),
    ] {
        let mut json = cl100k.clone();
        json["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": steps});
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        pairs.push(Pair::file(name, &path));
    }
    Some(pairs)
}

/// SentencePiece-style BPE files as `transformers`' converters write them (`scripts/make-spm-fixtures.py`):
/// Llama 2 / Mistral (legacy: `Prepend` + `Replace` normalizers), newer Llama conversions (`Metaspace`,
/// `prepend_scheme: first`), Gemma (`Replace` + a `Split` at spaces; merges that cross `▁`), and variants
/// of them for the other Metaspace settings, normalizers before it, and normalized added tokens.
fn sentencepiece_pairs(dir: &Path) -> Vec<Pair> {
    let spm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/spm");
    let mut pairs: Vec<Pair> = ["llama-legacy", "llama", "gemma"]
        .iter()
        .map(|name| Pair::file(name, &spm.join(format!("{name}.json"))))
        .collect();
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(spm.join(format!("{name}.json"))).unwrap())
            .unwrap()
    };
    let metaspace = |prepend: &str, split: bool| {
        serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": prepend,
            "split": split})
    };
    let variants: Vec<(&str, &str, Edit)> = vec![
        (
            // Gemma's vocabulary: a tab token, and no <0x09> (no character can need it).
            "spm-tab-token-without-its-byte-token",
            "llama",
            Box::new(|j| {
                let vocab = j["model"]["vocab"].as_object_mut().unwrap();
                let id = vocab.remove("<0x09>").unwrap();
                vocab.remove("\t");
                vocab.insert("\t".into(), id);
            }),
        ),
        (
            "spm-metaspace-always-split",
            "llama",
            Box::new(move |j| j["pre_tokenizer"] = metaspace("always", true)),
        ),
        (
            // As files from `tokenizers` before 0.19 write it: `add_prefix_space`, no `split` (true).
            "spm-metaspace-old-fields",
            "llama",
            Box::new(|j| {
                j["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁",
                    "add_prefix_space": true});
            }),
        ),
        (
            "spm-metaspace-never-after-digits",
            "llama",
            Box::new(move |j| {
                j["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, metaspace("never", false)]});
            }),
        ),
        (
            "spm-digits-then-metaspace-first",
            "llama",
            Box::new(move |j| {
                j["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": false}, metaspace("first", false)]});
            }),
        ),
        (
            "spm-nfkc-lowercase-metaspace-first",
            "llama",
            Box::new(|j| {
                j["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
                    {"type": "NFKC"}, {"type": "Lowercase"}]});
            }),
        ),
        (
            "spm-legacy-normalized-added-tokens",
            "llama-legacy",
            Box::new(|j| {
                for t in j["added_tokens"].as_array_mut().unwrap() {
                    t["normalized"] = true.into();
                }
            }),
        ),
        (
            "spm-gemma-strip-nfd-stripaccents",
            "gemma",
            Box::new(|j| {
                j["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
                    {"type": "Strip", "strip_left": true, "strip_right": true}, {"type": "NFD"},
                    {"type": "StripAccents"}, j["normalizer"].clone()]});
            }),
        ),
    ];
    for (name, base, edit) in variants {
        let mut json = read(base);
        edit(&mut json);
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        pairs.push(Pair::file(name, &path));
    }
    pairs
}

#[test]
fn same_ids_as_tokenizers_on_gsm8k_and_hard_cases() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pairs) = all_pairs("same_ids_as_tokenizers_on_gsm8k_and_hard_cases", dir.path())
    else {
        return;
    };
    let shared = common::shared_dir("gsm8k").unwrap();
    let gsm8k = gsm8k_texts(&shared);
    let hard = hard_cases();
    for pair in &pairs {
        let texts: Vec<&str> = hard.iter().map(String::as_str).collect();
        pair.check(&texts);
        // GSM8K on Qwen2 and the built-ins in full; a slice on the variants (the same code paths).
        let n = if pair.label.contains('-') {
            2000
        } else {
            gsm8k.len()
        };
        let texts: Vec<&str> = gsm8k.iter().take(n).map(String::as_str).collect();
        pair.check(&texts);
        let stats = pair.fast.cache_stats().unwrap();
        assert!(
            stats.hits > 0 && stats.misses > 0,
            "{}: {stats:?}",
            pair.label
        );
    }
}

/// Characters chosen to sit on every class boundary the split patterns draw, and some anything-goes.
fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::sample::select(
            " \t\n\r\u{b}\u{c}\u{85}\u{a0}\u{2028}\u{3000}'\"/!?.,-_0123456789aAsStTrReEvVmMlLdDſKzZ"
                .chars()
                .collect::<Vec<_>>()
        ),
        2 => prop::sample::select(
            "éÉßẞǅǲΣσςЖжё中字ー々〆ㅎ가ﾊ٣١²½Ⅻ①\u{301}\u{300}\u{20dd}\u{93f}\u{94d}😀👍🏽\u{200d}\u{fe0f}🇺\u{feff}\u{200b}<|>"
                .chars()
                .collect::<Vec<_>>()
        ),
        1 => any::<char>(),
    ]
}

/// Random texts: characters on the split patterns' class boundaries, any characters, and fragments of
/// special tokens and contractions glued together.
fn random_texts() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(tricky_char(), 0..40).prop_map(|c| c.into_iter().collect::<String>()),
        prop::collection::vec(any::<char>(), 0..30).prop_map(|c| c.into_iter().collect::<String>()),
        prop::collection::vec(
            prop::sample::select(vec![
                "<|endoftext|>",
                "<|im_start|>",
                "<|",
                "|>",
                "endoftext",
                "'s",
                "'LL",
                " ",
                "\n",
                "\r\n",
                "x",
                "ſ",
                "12345",
                "é",
                "e\u{301}",
                "中",
                "  ",
                "!",
            ]),
            0..12
        )
        .prop_map(|p| p.concat()),
    ]
}

#[test]
fn same_ids_as_tokenizers_on_random_unicode() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pairs) = all_pairs("same_ids_as_tokenizers_on_random_unicode", dir.path()) else {
        return;
    };
    for pair in &pairs {
        let mut runner = TestRunner::new(Config::with_cases(1500));
        runner
            .run(&random_texts(), |text| pair.agree(&text))
            .unwrap();
    }
}

/// The real hub files `scripts/fetch-hub-tokenizers.py` fetches (its `PACKAGES`), every one of them
/// served by the fast engine.
const HUB_FILES: &[&str] = &[
    "llama2",
    "llama3",
    "llama3_1",
    "llama3_2",
    "gpt2",
    "gpt3",
    "gpt4",
    "gpt4o",
    "claude",
    "gemma",
    "gemma2",
    "gemma3",
    "mistral_nemo",
    "qwen1_5",
    "qwen2_5",
    "qwen3",
    "deepseek_v3",
    "command_r_plus",
    "yi",
    "baichuan2",
    "internlm2",
    "chatglm3",
];

/// Where the fetched hub files are (`$SFT_COLLATE_HUB_TOKENIZERS`, else `target/hub-tokenizers`), or
/// `None` after saying how to fetch them. Not a shared fixture: a machine that cannot reach the npm
/// registry skips, CI included.
fn hub_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("SFT_COLLATE_HUB_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/hub-tokenizers"));
    if dir.join("SOURCES.md").is_file() {
        return Some(dir);
    }
    eprintln!(
        "SKIPPED {test}: no hub tokenizer files at {} (python3 scripts/fetch-hub-tokenizers.py fetches them)",
        dir.display()
    );
    None
}

#[test]
fn same_ids_as_tokenizers_on_hub_files() {
    let test = "same_ids_as_tokenizers_on_hub_files";
    let Some(dir) = hub_dir(test) else {
        return;
    };
    let Some(shared) = common::shared_dir(test) else {
        return;
    };
    let hard = hard_cases();
    let hard: Vec<&str> = hard.iter().map(String::as_str).collect();
    let gsm8k = gsm8k_texts(&shared);
    let gsm8k: Vec<&str> = gsm8k.iter().take(1000).map(String::as_str).collect();
    let mut missing = Vec::new();
    for name in HUB_FILES {
        let path = dir.join(name).join("tokenizer.json");
        if !path.is_file() {
            missing.push(*name);
            continue;
        }
        // What a user gets by default: the fast engine, not the fallback.
        let auto = Tokenizer::from_file(&path).unwrap();
        assert_eq!(auto.engine().name(), "fast", "{name}: {:?}", auto.engine());
        let pair = Pair::file(name, &path);
        pair.check(&hard);
        pair.check(&gsm8k);
        let mut runner = TestRunner::new(Config::with_cases(300));
        runner
            .run(&random_texts(), |text| pair.agree(&text))
            .unwrap();
    }
    // The script fetched some and not others (the registry went away half-way): say which were left out.
    assert!(
        missing.is_empty(),
        "{test}: {missing:?} missing from {} (run python3 scripts/fetch-hub-tokenizers.py again)",
        dir.display()
    );
}

#[test]
fn engine_choice_is_visible_and_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let Some(shared) = common::shared_dir("engine_choice_is_visible_and_falls_back") else {
        return;
    };
    let qwen2 = shared.join("fixtures/qwen2/tokenizer.json");
    let auto = Tokenizer::from_file(&qwen2).unwrap();
    assert!(
        matches!(auto.engine(), Engine::Fast { .. }),
        "{}",
        auto.engine()
    );
    let asked = Tokenizer::from_file_with(&qwen2, EngineChoice::Tokenizers).unwrap();
    assert_eq!(asked.engine().name(), "tokenizers");
    assert_eq!(asked.pad_id(), auto.pad_id());
    assert_eq!(asked.vocab_size(), auto.vocab_size());
    for id in [0u32, 220, 151_643, 151_644, 9_999] {
        assert_eq!(asked.token_text(id), auto.token_text(id), "token {id}");
    }
    assert_eq!(
        asked.token_to_id("Ġthe"),
        auto.token_to_id("Ġthe"),
        "vocabulary strings"
    );

    // The built-ins agree on the things collation asks of a tokenizer besides ids.
    for name in sft_collate::BUILTIN_TOKENIZERS {
        let fast = Tokenizer::builtin_with(name, EngineChoice::Fast).unwrap();
        let slow = Tokenizer::builtin_with(name, EngineChoice::Tokenizers).unwrap();
        assert_eq!(fast.vocab_size(), slow.vocab_size(), "{name}");
        assert_eq!(fast.pad_id(), slow.pad_id(), "{name}");
        for id in [0u32, 100, 1_000, 50_000, fast.pad_id().unwrap()] {
            assert_eq!(
                fast.token_text(id),
                slow.token_text(id),
                "{name} token {id}"
            );
        }
    }

    // An unknown split regex: the fast engine refuses, auto falls back and says why.
    let odd = variant(&shared, dir.path(), "odd", |j| {
        j["pre_tokenizer"] = split_then_byte_level(r"\w+|\s+|[^\w\s]+", false)
    });
    let err = Tokenizer::from_file_with(&odd, EngineChoice::Fast).unwrap_err();
    assert!(
        err.to_string().contains(r"split regex") && err.to_string().contains(r"the escape \w"),
        "{err}"
    );
    let fallback = Tokenizer::from_file(&odd).unwrap();
    match fallback.engine() {
        Engine::Tokenizers { reason } => assert!(reason.starts_with("fallback:"), "{reason}"),
        other => panic!("expected the fallback, got {other}"),
    }
    let text = "Fallback still encodes: 12 apples";
    let want = tokenizers::Tokenizer::from_file(&odd)
        .unwrap()
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(fallback.encode(text).unwrap(), want);

    // An id far beyond the vocabulary (a corrupted file) is refused, not allocated for.
    let huge = variant(&shared, dir.path(), "huge-id", |j| {
        j["model"]["vocab"]["zzzz"] = 4_000_000_000u32.into();
    });
    let err = Tokenizer::from_file_with(&huge, EngineChoice::Fast).unwrap_err();
    assert!(err.to_string().contains("token id 4000000000"), "{err}");

    // A non-byte-level model (WordLevel) is refused with its reason.
    let wordlevel = dir.path().join("wordlevel.json");
    std::fs::write(
        &wordlevel,
        r#"{"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},
           "post_processor":null,"decoder":null,"truncation":null,"padding":null,
           "model":{"type":"WordLevel","vocab":{"[UNK]":0,"hi":1},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let err = Tokenizer::from_file_with(&wordlevel, EngineChoice::Fast).unwrap_err();
    assert!(err.to_string().contains("fast engine"), "{err}");
    let wl = Tokenizer::from_file(&wordlevel).unwrap();
    assert_eq!(wl.engine().name(), "tokenizers");
    assert_eq!(wl.encode("hi there").unwrap(), vec![1, 0]);
    assert!(wl
        .engine()
        .to_string()
        .contains("model WordLevel (only BPE)"));

    // A Unigram model (T5, ALBERT, XLNet; its vocabulary a list of [token, score]): named as such, not
    // as the JSON shape the fast engine's reader stopped at.
    let unigram = dir.path().join("unigram.json");
    std::fs::write(
        &unigram,
        r#"{"version":"1.0","added_tokens":[],"normalizer":null,
           "pre_tokenizer":{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true},
           "post_processor":null,"decoder":null,"truncation":null,"padding":null,
           "model":{"type":"Unigram","unk_id":0,"byte_fallback":false,
                    "vocab":[["<unk>",0.0],["▁hi",-1.0],["▁",-2.0],["h",-3.0],["i",-3.0]]}}"#,
    )
    .unwrap();
    let uni = Tokenizer::from_file(&unigram).unwrap();
    assert_eq!(
        uni.engine().to_string(),
        "tokenizers (fallback: model Unigram (only BPE))"
    );
    assert_eq!(uni.encode("hi").unwrap(), vec![1]);

    // SentencePiece-style files: the token texts and ids collation asks for agree with `tokenizers`'
    // vocabulary; and each construct outside the fast path is named.
    let spm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/spm/llama-legacy.json");
    let fast = Tokenizer::from_file_with(&spm, EngineChoice::Fast).unwrap();
    let slow = tokenizers::Tokenizer::from_file(&spm).unwrap();
    assert_eq!(fast.vocab_size(), slow.get_vocab_size(true));
    for (token, id) in slow.get_vocab(true) {
        assert_eq!(fast.token_to_id(&token), Some(id), "{token:?}");
    }
    assert_eq!(fast.token_text(slow.token_to_id("<0x41>").unwrap()), "A");
    assert_eq!(fast.token_text(slow.token_to_id("▁the").unwrap()), " the");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spm).unwrap()).unwrap();
    let refused: Vec<(&str, Edit, &str)> = vec![
        (
            "spm-without-byte-fallback",
            Box::new(|j| j["model"]["byte_fallback"] = false.into()),
            "without byte_fallback",
        ),
        (
            "spm-missing-byte-token",
            Box::new(|j| {
                j["model"]["vocab"]
                    .as_object_mut()
                    .unwrap()
                    .remove("<0x7F>");
            }),
            "<0x7F>",
        ),
        (
            "spm-strip-then-metaspace-first",
            Box::new(|j| {
                j["normalizer"] = serde_json::json!({"type": "Strip", "strip_left": true,
                    "strip_right": true});
                j["pre_tokenizer"] = serde_json::json!({"type": "Metaspace",
                    "replacement": "▁", "prepend_scheme": "first", "split": false});
            }),
            "prepend_scheme first after a normalizer",
        ),
        (
            "spm-regex-replace",
            Box::new(|j| {
                j["normalizer"] = serde_json::json!({"type": "Replace",
                    "pattern": {"Regex": " {2,}"}, "content": "▁"});
            }),
            "normalizer Replace of",
        ),
    ];
    for (name, edit, why) in refused {
        let mut json = json.clone();
        edit(&mut json);
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        let err = Tokenizer::from_file_with(&path, EngineChoice::Fast).unwrap_err();
        assert!(err.to_string().contains(why), "{name}: {err}");
        let fallback = Tokenizer::from_file(&path).unwrap();
        let want = tokenizers::Tokenizer::from_file(&path)
            .unwrap()
            .encode(text, false)
            .unwrap();
        assert_eq!(fallback.encode(text).unwrap(), want.get_ids(), "{name}");
    }
}

#[test]
fn caches_survive_alternating_tokenizers() {
    let a = Tokenizer::builtin_with("o200k_base", EngineChoice::Fast).unwrap();
    let b = Tokenizer::builtin_with("cl100k_base", EngineChoice::Fast).unwrap();
    let text =
        "Alternating tokenizers on one thread keep their own caches: 12345 apples, 678 pears.";
    let first = a.encode(text).unwrap();
    let misses = a.cache_stats().unwrap().misses;
    assert!(misses > 0);
    b.encode(text).unwrap();
    // Back on the first one: the same ids, and every pre-token a hit this time.
    assert_eq!(a.encode(text).unwrap(), first);
    assert_eq!(a.cache_stats().unwrap().misses, misses);
    assert_ne!(
        first,
        b.encode(text).unwrap(),
        "two vocabularies, two encodings"
    );
}

/// Every word counts once: a hit (a one-byte word needs no lookup) or a miss (merged, then cached).
#[test]
fn cache_counts_every_word_once() {
    let tokenizer = Tokenizer::builtin_with("o200k_base", EngineChoice::Fast).unwrap();
    let counts = || {
        let s = tokenizer.cache_stats().unwrap();
        (s.hits, s.misses)
    };
    // o200k's words: "a", " ab", " ab", " ab", "!".
    tokenizer.encode("a ab ab ab!").unwrap();
    assert_eq!(counts(), (4, 1));
    tokenizer.encode("a ab ab ab!").unwrap();
    assert_eq!(counts(), (9, 1));
}

/// `encode_batch_flat` holds what `encode_batch` gives, text by text, on both engines, on one thread (one
/// buffer, no join) and on several (runs of texts joined), with empty texts at the ends and between.
#[test]
fn flat_batches_hold_each_texts_ids() {
    let mut texts: Vec<String> = vec![String::new()];
    texts.extend(hard_cases());
    texts.push(String::new());
    texts.extend(hard_cases().into_iter().rev());
    texts.push(String::new());
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    for engine in [EngineChoice::Fast, EngineChoice::Tokenizers] {
        let tokenizer = Tokenizer::builtin_with("o200k_base", engine).unwrap();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for n in [0, 1, 2, 7, texts.len()] {
                let (flat, each) = pool.install(|| {
                    (
                        tokenizer.encode_batch_flat(&texts[..n]).unwrap(),
                        tokenizer.encode_batch(&texts[..n]).unwrap(),
                    )
                });
                let label = format!("{engine:?}, {threads} threads, {n} texts");
                assert_eq!(flat.len(), n, "{label}");
                assert_eq!(flat.offsets().len(), n + 1, "{label}");
                assert_eq!(flat.offsets()[n], flat.ids().len(), "{label}");
                for (i, ids) in each.iter().enumerate() {
                    assert_eq!(flat.get(i), Some(&ids[..]), "{label}: text {i}");
                }
                assert_eq!(flat.get(n), None, "{label}");
            }
        }
    }
}
