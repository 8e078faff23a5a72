//! The loader over a token store: in every epoch the ranks' steps together hold every row (every piece of
//! a split row) exactly once, and so every trained token exactly once; every rank takes the same number of
//! steps; token budgets and pack sizes hold; resuming from a state gives exactly the steps that would have
//! followed; prefetching changes nothing. On random stores (property test) and on all of GSM8K train with
//! a simulated world of 8.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sft_collate::dataset::Quiet;
use sft_collate::loader::{plan_epoch, Batching, Loader, LoaderBatch, LoaderConfig, LoaderState};
use sft_collate::schedule::{Overflow, PackSpec, PackStrategy};
use sft_collate::store::{write_store, Store, StoreConfig};
use sft_collate::{CollateSpec, Device, Tokenizer, Truncation};

fn store_of(dir: &Path, rows: &[(String, String)], tokenizer: &Tokenizer) -> Arc<Store> {
    let input = dir.join("in.jsonl");
    let text: String = rows
        .iter()
        .map(|(p, o)| serde_json::json!({"prompt": p, "output": o}).to_string() + "\n")
        .collect();
    std::fs::write(&input, text).unwrap();
    write_store(
        &StoreConfig::new(&input, dir.join("store")),
        tokenizer,
        &Quiet,
    )
    .unwrap();
    Arc::new(Store::open(dir.join("store")).unwrap())
}

fn words() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!["a", " b", " cd", "12", "!", " é"]),
        0..14,
    )
    .prop_map(|w| w.concat())
}

fn batching() -> impl Strategy<Value = Batching> {
    prop_oneof![
        (1usize..9).prop_map(Batching::Rows),
        (8usize..120, 1usize..20).prop_map(|(tokens, window)| Batching::Tokens { tokens, window }),
        (
            8usize..48,
            1usize..20,
            prop::sample::select(vec![Overflow::Truncate, Overflow::Split])
        )
            .prop_map(|(max_tokens, window, overflow)| Batching::Packs {
                pack: PackSpec {
                    max_tokens,
                    strategy: PackStrategy::ExactFill,
                    overflow
                },
                window
            }),
    ]
}

/// Trained positions (labels) in a step's batch.
fn trained(batch: &LoaderBatch) -> usize {
    match batch {
        LoaderBatch::Padded(b) => {
            let b = b_host(b);
            b.response_mask.iter().filter(|&&m| m).count()
        }
        LoaderBatch::Packed(p) => p_host(p).response_mask.iter().filter(|&&m| m).count(),
    }
}

fn b_host(b: &sft_collate::Placed<sft_collate::Batch>) -> sft_collate::Batch {
    match b {
        sft_collate::Placed::Host(b) => b.clone(),
        sft_collate::Placed::Device(_) => unreachable!("the CPU device"),
    }
}

fn p_host(p: &sft_collate::Placed<sft_collate::Pack>) -> sft_collate::Pack {
    match p {
        sft_collate::Placed::Host(p) => p.clone(),
        sft_collate::Placed::Device(_) => unreachable!("the CPU device"),
    }
}

/// Trained labels of every row, each row alone, as the padded layout counts them.
fn trained_in_store(store: &Store, spec: &CollateSpec) -> usize {
    let all: Vec<usize> = (0..store.len()).collect();
    let ragged = store.ragged(&all, &spec.limit()).unwrap();
    sft_collate::backend::cpu::collate(&ragged, spec)
        .unwrap()
        .stats
        .response_tokens
}

#[test]
fn every_epoch_holds_every_row_once_across_ranks() {
    let tokenizer = Tokenizer::load("cl100k_base").unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 40,
        ..Config::default()
    });
    let strategy = (
        prop::collection::vec((words(), words()), 0..40),
        1usize..6,
        batching(),
        any::<bool>(),
        prop::option::of(4usize..24),
        any::<u64>(),
    );
    runner
        .run(
            &strategy,
            |(rows, world, batching, shuffle, max_len, seed)| {
                let dir = tempfile::tempdir().unwrap();
                let store = store_of(dir.path(), &rows, &tokenizer);
                let spec = CollateSpec {
                    pad_id: Some(0),
                    max_len,
                    truncation: Truncation::OutputRight,
                    ..CollateSpec::default()
                };
                let config = LoaderConfig {
                    spec: spec.clone(),
                    shuffle,
                    seed,
                    world_size: world,
                    ..LoaderConfig::new(batching)
                };
                for epoch in 0..2u64 {
                    let plan = plan_epoch(&store, &config, epoch).unwrap();
                    let steps = plan.steps();
                    prop_assert!(plan.per_rank.iter().all(|r| r.len() == steps));
                    // Every row (every piece) exactly once.
                    let mut seen: BTreeMap<(usize, u32), usize> = BTreeMap::new();
                    for rank in &plan.per_rank {
                        for step in rank {
                            for doc in step {
                                *seen.entry((doc.row, doc.piece)).or_default() += 1;
                            }
                        }
                    }
                    prop_assert!(seen.values().all(|&n| n == 1), "{seen:?}");
                    let rows_seen: std::collections::BTreeSet<usize> =
                        seen.keys().map(|k| k.0).collect();
                    prop_assert_eq!(rows_seen.len(), store.len());
                    for &(row, piece) in seen.keys() {
                        prop_assert!(piece == 0 || seen.contains_key(&(row, piece - 1)));
                    }
                    match batching {
                        Batching::Tokens { tokens, .. } => {
                            for step in plan.per_rank.iter().flatten().filter(|s| s.len() > 1) {
                                let longest = step
                                    .iter()
                                    .map(|d| {
                                        max_len.map_or(store.row(d.row).tokens.len(), |m| {
                                            store.row(d.row).tokens.len().min(m)
                                        })
                                    })
                                    .max()
                                    .unwrap();
                                prop_assert!(step.len() * spec.width_for(longest) <= tokens);
                            }
                        }
                        Batching::Rows(n) => {
                            prop_assert!(plan.per_rank.iter().flatten().all(|s| s.len() <= n))
                        }
                        Batching::Packs { .. } => {}
                    }
                }
                // The loaders of all ranks, one epoch: every trained label once, every pack within its size.
                if store.is_empty() {
                    return Ok(());
                }
                // Packs that truncate cut every row to the pack size with the spec's truncation, so a
                // row's trained labels are those of the padded layout at that max_len.
                let want_spec = match batching {
                    Batching::Packs {
                        pack:
                            PackSpec {
                                overflow: Overflow::Truncate,
                                max_tokens,
                                ..
                            },
                        ..
                    } => CollateSpec {
                        max_len: Some(max_len.map_or(max_tokens, |m| m.min(max_tokens))),
                        ..spec.clone()
                    },
                    _ => spec.clone(),
                };
                let want = trained_in_store(&store, &want_spec);
                let mut got = 0;
                for rank in 0..world {
                    let mut loader = Loader::new(
                        store.clone(),
                        LoaderConfig {
                            rank,
                            ..config.clone()
                        },
                        Device::cpu(),
                    )
                    .unwrap();
                    let steps = loader.steps_per_epoch().unwrap();
                    for s in 0..steps {
                        let step = loader.next_step().unwrap();
                        prop_assert_eq!(step.state, LoaderState { epoch: 0, step: s });
                        if let (LoaderBatch::Packed(p), Batching::Packs { pack, .. }) =
                            (&step.batch, batching)
                        {
                            prop_assert!(p_host(p).input_ids.len() <= pack.max_tokens);
                        }
                        got += trained(&step.batch);
                    }
                    prop_assert_eq!(loader.state(), LoaderState { epoch: 1, step: 0 });
                }
                // Packs of split rows: a piece's first token is no label, so a split row loses one label per
                // extra piece; otherwise every trained label is there once.
                if !matches!(
                    batching,
                    Batching::Packs {
                        pack: PackSpec {
                            overflow: Overflow::Split,
                            ..
                        },
                        ..
                    }
                ) {
                    prop_assert_eq!(got, want);
                } else {
                    prop_assert!(got <= want);
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn resuming_from_a_state_gives_the_steps_that_would_have_followed() {
    let tokenizer = Tokenizer::load("cl100k_base").unwrap();
    let rows: Vec<(String, String)> = (0..50)
        .map(|i| {
            (
                format!("question {i} {}", "x ".repeat(i % 7)),
                format!(" answer {}", i * 3),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let store = store_of(dir.path(), &rows, &tokenizer);
    for batching in [
        Batching::Rows(4),
        Batching::Tokens {
            tokens: 64,
            window: 16,
        },
        Batching::Packs {
            pack: PackSpec {
                max_tokens: 40,
                strategy: PackStrategy::ExactFill,
                overflow: Overflow::Split,
            },
            window: 20,
        },
    ] {
        for prefetch in [0, 3] {
            let config = LoaderConfig {
                spec: CollateSpec {
                    pad_id: Some(0),
                    ..CollateSpec::default()
                },
                seed: 11,
                world_size: 3,
                rank: 1,
                prefetch,
                ..LoaderConfig::new(batching)
            };
            let mut a = Loader::new(store.clone(), config.clone(), Device::cpu()).unwrap();
            let steps = a.steps_per_epoch().unwrap();
            let mut taken = Vec::new();
            for _ in 0..steps + 3 {
                let s = a.next_step().unwrap();
                taken.push((s.state, s.rows, trained(&s.batch)));
            }
            // A different order in the next epoch, the same rows.
            let (first, second): (Vec<_>, Vec<_>) = taken.iter().partition(|t| t.0.epoch == 0);
            assert!(!second.is_empty() && first.len() == steps);
            // Resume at every point: the same steps from there.
            for at in [0, 1, steps - 1, steps] {
                let mut b = Loader::new(store.clone(), config.clone(), Device::cpu()).unwrap();
                b.set_state(taken[at].0);
                for want in &taken[at..at + 3] {
                    let s = b.next_step().unwrap();
                    assert_eq!(
                        (&s.state, &s.rows, trained(&s.batch)),
                        (&want.0, &want.1, want.2)
                    );
                }
            }
            // Serializable, as a checkpoint keeps it.
            let state: LoaderState =
                serde_json::from_str(&serde_json::to_string(&a.state()).unwrap()).unwrap();
            assert_eq!(state, a.state());
        }
    }
}

#[test]
fn gsm8k_on_a_world_of_eight_trains_every_token_once() {
    let Some(shared) = common::shared_dir("gsm8k_on_a_world_of_eight_trains_every_token_once")
    else {
        return;
    };
    let f = shared.join("fixtures");
    let tokenizer = common::qwen2(&shared);
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        rows: sft_collate::input::RowFormat {
            output_key: "answer".into(),
            prompt_key: "question".into(),
            ..Default::default()
        },
        ..StoreConfig::new(f.join("gsm8k/train.jsonl"), dir.path().join("store"))
    };
    write_store(&config, &tokenizer, &Quiet).unwrap();
    let store = Arc::new(Store::open(dir.path().join("store")).unwrap());
    let spec = CollateSpec {
        pad_id: tokenizer.pad_id(),
        ..CollateSpec::default()
    };
    let want = trained_in_store(&store, &spec);
    for batching in [
        Batching::Rows(64),
        Batching::Packs {
            pack: PackSpec {
                max_tokens: 4096,
                strategy: PackStrategy::ExactFill,
                overflow: Overflow::Error,
            },
            window: 4096,
        },
    ] {
        for epoch in 0..2u64 {
            let mut got = 0;
            let mut steps = None;
            for rank in 0..8 {
                let mut loader = Loader::new(
                    store.clone(),
                    LoaderConfig {
                        spec: spec.clone(),
                        world_size: 8,
                        rank,
                        seed: 5,
                        ..LoaderConfig::new(batching)
                    },
                    Device::cpu(),
                )
                .unwrap();
                loader.set_state(LoaderState { epoch, step: 0 });
                let n = loader.steps_per_epoch().unwrap();
                assert_eq!(
                    *steps.get_or_insert(n),
                    n,
                    "rank {rank}: a different number of steps"
                );
                for _ in 0..n {
                    got += trained(&loader.next_step().unwrap().batch);
                }
            }
            assert_eq!(got, want, "{batching:?} epoch {epoch}");
        }
    }
}

/// Found by the property test: a prompt as long as the pack leaves no room for its output, so a truncating
/// pack trains nothing from that row (and is no error).
#[test]
fn a_prompt_that_fills_a_truncating_pack_trains_nothing() {
    let tokenizer = Tokenizer::load("cl100k_base").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![("a b b b b b b b".to_string(), "a b b b cda".to_string())];
    let store = store_of(dir.path(), &rows, &tokenizer);
    assert_eq!(
        store.row(0).tokens.len() - store.row(0).prompt_len as usize,
        6
    );
    let pack = PackSpec {
        max_tokens: 8,
        strategy: PackStrategy::ExactFill,
        overflow: Overflow::Truncate,
    };
    let config = LoaderConfig {
        spec: CollateSpec {
            pad_id: Some(0),
            truncation: Truncation::OutputRight,
            ..CollateSpec::default()
        },
        ..LoaderConfig::new(Batching::Packs { pack, window: 1 })
    };
    let mut loader = Loader::new(store, config, Device::cpu()).unwrap();
    let step = loader.next_step().unwrap();
    assert_eq!(trained(&step.batch), 0);
}
