//! The CUDA kernels, run by the emulation backend (same .cu source, CPU threads), compared bit for bit
//! with the CPU oracle; and tests of the emulator's CUDA built-ins themselves.
#![cfg(feature = "emulation")]

use proptest::prelude::*;
use sft_collate::emulation::{selftest_reduce, EmulatedCollator};
use sft_collate::{cpu, CollateSpec, IdDtype, LabelFormat, PackedBatch, Truncation};

fn spec_strategy() -> impl Strategy<Value = CollateSpec> {
    (
        prop::option::of(1usize..12),
        prop_oneof![Just(LabelFormat::Pad), Just(LabelFormat::IGNORE_INDEX)],
        prop_oneof![Just(IdDtype::I32), Just(IdDtype::I64)],
        0u32..200_000,
        any::<bool>(),
    )
        .prop_map(
            |(pad_to_multiple_of, label_format, id_dtype, pad, attention_mask)| CollateSpec {
                pad_id: Some(pad),
                max_len: None,
                truncation: Truncation::Error,
                pad_to_multiple_of,
                label_format,
                id_dtype,
                attention_mask,
            },
        )
}

fn packed_strategy(max_rows: usize, max_len: usize) -> impl Strategy<Value = PackedBatch> {
    prop::collection::vec(
        (
            prop::collection::vec(0u32..200_000, 0..max_len),
            prop::collection::vec(0u32..200_000, 0..max_len),
        ),
        0..max_rows,
    )
    .prop_map(PackedBatch::from_pairs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn emulated_kernel_matches_the_oracle(packed in packed_strategy(9, 40), spec in spec_strategy()) {
        let want = cpu::collate(&packed, &spec).unwrap();
        let got = EmulatedCollator::new().collate(&packed, &spec).unwrap();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn wide_rows_use_several_blocks_per_row() {
    // Widths past 1024 positions need blockIdx.x > 0; both the vector path (width % 4 == 0) and the
    // scalar path are exercised.
    for extra in [0u32, 1, 2, 3] {
        let packed = PackedBatch::from_pairs([
            (
                (0..700).collect::<Vec<u32>>(),
                (0..(1800 + extra)).collect::<Vec<u32>>(),
            ),
            (vec![], vec![5; 3]),
            (vec![7; 2500], vec![]),
        ]);
        for id_dtype in [IdDtype::I32, IdDtype::I64] {
            let spec = CollateSpec {
                pad_id: Some(99),
                id_dtype,
                attention_mask: true,
                ..Default::default()
            };
            let want = cpu::collate(&packed, &spec).unwrap();
            assert_eq!(
                EmulatedCollator::new().collate(&packed, &spec).unwrap(),
                want
            );
        }
    }
}

#[test]
fn edge_batches() {
    let spec = CollateSpec {
        pad_id: Some(1),
        ..Default::default()
    };
    for packed in [
        PackedBatch::new(),
        PackedBatch::from_pairs([(vec![3], vec![])]),
        PackedBatch::from_pairs([(vec![], vec![])]),
        PackedBatch::from_pairs([(vec![], vec![4, 5]), (vec![6, 7], vec![])]),
    ] {
        let want = cpu::collate(&packed, &spec).unwrap();
        assert_eq!(
            EmulatedCollator::new().collate(&packed, &spec).unwrap(),
            want
        );
    }
}

#[test]
fn corrupted_batches_never_reach_the_kernel() {
    assert!(PackedBatch::from_parts(vec![1, 2, 3], vec![0, 5], vec![0]).is_err());
    // Ids that do not fit i32 are refused before launch, as on the CPU.
    let packed = PackedBatch::from_pairs([(vec![u32::MAX], vec![1])]);
    let spec = CollateSpec {
        pad_id: Some(0),
        ..Default::default()
    };
    assert!(EmulatedCollator::new().collate(&packed, &spec).is_err());
}

#[test]
fn shim_reductions_shuffles_ballots_and_atomics_are_faithful() {
    for block in [32u32, 64, 256, 1024] {
        let blocks = 3usize;
        let input: Vec<f32> = (0..blocks * block as usize)
            .map(|i| ((i * 7919) % 23) as f32 - 11.0)
            .collect();
        let (sums, ballots) = selftest_reduce(&input, block);
        for (b, chunk) in input.chunks(block as usize).enumerate() {
            // Small integers: every summation order is exact.
            let want: f32 = chunk.iter().sum();
            assert_eq!(sums[b], [want; 3], "block size {block}, block {b}");
            for (w, warp) in chunk.chunks(32).enumerate() {
                let want_ballot = warp
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (l, &x)| acc | (u32::from(x > 0.0) << l));
                assert_eq!(ballots[b * (block as usize / 32) + w], want_ballot);
            }
        }
    }
}
