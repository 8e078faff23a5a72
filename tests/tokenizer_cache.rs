//! The load cache of the fast engine (`src/tokenize/fast/disk.rs`): a tokenizer read back from it is the
//! tokenizer read from its source — the same ids as `tokenizers` on hard texts, the same vocabulary size,
//! token ids and texts; an edited source is a new entry; a damaged entry is ignored and written again;
//! concurrent loads leave one whole entry; the most recently used entries are kept; a cache that is off
//! or cannot be written changes nothing but the time.
//!
//! One test, alone in its binary, because the cache is chosen by an environment variable.

mod common;

use std::path::{Path, PathBuf};

use sft_collate::{CacheUse, Tokenizer};

const TEXTS: &[&str] = &[
    "Hello world! How are you?",
    "  leading spaces\tand\ttabs\r\nCRLF lines\n\n\nand blank ones  ",
    "Numbers 1234567 and 3.14159, dates 2026-12-01, ids #A7f9.",
    "Émile a mangé 12 crêpes à Paris ; Größe, naïve, ﬁnance, Ⅻ",
    "日本語のテキスト、中文文本，한국어 텍스트 and emoji 🦀🎉👩‍👩‍👧",
    "<|endoftext|> <|im_start|>user\nhi<|im_end|> <s> </s> look-alikes <|im_sta",
    "don't can't I'M HE'S we'll they'd you're 've",
    "fn main() { println!(\"{:?}\", vec![1, 2, 3]); } // code\n    indented",
    "combining e\u{301} and a\u{30a}, zero\u{200b}width, rtl \u{5d0}\u{5d1}",
    "",
];

/// Every observable of `b` equals `a`'s, and both give `tokenizers`' ids on the texts.
fn same(a: &Tokenizer, b: &Tokenizer, what: &str) {
    assert_eq!(a.vocab_size(), b.vocab_size(), "{what}: vocab size");
    assert_eq!(a.pad_id(), b.pad_id(), "{what}: pad id");
    let hf = a.inner().unwrap();
    for text in TEXTS {
        let want = hf.encode_fast(*text, false).unwrap().get_ids().to_vec();
        assert_eq!(a.encode(text).unwrap(), want, "{what}: {text:?} (source)");
        assert_eq!(b.encode(text).unwrap(), want, "{what}: {text:?} (cache)");
    }
    for id in (0..a.vocab_size() as u32).step_by(97) {
        assert_eq!(a.token_text(id), b.token_text(id), "{what}: token {id}");
        let text = a.token_text(id);
        assert_eq!(
            a.token_to_id(&text),
            b.token_to_id(&text),
            "{what}: {text:?}"
        );
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

fn load(path: &Path) -> Tokenizer {
    Tokenizer::from_file(path).unwrap()
}

#[test]
fn a_cached_tokenizer_is_the_tokenizer() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tokenizer-cache-test");
    let _ = std::fs::remove_dir_all(&root);
    let cache = root.join("cache");
    std::fs::create_dir_all(&root).unwrap();
    std::env::set_var("SFT_COLLATE_CACHE", &cache);

    let mut sources: Vec<PathBuf> = ["llama-legacy", "llama", "gemma"]
        .iter()
        .map(|n| Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/spm/{n}.json")))
        .collect();
    if let Some(shared) = common::shared_dir("a_cached_tokenizer_is_the_tokenizer (Qwen2)") {
        let qwen2 = shared.join("fixtures/qwen2/tokenizer.json");
        // A byte-level file with a vocabulary entry outside the byte alphabet (kept aside for
        // `token_to_id`) and an added token: both survive the cache.
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&qwen2).unwrap()).unwrap();
        let size = json["model"]["vocab"].as_object().unwrap().len();
        json["model"]["vocab"]["日本"] = size.into();
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": size + 1000, "content": "<|tool|>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
        let edited = root.join("qwen2-edited.json");
        std::fs::write(&edited, serde_json::to_string(&json).unwrap()).unwrap();
        std::fs::copy(&qwen2, root.join("tokenizer.json")).unwrap();
        std::fs::copy(
            qwen2.with_file_name("tokenizer_config.json"),
            root.join("tokenizer_config.json"),
        )
        .unwrap();
        sources.extend([root.join("tokenizer.json"), edited]);
    }

    for (k, source) in sources.iter().enumerate() {
        let what = source.display().to_string();
        let first = load(source);
        let Some(CacheUse::Stored(entry)) = first.cache_use().cloned() else {
            panic!("{what}: first load {:?}", first.cache_use());
        };
        // One entry per distinct source, even for the edited Qwen2 beside the original.
        assert_eq!(files(&cache).len(), k + 1, "{what}");
        let second = load(source);
        assert_eq!(
            second.cache_use(),
            Some(&CacheUse::Hit(entry.clone())),
            "{what}"
        );
        same(&first, &second, &what);
        if what.contains("edited") {
            assert_eq!(second.token_to_id("日本"), first.token_to_id("日本"));
            assert!(second.token_to_id("日本").is_some());
            assert_eq!(
                second.encode("a<|tool|>b").unwrap(),
                first.encode("a<|tool|>b").unwrap()
            );
        }

        // Damaged entries (cut short, one byte changed, emptied, garbage) are ignored and rewritten.
        let whole = std::fs::read(&entry).unwrap();
        let mut flipped = whole.clone();
        flipped[whole.len() / 2] ^= 0x40;
        for damaged in [
            whole[..whole.len() / 3].to_vec(),
            flipped,
            Vec::new(),
            b"garbage".to_vec(),
        ] {
            std::fs::write(&entry, &damaged).unwrap();
            let again = load(source);
            assert_eq!(
                again.cache_use(),
                Some(&CacheUse::Stored(entry.clone())),
                "{what}"
            );
            same(&first, &again, &format!("{what} after damage"));
            assert_eq!(
                std::fs::read(&entry).unwrap(),
                whole,
                "{what}: rewritten whole"
            );
        }
    }

    // Several threads preparing the same file at once: each gets the tokenizer, the entry ends whole.
    let reference = load(&sources[0]);
    for entry in files(&cache) {
        std::fs::remove_file(entry).unwrap();
    }
    let loaded: Vec<Tokenizer> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| load(&sources[0]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, t) in loaded.iter().enumerate() {
        same(&reference, t, &format!("concurrent load {i}"));
    }
    let after = load(&sources[0]);
    assert!(
        matches!(after.cache_use(), Some(CacheUse::Hit(_))),
        "{:?}",
        after.cache_use()
    );
    assert_eq!(files(&cache).len(), 1, "no temporary left behind");

    // Off: nothing read or written.
    let before = files(&cache);
    std::env::set_var("SFT_COLLATE_CACHE", "off");
    let off = load(&sources[0]);
    assert_eq!(off.cache_use(), Some(&CacheUse::Off));
    assert_eq!(files(&cache), before);

    // A cache that cannot be written: the tokenizer loads all the same.
    let blocked = root.join("a-file");
    std::fs::write(&blocked, b"not a directory").unwrap();
    std::env::set_var("SFT_COLLATE_CACHE", blocked.join("cache"));
    let unwritable = load(&sources[0]);
    assert!(
        matches!(unwritable.cache_use(), Some(CacheUse::NotStored(_))),
        "{:?}",
        unwritable.cache_use()
    );
    same(&off, &unwritable, "unwritable cache");

    // The 32 most recently used entries are kept: an entry read again outlives older ones.
    let lru = root.join("lru");
    std::env::set_var("SFT_COLLATE_CACHE", &lru);
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sources[1]).unwrap()).unwrap();
    let variant = |i: usize| {
        let mut json = base.clone();
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": 100_000 + i, "content": format!("<extra_{i}>"), "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true
            }));
        let path = root.join(format!("variant-{i}.json"));
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        path
    };
    let stored = |path: &Path| match load(path).cache_use() {
        Some(CacheUse::Stored(entry)) => entry.clone(),
        other => panic!("{}: {other:?}", path.display()),
    };
    let first = variant(0);
    let kept = stored(&first);
    let early: Vec<PathBuf> = (1..=10).map(|i| stored(&variant(i))).collect();
    assert!(matches!(load(&first).cache_use(), Some(CacheUse::Hit(_))));
    for i in 11..=40 {
        stored(&variant(i));
    }
    assert_eq!(files(&lru).len(), 32);
    assert!(kept.exists(), "the entry read again is kept");
    assert!(
        early[..9].iter().all(|e| !e.exists()),
        "the oldest are gone"
    );
    assert!(early[9].exists());

    // Built-ins have no load cache.
    assert_eq!(Tokenizer::load("o200k_base").unwrap().cache_use(), None);
    std::env::remove_var("SFT_COLLATE_CACHE");
}
