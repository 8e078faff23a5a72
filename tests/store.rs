//! The token store: rows read back from a store equal the rows tokenized from the text, under every
//! length limit and shard count (property test); `collate --from STORE` writes the same batch files as
//! `collate --input` (GSM8K, every layout); a store that is incomplete, mixed or damaged is a clear
//! error, never a wrong read.

mod common;

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sft_collate::dataset::{write_dataset, DatasetConfig, Layout, Quiet, Rows};
use sft_collate::input::{MessageFormat, RowFormat};
use sft_collate::schedule::{Overflow, PackSpec, PackStrategy};
use sft_collate::store::{write_store, Shard, Store, StoreConfig};
use sft_collate::{
    tokenize_rows, CollateSpec, Device, Error, LengthLimit, RaggedBatch, Tokenizer, Truncation,
};

fn tokenizer() -> Tokenizer {
    Tokenizer::load("cl100k_base").unwrap()
}

/// Conversations rendered as `{role}: {content}\n` (the prefix untrained, the content trained for the
/// assistant), pairs beside them.
fn format() -> RowFormat {
    RowFormat {
        messages: Some(
            MessageFormat::new(Some("{role}: {content}\n"), vec!["assistant".into()]).unwrap(),
        ),
        ..RowFormat::default()
    }
}

#[derive(Clone, Debug)]
enum Line {
    Pair(String, String),
    Conversation(Vec<(bool, String)>),
    Bad,
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "b", " ", "ab", "12", "é", "\n", "猫", "x y"]),
        0..8,
    )
    .prop_map(|parts| parts.concat())
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        4 => (text(), text()).prop_map(|(p, o)| Line::Pair(p, o)),
        3 => prop::collection::vec((any::<bool>(), text()), 0..5).prop_map(Line::Conversation),
        1 => Just(Line::Bad),
    ]
}

fn jsonl(lines: &[Line]) -> String {
    lines
        .iter()
        .map(|l| match l {
            Line::Pair(p, o) => serde_json::json!({"prompt": p, "output": o}).to_string(),
            Line::Conversation(m) => {
                let messages: Vec<_> = m
                    .iter()
                    .map(|(assistant, c)| {
                        let role = if *assistant { "assistant" } else { "user" };
                        serde_json::json!({"role": role, "content": c})
                    })
                    .collect();
                serde_json::json!({ "messages": messages }).to_string()
            }
            Line::Bad => "{not json".to_string(),
        } + "\n")
        .collect()
}

/// Write `lines` into a store of `shards` shards (one call per shard, as separate processes would).
fn store_of(dir: &Path, lines: &[Line], shards: usize, tokenizer: &Tokenizer) -> Store {
    let input = dir.join("in.jsonl");
    std::fs::write(&input, jsonl(lines)).unwrap();
    let store = dir.join("store");
    for index in 0..shards {
        let config = StoreConfig {
            rows: format(),
            shard: Shard::new(index, shards).unwrap(),
            skip_bad_lines: true,
            ..StoreConfig::new(&input, &store)
        };
        write_store(&config, tokenizer, &Quiet).unwrap();
    }
    Store::open(&store).unwrap()
}

/// The text rows of `lines` (bad ones skipped), tokenized under `limit`.
fn from_text(
    lines: &[Line],
    tokenizer: &Tokenizer,
    limit: LengthLimit,
) -> sft_collate::Result<RaggedBatch> {
    let f = format();
    let rows: Vec<Vec<(String, bool)>> = jsonl(lines)
        .lines()
        .filter_map(|l| f.parse_segments(l).ok())
        .collect();
    tokenize_rows(&rows, tokenizer, limit)
}

#[test]
fn rows_read_back_equal_rows_tokenized_from_text() {
    let tokenizer = tokenizer();
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let strategy = (
        prop::collection::vec(line(), 0..24),
        1usize..5,
        prop::option::of(1usize..12),
        prop::sample::select(vec![
            Truncation::Error,
            Truncation::PromptLeft,
            Truncation::OutputRight,
        ]),
    );
    runner
        .run(&strategy, |(lines, shards, max_len, truncation)| {
            let dir = tempfile::tempdir().unwrap();
            let store = store_of(dir.path(), &lines, shards, &tokenizer);
            let good = lines.iter().filter(|l| !matches!(l, Line::Bad)).count();
            prop_assert_eq!(store.len(), good);
            prop_assert_eq!(store.skipped().0, lines.len() - good);
            // Rows in input order: each row's source line rises.
            for i in 1..store.len() {
                prop_assert!(store.row(i - 1).source_row < store.row(i).source_row);
            }
            let limit = LengthLimit {
                max_len,
                truncation,
            };
            let all: Vec<usize> = (0..store.len()).collect();
            let want = from_text(&lines, &tokenizer, limit);
            let got = store.ragged(&all, &limit);
            match (want, got) {
                (Ok(want), Ok(got)) => prop_assert_eq!(got, want),
                (Err(want), Err(got)) => prop_assert_eq!(got.to_string(), want.to_string()),
                (want, got) => prop_assert!(false, "text {want:?}, store {got:?}"),
            }
            Ok(())
        })
        .unwrap();
}

/// Found by the property test: a conversation whose flags form one untrained run then one trained run
/// (empty messages) stays a conversation read back from a store, as from its text.
#[test]
fn a_conversation_shaped_like_a_pair_reads_back_as_from_text() {
    let tokenizer = tokenizer();
    let lines = vec![Line::Conversation(vec![
        (false, String::new()),
        (true, String::new()),
    ])];
    let dir = tempfile::tempdir().unwrap();
    let store = store_of(dir.path(), &lines, 1, &tokenizer);
    let limit = LengthLimit::default();
    let want = from_text(&lines, &tokenizer, limit).unwrap();
    assert!(want.trainable().is_some());
    assert_eq!(store.ragged(&[0], &limit).unwrap(), want);
}

#[test]
fn collate_from_a_store_writes_the_batches_of_the_text() {
    let Some(shared) = common::shared_dir("collate_from_a_store_writes_the_batches_of_the_text")
    else {
        return;
    };
    let f = shared.join("fixtures");
    let tokenizer = common::qwen2(&shared);
    let rows = RowFormat {
        template: Some(
            sft_collate::input::Template::parse(
                &std::fs::read_to_string(f.join("gsm8k/r1_zero.prompt")).unwrap(),
            )
            .unwrap(),
        ),
        output_key: "answer".into(),
        ..RowFormat::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let input = f.join("gsm8k/train.jsonl");
    let store_dir = dir.path().join("store");
    for index in 0..2 {
        let config = StoreConfig {
            rows: rows.clone(),
            shard: Shard::new(index, 2).unwrap(),
            ..StoreConfig::new(&input, &store_dir)
        };
        write_store(&config, &tokenizer, &Quiet).unwrap();
    }
    let store = Store::open(&store_dir).unwrap();
    assert_eq!(store.len(), 7473);
    let device = Device::cpu();
    let pack = |max_tokens, overflow| Layout::Packed {
        pack: PackSpec {
            max_tokens,
            strategy: PackStrategy::ExactFill,
            overflow,
        },
        window: 4096,
    };
    let cases = [
        (Layout::Padded { batch_size: 64 }, CollateSpec::default()),
        (
            Layout::Bucketed {
                batch_size: 32,
                window: 1024,
                seed: 7,
            },
            CollateSpec::default(),
        ),
        (pack(4096, Overflow::Error), CollateSpec::default()),
        (
            pack(512, Overflow::Truncate),
            CollateSpec {
                max_len: Some(300),
                truncation: Truncation::PromptLeft,
                ..CollateSpec::default()
            },
        ),
    ];
    for (k, (layout, spec)) in cases.into_iter().enumerate() {
        let text_out = dir.path().join(format!("text-{k}"));
        let store_out = dir.path().join(format!("store-{k}"));
        let config = |output: &Path| DatasetConfig {
            rows: rows.clone(),
            spec: spec.clone(),
            layout,
            ..DatasetConfig::new(&input, output)
        };
        let a = write_dataset(&config(&text_out), Rows::Text(&tokenizer), &device, &Quiet).unwrap();
        let b = write_dataset(&config(&store_out), Rows::Store(&store), &device, &Quiet).unwrap();
        assert_eq!(a.files, b.files, "case {k}: the manifests' file lists");
        for file in &a.files {
            let (x, y) = (
                std::fs::read(text_out.join(&file.name)).unwrap(),
                std::fs::read(store_out.join(&file.name)).unwrap(),
            );
            assert!(x == y, "case {k}: {} differs", file.name);
        }
    }
}

fn expect_store_error(dir: &Path, needle: &str) {
    match Store::open(dir) {
        Err(Error::Store { reason, .. }) => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected a store error with {needle:?}, got {other:?}"),
    }
}

#[test]
fn incomplete_mixed_or_damaged_stores_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<Line> = (0..40)
        .map(|i| Line::Pair(format!("q{i}"), format!("a{i}")))
        .collect();
    std::fs::write(&input, jsonl(&lines)).unwrap();
    let write = |store: &Path, shard: Shard, tokenizer: &Tokenizer, overwrite: bool| {
        let config = StoreConfig {
            rows: format(),
            shard,
            overwrite,
            ..StoreConfig::new(&input, store)
        };
        write_store(&config, tokenizer, &Quiet)
    };
    let cl100k = tokenizer();
    let o200k = Tokenizer::load("o200k_base").unwrap();
    // Not a store at all: nothing there, a file (the JSONL itself, say), an empty directory.
    expect_store_error(&dir.path().join("nothing"), "no such directory");
    expect_store_error(&input, "a file, not a store");
    expect_store_error(dir.path(), "no shard manifests");
    // A shard that fails (its input missing) leaves nothing in the store: no shard, no manifest.
    let failed = dir.path().join("failed");
    let config = StoreConfig {
        rows: format(),
        ..StoreConfig::new(dir.path().join("no-input.jsonl"), &failed)
    };
    assert!(write_store(&config, &cl100k, &Quiet).is_err());
    assert_eq!(std::fs::read_dir(&failed).unwrap().count(), 0);
    expect_store_error(&failed, "no shard manifests");
    // A shard missing.
    let store = dir.path().join("missing");
    write(&store, Shard::new(0, 3).unwrap(), &cl100k, false).unwrap();
    write(&store, Shard::new(2, 3).unwrap(), &cl100k, false).unwrap();
    expect_store_error(&store, "shards [1] of 3 are missing");
    // Shards of another count beside them are refused when written.
    let err = write(&store, Shard::new(0, 2).unwrap(), &cl100k, false).unwrap_err();
    assert!(err.to_string().contains("shards of 3"), "{err}");
    // The same shard again needs overwrite.
    let err = write(&store, Shard::new(0, 3).unwrap(), &cl100k, false).unwrap_err();
    assert!(err.to_string().contains("overwrite"), "{err}");
    // Another tokenizer for one shard.
    write(&store, Shard::new(1, 3).unwrap(), &o200k, false).unwrap();
    expect_store_error(&store, "tokenized with");
    write(&store, Shard::new(1, 3).unwrap(), &cl100k, true).unwrap();
    assert_eq!(Store::open(&store).unwrap().len(), 40);
    // Damaged Arrow files: cut short, a flipped byte in the data, not Arrow at all.
    let arrow = store.join("shard-00001-of-00003.arrow");
    let original = std::fs::read(&arrow).unwrap();
    std::fs::write(&arrow, &original[..original.len() / 2]).unwrap();
    expect_store_error(&store, "bytes; its manifest says");
    // Every 97th byte, and every byte of the footer (the schema's type ids are there).
    let footer = original.len().saturating_sub(1024).max(8)..original.len() - 10;
    for at in (8..original.len() - 16).step_by(97).chain(footer) {
        let mut bytes = original.clone();
        bytes[at] ^= 0x5a;
        std::fs::write(&arrow, &bytes).unwrap();
        // Either refused, or (a byte that changes no structure: a token id) read as some valid store.
        if let Ok(store) = Store::open(&store) {
            let all: Vec<usize> = (0..store.len()).collect();
            let _ = store.ragged(&all, &LengthLimit::default());
        }
    }
    std::fs::write(&arrow, vec![b'x'; original.len()]).unwrap();
    expect_store_error(&store, "not an Arrow IPC file");
    // No store at all.
    expect_store_error(dir.path(), "no shard manifests");
    assert!("3/3".parse::<Shard>().is_err() && "a/b".parse::<Shard>().is_err());
    let zero = "0/0".parse::<Shard>().unwrap_err().to_string();
    assert!(zero.contains("the count must be at least 1"), "{zero}");
    assert_eq!("2/5".parse::<Shard>().unwrap(), Shard::new(2, 5).unwrap());
}
