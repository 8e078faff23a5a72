//! Property tests of padding-free packing: every response token of every document is a label exactly
//! once, no label crosses a document boundary, positions restart per document, cu_seqlens matches the
//! tokens, and the packed and padded layouts give the same (context, label) pairs for every document.

use std::collections::BTreeSet;

use proptest::prelude::*;
use sft_collate::backend::cpu;
use sft_collate::schedule::{bucket_order, plan_packs, Overflow, PackSpec, PackStrategy};
use sft_collate::{CollateSpec, IdDtype, LabelFormat, RaggedBatch};

type Doc = (Vec<u32>, Vec<u32>);

fn docs() -> impl Strategy<Value = Vec<Doc>> {
    prop::collection::vec(
        (
            prop::collection::vec(0u32..500, 0..12),
            prop::collection::vec(0u32..500, 0..12),
        ),
        0..20,
    )
}

/// (document, position of the label's context end, label) for every trained position of the padded
/// layout of each document on its own.
fn padded_pairs(docs: &[Doc], spec: &CollateSpec) -> BTreeSet<(usize, usize, i64)> {
    let mut pairs = BTreeSet::new();
    for (d, (p, o)) in docs.iter().enumerate() {
        let batch = cpu::collate(&RaggedBatch::from_pairs([(p, o)]), spec).unwrap();
        let labels = batch.labels.to_i64();
        for (j, &m) in batch.response_mask.iter().enumerate() {
            if m {
                pairs.insert((d, j, labels[j]));
            }
        }
    }
    pairs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn packing_keeps_every_pair_and_crosses_no_boundary(
        raw in docs(),
        max_tokens in 2usize..40,
        strategy in 0u8..4,
        split in any::<bool>(),
        ignore in any::<bool>(),
        pad_multiple in prop::option::of(1usize..8),
    ) {
        let spec = CollateSpec {
            pad_id: Some(999),
            label_format: if ignore { LabelFormat::IGNORE_INDEX } else { LabelFormat::Pad },
            id_dtype: IdDtype::I64,
            pad_to_multiple_of: pad_multiple,
            ..Default::default()
        };
        let pack_spec = PackSpec {
            max_tokens,
            strategy: [PackStrategy::Greedy, PackStrategy::FirstFitDecreasing, PackStrategy::BestFitDecreasing, PackStrategy::ExactFill][strategy as usize],
            overflow: if split { Overflow::Split } else { Overflow::Truncate },
        };
        // The documents after the overflow policy.
        let docs: Vec<Doc> = raw
            .iter()
            .enumerate()
            .flat_map(|(i, (p, o))| pack_spec.fit(i, p, o, spec.truncation).unwrap())
            .collect();
        if split {
            // Splitting loses no token.
            let before: usize = raw.iter().map(|(p, o)| p.len() + o.len()).sum();
            prop_assert_eq!(docs.iter().map(|(p, o)| p.len() + o.len()).sum::<usize>(), before);
        }
        let lens: Vec<usize> = docs.iter().map(|(p, o)| p.len() + o.len()).collect();
        let packs = plan_packs(&lens, &pack_spec).unwrap();

        let mut seen = vec![0usize; docs.len()];
        let mut packed_pairs = BTreeSet::new();
        for pack in &packs {
            let batch = RaggedBatch::from_pairs(pack.iter().map(|&d| (&docs[d].0, &docs[d].1)));
            let real: usize = pack.iter().map(|&d| lens[d]).sum();
            prop_assert!(real <= max_tokens);
            let layout = cpu::collate_pack(&batch, &spec).unwrap();
            let t = layout.response_mask.len();
            prop_assert_eq!(layout.cu_seqlens[0], 0);
            prop_assert_eq!(*layout.cu_seqlens.last().unwrap() as usize, t);
            let (input_ids, labels, positions) =
                (layout.input_ids.to_i64(), layout.labels.to_i64(), layout.position_ids.to_i64());
            for (k, &d) in pack.iter().enumerate() {
                seen[d] += 1;
                let (start, end) = (layout.cu_seqlens[k] as usize, layout.cu_seqlens[k + 1] as usize);
                prop_assert_eq!(end - start, lens[d]);
                for t in start..end {
                    let p = t - start;
                    prop_assert_eq!(positions[t], p as i64);
                    if t + 1 == end {
                        // A document's last token predicts nothing: no label across the boundary.
                        prop_assert!(!layout.response_mask[t]);
                    }
                    if layout.response_mask[t] {
                        prop_assert_eq!(labels[t], input_ids[t + 1]);
                        packed_pairs.insert((d, p, labels[t]));
                    } else if ignore {
                        prop_assert_eq!(labels[t], -100);
                    }
                }
            }
            // The padded tail, if any, is one segment of untrained pad tokens.
            let tail_start = layout.cu_seqlens[pack.len()] as usize;
            prop_assert!(layout.response_mask[tail_start..].iter().all(|&m| !m));
            prop_assert!(input_ids[tail_start..].iter().all(|&x| x == 999));
            if let Some(m) = pad_multiple {
                prop_assert_eq!(t % m, 0);
            }
            prop_assert_eq!(layout.stats.response_tokens, layout.response_mask.iter().filter(|&&m| m).count());
        }
        prop_assert!(seen.iter().all(|&n| n == 1), "every document in exactly one pack: {:?}", seen);
        prop_assert_eq!(packed_pairs, padded_pairs(&docs, &spec));
    }

    #[test]
    fn bucketing_permutes_and_sorts_windows(lens in prop::collection::vec(0usize..100, 0..200), window in 1usize..50, seed in any::<u64>()) {
        let order = bucket_order(&lens, window, seed);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..lens.len()).collect::<Vec<_>>());
        for chunk in order.chunks(window) {
            prop_assert!(chunk.windows(2).all(|w| lens[w[0]] <= lens[w[1]]));
        }
    }
}

#[test]
fn first_fit_decreasing_leaves_no_room_a_later_document_would_fit() {
    // First fit's invariant: a pack's free space is smaller than every document of any pack opened after
    // it (else that document would have gone there), so only the last pack can be far from full. Packs
    // come out ordered by their first document, so check it for either order of each pair.
    let lens: Vec<usize> = (0..1000).map(|i| 50 + (i * 7919) % 400).collect();
    let spec = PackSpec::new(4096);
    let packs = plan_packs(&lens, &spec).unwrap();
    let used: Vec<usize> = packs
        .iter()
        .map(|p| p.iter().map(|&d| lens[d]).sum())
        .collect();
    let smallest: Vec<usize> = packs
        .iter()
        .map(|p| p.iter().map(|&d| lens[d]).min().unwrap())
        .collect();
    for i in 0..packs.len() {
        for j in i + 1..packs.len() {
            assert!(
                4096 - used[i] < smallest[j] || 4096 - used[j] < smallest[i],
                "packs {i} and {j} each have room for a document of the other"
            );
        }
    }
    let total: usize = lens.iter().sum();
    assert_eq!(used.iter().sum::<usize>(), total);
}
