//! The Megatron-Bridge export, read back as Megatron-Bridge reads it: each pack cut at `seq_start_id`,
//! each document into inputs `d[..-1]`, labels `d[1..]` and the mask `loss_mask[s..e-1]`
//! (`GPTSFTPackedDataset.collate_fn` and `_build_loss_mask` with `answer_only_loss`). Every store row
//! must come out once, with the inputs, labels and trained positions this crate's own collation gives it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::{Array, Int32Array, Int8Array, ListArray};
use arrow_schema::DataType;
use sft_collate::dataset::Quiet;
use sft_collate::export::{export_megatron, MegatronExport, PACK_METADATA_FILE};
use sft_collate::input::{MessageFormat, RowFormat, Template};
use sft_collate::store::{write_store, Store, StoreConfig};
use sft_collate::{CollateSpec, IdTensor, LengthLimit, Tokenizer, Truncation};

/// One document as the trainer sees it: inputs, labels, and which labels are trained.
type Doc = (Vec<i64>, Vec<i64>, Vec<bool>);

fn store_from_jsonl(dir: &Path, jsonl: &str, tokenizer: &Tokenizer) -> Store {
    let input = dir.join("in.jsonl");
    std::fs::write(&input, jsonl).unwrap();
    // Conversations rendered `{role}: {content}\n`, the assistant's content trained.
    let config = StoreConfig {
        rows: RowFormat {
            messages: Some(
                MessageFormat::new(Some("{role}: {content}\n"), vec!["assistant".into()]).unwrap(),
            ),
            ..RowFormat::default()
        },
        ..StoreConfig::new(&input, dir.join("store"))
    };
    write_store(&config, tokenizer, &Quiet).unwrap();
    Store::open(dir.join("store")).unwrap()
}

/// Every export file's packs, as Megatron-Bridge's collate cuts them, and the packs' positions.
fn read_back(dir: &Path) -> (Vec<Doc>, Vec<usize>) {
    let mut docs = Vec::new();
    let mut pack_positions = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".idx.parquet"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            // The schema Megatron-Bridge documents: list<int32>, list<int8>, list<int32>.
            let item = |name: &str| match batch.schema().field_with_name(name).unwrap().data_type()
            {
                DataType::List(f) => f.data_type().clone(),
                other => panic!("{name} is {other:?}, not a list"),
            };
            assert_eq!(item("input_ids"), DataType::Int32);
            assert_eq!(item("loss_mask"), DataType::Int8);
            assert_eq!(item("seq_start_id"), DataType::Int32);
            let list = |name: &str| {
                batch
                    .column_by_name(name)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<ListArray>()
                    .unwrap()
                    .clone()
            };
            let (ids, mask, starts) = (list("input_ids"), list("loss_mask"), list("seq_start_id"));
            for r in 0..batch.num_rows() {
                let ids = ids.value(r);
                let ids: Vec<i64> = ids
                    .as_any()
                    .downcast_ref::<Int32Array>()
                    .unwrap()
                    .values()
                    .iter()
                    .map(|&v| v as i64)
                    .collect();
                let mask = mask.value(r);
                let mask = mask.as_any().downcast_ref::<Int8Array>().unwrap();
                assert_eq!(mask.len(), ids.len(), "one loss_mask entry per token");
                let starts = starts.value(r);
                let starts = starts.as_any().downcast_ref::<Int32Array>().unwrap();
                let mut bounds: Vec<usize> = starts.values().iter().map(|&s| s as usize).collect();
                assert_eq!(bounds.first(), Some(&0));
                bounds.push(ids.len());
                let mut positions = 0;
                for w in bounds.windows(2) {
                    let (s, e) = (w[0], w[1]);
                    assert!(e >= s + 2, "a document of at least two tokens");
                    docs.push((
                        ids[s..e - 1].to_vec(),
                        ids[s + 1..e].to_vec(),
                        (s..e - 1).map(|k| mask.value(k) != 0).collect(),
                    ));
                    assert_eq!(
                        mask.value(e - 1),
                        0,
                        "a document's last entry is never trained"
                    );
                    positions += e - s - 1;
                }
                pack_positions.push(positions);
            }
        }
    }
    (docs, pack_positions)
}

/// Every row of the store (of two tokens or more, cut as the export cuts it), collated alone by this
/// crate: inputs, labels and the response mask.
fn expected(store: &Store, pack_size: usize, truncation: Truncation) -> Vec<Doc> {
    let limit = LengthLimit {
        max_len: Some(pack_size + 1),
        truncation,
    };
    let spec = CollateSpec {
        pad_id: Some(0),
        max_len: Some(pack_size + 1),
        truncation,
        ..CollateSpec::default()
    };
    let ids = |t: &IdTensor| -> Vec<i64> {
        match t {
            IdTensor::I32(v) => v.iter().map(|&x| x as i64).collect(),
            IdTensor::I64(v) => v.clone(),
        }
    };
    (0..store.len())
        .filter_map(|i| {
            let ragged = store.ragged(&[i], &limit).unwrap();
            if ragged.row_len(0) < 2 {
                return None;
            }
            let batch = sft_collate::backend::cpu::collate(&ragged, &spec).unwrap();
            Some((
                ids(&batch.input_ids),
                ids(&batch.labels),
                batch.response_mask,
            ))
        })
        .collect()
}

fn multiset(docs: &[Doc]) -> BTreeMap<&Doc, usize> {
    let mut m = BTreeMap::new();
    for d in docs {
        *m.entry(d).or_insert(0) += 1;
    }
    m
}

fn check(store: &Store, out: &Path, pack_size: usize, truncation: Truncation) {
    let (got, positions) = read_back(out);
    let want = expected(store, pack_size, truncation);
    assert_eq!(got.len(), want.len(), "every document once");
    assert!(
        multiset(&got) == multiset(&want),
        "the documents as Megatron-Bridge cuts them are this crate's collation of each row"
    );
    assert!(positions.iter().all(|&p| p <= pack_size), "{positions:?}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(PACK_METADATA_FILE)).unwrap())
            .unwrap();
    let meta = &meta[0];
    assert_eq!(meta["pack_size"], pack_size);
    assert_eq!(meta["min_packed_seqlen"], *positions.iter().min().unwrap());
    let longest = want.iter().map(|d| d.0.len()).max().unwrap();
    assert_eq!(meta["dataset_max_seqlen"], longest);
}

#[test]
fn pairs_and_conversations_come_back_as_megatron_reads_them() {
    let tokenizer = Tokenizer::load("cl100k_base").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut jsonl = String::new();
    for i in 0..300 {
        let row = match i % 5 {
            0 => serde_json::json!({"messages": [
                {"role": "system", "content": format!("be brief {i}")},
                {"role": "user", "content": "what is ".repeat(i % 7 + 1)},
                {"role": "assistant", "content": format!("it is {}", i * 3)},
                {"role": "user", "content": "and then?"},
                {"role": "assistant", "content": "then ".repeat(i % 4 + 1)},
            ]}),
            1 => serde_json::json!({"prompt": "", "output": "x"}), // one token: left out
            _ => serde_json::json!({
                "prompt": format!("question {i}: {}", "word ".repeat(i % 23)),
                "output": format!(" answer {}", "more ".repeat(i % 31)),
            }),
        };
        jsonl.push_str(&row.to_string());
        jsonl.push('\n');
    }
    let store = store_from_jsonl(dir.path(), &jsonl, &tokenizer);
    for (pack_size, truncation, packs_per_file) in [
        (256, Truncation::Error, 100_000),
        (24, Truncation::OutputRight, 7),
        (24, Truncation::PromptLeft, 1000),
    ] {
        let out = dir.path().join(format!("out-{pack_size}-{truncation:?}"));
        let summary = export_megatron(
            &MegatronExport {
                truncation,
                packs_per_file,
                window: 97,
                ..MegatronExport::new(store.dir(), &out, pack_size)
            },
            &Quiet,
        )
        .unwrap();
        assert_eq!(summary.skipped_short, 60);
        assert_eq!(summary.files.len(), summary.packs.div_ceil(packs_per_file));
        check(&store, &out, pack_size, truncation);
    }
}

#[test]
fn gsm8k_train_round_trips() {
    let Some(shared) = common::shared_dir("gsm8k_train_round_trips") else {
        return;
    };
    let tokenizer = common::qwen2(&shared);
    let dir = tempfile::tempdir().unwrap();
    let input = shared.join("fixtures/gsm8k/train.jsonl");
    let mut config = StoreConfig::new(&input, dir.path().join("store"));
    config.rows = RowFormat {
        template: Some(
            Template::parse(
                &std::fs::read_to_string(shared.join("fixtures/gsm8k/r1_zero.prompt")).unwrap(),
            )
            .unwrap(),
        ),
        output_key: "answer".into(),
        ..RowFormat::default()
    };
    write_store(&config, &tokenizer, &Quiet).unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let out = dir.path().join("megatron");
    let summary = export_megatron(&MegatronExport::new(store.dir(), &out, 4096), &Quiet).unwrap();
    assert_eq!(summary.documents, store.len());
    assert!(summary.packing_efficiency > 95.0, "{summary:?}");
    check(&store, &out, 4096, Truncation::Error);
}

#[test]
fn a_row_too_long_names_its_line_and_writes_nothing() {
    let tokenizer = Tokenizer::load("cl100k_base").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jsonl = [
        serde_json::json!({"prompt": "short", "output": " one"}),
        serde_json::json!({"prompt": "long ".repeat(50), "output": " two"}),
    ]
    .map(|r| r.to_string() + "\n")
    .concat();
    let store = store_from_jsonl(dir.path(), &jsonl, &tokenizer);
    let out = dir.path().join("out");
    let err = export_megatron(&MegatronExport::new(store.dir(), &out, 16), &Quiet).unwrap_err();
    assert!(err.to_string().contains(":2:"), "{err}");
    assert!(!out.exists(), "nothing written");
    // An export replaces an export only when asked.
    let ok = MegatronExport {
        truncation: Truncation::PromptLeft,
        ..MegatronExport::new(store.dir(), &out, 16)
    };
    export_megatron(&ok, &Quiet).unwrap();
    let again = export_megatron(&ok, &Quiet).unwrap_err();
    assert!(
        again.to_string().contains("already holds an export"),
        "{again}"
    );
    export_megatron(
        &MegatronExport {
            overwrite: true,
            ..ok
        },
        &Quiet,
    )
    .unwrap();
    check(&store, &out, 16, Truncation::PromptLeft);
}
