//! Multi-segment rows (conversations): a label is trained exactly when its token lies in a trainable
//! segment, in the padded and packed layouts, on the CPU and (with `emulation`) in the kernels; and a
//! (prompt, output) row given as two segments collates exactly as the pair does.

use proptest::prelude::*;
use sft_collate::backend::cpu;
use sft_collate::{CollateSpec, IdDtype, LabelFormat, RaggedBatch};

type Row = Vec<(Vec<u32>, bool)>;

fn rows() -> impl Strategy<Value = Vec<Row>> {
    prop::collection::vec(
        prop::collection::vec(
            (prop::collection::vec(0u32..1000, 0..6), any::<bool>()),
            0..5,
        ),
        0..7,
    )
}

fn spec() -> impl Strategy<Value = CollateSpec> {
    (prop::option::of(1usize..6), any::<bool>(), any::<bool>()).prop_map(
        |(multiple, ignore, i64_ids)| CollateSpec {
            pad_id: Some(5000),
            pad_to_multiple_of: multiple,
            label_format: if ignore {
                LabelFormat::IGNORE_INDEX
            } else {
                LabelFormat::Pad
            },
            id_dtype: if i64_ids { IdDtype::I64 } else { IdDtype::I32 },
            attention_mask: true,
            ..Default::default()
        },
    )
}

fn batch(rows: &[Row]) -> RaggedBatch {
    let segments: Vec<Vec<(&[u32], bool)>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|(t, trained)| (t.as_slice(), *trained))
                .collect()
        })
        .collect();
    RaggedBatch::from_segments(segments)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn trained_labels_are_exactly_the_trainable_tokens(rows in rows(), spec in spec()) {
        let packed = batch(&rows);
        let out = cpu::collate(&packed, &spec).unwrap();
        let (_, width) = out.shape();
        let labels = out.labels.to_i64();
        let mut trained = 0;
        for (i, row) in rows.iter().enumerate() {
            let flags: Vec<bool> = row.iter().flat_map(|(t, f)| std::iter::repeat_n(*f, t.len())).collect();
            let tokens: Vec<u32> = row.iter().flat_map(|(t, _)| t.iter().copied()).collect();
            for j in 0..width {
                let want = j + 1 < tokens.len() && flags[j + 1];
                prop_assert_eq!(out.response_mask[i * width + j], want);
                if want {
                    prop_assert_eq!(labels[i * width + j], i64::from(tokens[j + 1]));
                    trained += 1;
                }
            }
        }
        prop_assert_eq!(out.stats.response_tokens, trained);
        // The packed layout trains the same (context, label) pairs.
        let layout = cpu::collate_pack(&packed, &spec).unwrap();
        prop_assert_eq!(layout.stats.response_tokens, trained);
        prop_assert_eq!(layout.response_mask.iter().filter(|&&m| m).count(), trained);
    }

    #[test]
    fn two_segment_rows_collate_as_pairs(pairs in prop::collection::vec((prop::collection::vec(0u32..1000, 0..8), prop::collection::vec(0u32..1000, 0..8)), 0..6), spec in spec()) {
        let as_pairs = RaggedBatch::from_pairs(pairs.iter().map(|(p, o)| (p, o)));
        let as_segments = batch(&pairs.iter().map(|(p, o)| vec![(p.clone(), false), (o.clone(), true)]).collect::<Vec<_>>());
        prop_assert_eq!(cpu::collate(&as_segments, &spec).unwrap(), cpu::collate(&as_pairs, &spec).unwrap());
        prop_assert_eq!(cpu::collate_pack(&as_segments, &spec).unwrap(), cpu::collate_pack(&as_pairs, &spec).unwrap());
        // Selecting rows keeps the flags.
        let all: Vec<usize> = (0..pairs.len()).rev().collect();
        prop_assert_eq!(
            cpu::collate(&as_segments.select(&all), &spec).unwrap(),
            cpu::collate(&as_pairs.select(&all), &spec).unwrap()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn split_and_truncate_keep_each_tokens_flag(rows in rows(), max_tokens in 2usize..12, split in any::<bool>()) {
        use sft_collate::schedule::{Overflow, PackSpec};
        let packed = batch(&rows);
        let spec = CollateSpec { pad_id: Some(0), ..Default::default() };
        let pack = PackSpec { overflow: if split { Overflow::Split } else { Overflow::Truncate }, ..PackSpec::new(max_tokens) };
        for i in 0..packed.rows() {
            let original: Vec<(u32, bool)> = (0..packed.row_len(i)).map(|k| (packed.row(i)[k], packed.is_trainable(i, k))).collect();
            let pieces = pack.fit_row(&packed, i, spec.truncation).unwrap();
            let flat: Vec<(u32, bool)> = pieces
                .iter()
                .flat_map(|segments| segments.iter().flat_map(|(t, f)| t.iter().map(move |&x| (x, *f))))
                .collect();
            prop_assert!(pieces.iter().all(|p| p.iter().map(|(t, _)| t.len()).sum::<usize>() <= max_tokens));
            if split {
                prop_assert_eq!(flat, original);
            } else if packed.trainable().is_none() {
                // A batch of pairs (a row of one untrained and one trained segment is kept as a pair):
                // prompt-left drops the start of the prompt, then the end of the output.
                let excess = original.len().saturating_sub(max_tokens);
                let front = excess.min(packed.row_parts(i).0.len());
                prop_assert_eq!(&flat[..], &original[front..original.len() - (excess - front)]);
            } else {
                // Segments: prompt-left drops the oldest tokens, so the end of the row is kept.
                prop_assert_eq!(&flat[..], &original[original.len() - flat.len()..]);
            }
        }
    }
}

#[test]
fn a_conversation() {
    // system, user, assistant, user, assistant: only the assistant turns are trained.
    let turns: Row = vec![
        (vec![1, 2], false),
        (vec![3, 4, 5], false),
        (vec![6, 7], true),
        (vec![8], false),
        (vec![9, 10], true),
    ];
    let packed = batch(&[turns]);
    let out = cpu::collate(
        &packed,
        &CollateSpec {
            pad_id: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    // Labels are tokens 2..=10; trained: 6, 7, 9, 10.
    assert_eq!(out.labels.to_i64(), [2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(
        out.response_mask,
        [false, false, false, false, true, true, false, true, true]
    );
    assert!(
        RaggedBatch::from_parts_with_trainable(vec![1, 2], vec![0, 2], vec![0], vec![0, 2])
            .is_err()
    );
    assert!(
        RaggedBatch::from_parts_with_trainable(vec![1, 2], vec![0, 2], vec![0], vec![0]).is_err()
    );
}
