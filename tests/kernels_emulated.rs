//! The CUDA kernels, run by the emulation backend (same .cu source, CPU threads), compared bit for bit
//! with the CPU oracle; and tests of the emulator's CUDA built-ins themselves.
#![cfg(feature = "emulation")]

mod common;

use proptest::prelude::*;
use sft_collate::emulation::{selftest_reduce, EmulatedCollator};
use sft_collate::{cpu, CollateSpec, IdDtype, LabelFormat, PackedBatch};

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
    fn emulated_kernel_matches_the_oracle(packed in packed_strategy(9, 40), spec in common::spec_strategy(12)) {
        let want = cpu::collate(&packed, &spec).unwrap();
        let got = EmulatedCollator::new().collate(&packed, &spec).unwrap();
        prop_assert_eq!(got, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn emulated_packed_layout_matches_the_oracle(packed in packed_strategy(12, 30), spec in common::spec_strategy(12)) {
        let want = cpu::collate_packed(&packed, &spec).unwrap();
        let got = EmulatedCollator::new().collate_packed(&packed, &spec).unwrap();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn packed_layout_across_many_blocks() {
    // More positions than one block covers, empty documents in between, a padded tail.
    let mut pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..40u32)
        .map(|i| {
            (
                vec![i; (i % 7) as usize],
                vec![i + 1; (i % 5) as usize * 30],
            )
        })
        .collect();
    pairs.insert(3, (vec![], vec![]));
    let packed = PackedBatch::from_pairs(pairs);
    for id_dtype in [IdDtype::I32, IdDtype::I64] {
        let spec = CollateSpec {
            pad_id: Some(7),
            id_dtype,
            pad_to_multiple_of: Some(128),
            label_format: LabelFormat::IGNORE_INDEX,
            ..Default::default()
        };
        let want = cpu::collate_packed(&packed, &spec).unwrap();
        assert_eq!(
            EmulatedCollator::new()
                .collate_packed(&packed, &spec)
                .unwrap(),
            want
        );
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

// ---- The fused masked cross-entropy kernel against the f64 CPU oracle.

mod ce {
    use super::common::ce::{case_strategy, check, extreme_rows_case, Case};
    use proptest::prelude::*;
    use sft_collate::cpu::loss::masked_cross_entropy;
    use sft_collate::emulation::EmulatedMaskedCrossEntropy;
    use sft_collate::loss::{CeInput, CeOptions, Labels, LogitElem, LogitsShape};
    use sft_collate::Error;

    fn run_case<T: LogitElem>(case: &Case, labels_i32: bool) {
        let logits: Vec<T> = case.logits.iter().map(|&x| T::from_f32(x)).collect();
        let labels32: Vec<i32> = case.labels.iter().map(|&l| l as i32).collect();
        let labels = if labels_i32 {
            Labels::I32(&labels32)
        } else {
            Labels::I64(&case.labels)
        };
        let input = CeInput {
            logits: &logits,
            shape: LogitsShape::dense(case.rows, case.vocab),
            labels,
            mask: &case.mask,
            weights: case.weights.as_deref(),
        };
        let what = format!("{} {}x{}", T::SUFFIX, case.rows, case.vocab);
        let want = masked_cross_entropy(&input, &case.options, true).unwrap();
        let kernel = EmulatedMaskedCrossEntropy::new();
        let forward = kernel.forward(&input, &case.options).unwrap();
        assert!(forward.grad.is_none());
        check(&forward, &want, &format!("{what} forward"));
        let both = kernel.forward_backward(&input, &case.options).unwrap();
        check(&both, &want, &format!("{what} forward_backward"));
        // In place gives the very same gradient.
        let in_place = kernel
            .forward_backward_in_place(&input, &case.options)
            .unwrap();
        assert_eq!(in_place.grad, both.grad, "{what}: in place");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10, max_shrink_iters: 20, ..ProptestConfig::default() })]

        #[test]
        fn emulated_masked_ce_matches_the_oracle(case in case_strategy(), labels_i32 in any::<bool>()) {
            run_case::<f32>(&case, labels_i32);
            run_case::<half::bf16>(&case, labels_i32);
            run_case::<half::f16>(&case, labels_i32);
        }
    }

    #[test]
    fn extreme_rows() {
        let case = extreme_rows_case();
        run_case::<f32>(&case, false);
        run_case::<half::bf16>(&case, true);
        run_case::<half::f16>(&case, false);
    }

    #[test]
    fn hundreds_of_rows() {
        // N in the hundreds (each row is one block, so this also walks many blocks), an odd vocab.
        let (rows, vocab) = (300, 97);
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919) % 1009) as f32 / 50.0 - 10.0)
            .collect();
        let case = Case {
            rows,
            vocab,
            logits,
            labels: (0..rows as i64).map(|r| (r * 31) % vocab as i64).collect(),
            mask: (0..rows).map(|r| r % 3 != 1).collect(),
            weights: Some((0..rows).map(|r| (r % 5) as f32 * 0.5).collect()),
            options: CeOptions::default(),
        };
        run_case::<f32>(&case, true);
        run_case::<half::bf16>(&case, false);
    }

    #[test]
    fn all_masked_and_none_masked() {
        let rows = 9;
        let vocab = 333;
        let logits: Vec<f32> = (0..rows * vocab).map(|i| (i % 17) as f32 * 0.3).collect();
        let labels: Vec<i64> = (0..rows as i64).collect();
        for mask in [vec![true; rows], vec![false; rows]] {
            let case = Case {
                rows,
                vocab,
                logits: logits.clone(),
                labels: labels.clone(),
                mask,
                weights: None,
                options: CeOptions::default(),
            };
            run_case::<f32>(&case, false);
        }
        // No masked row: token mean is 0, not NaN, and the gradient is all zeros.
        let mask = vec![false; rows];
        let input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
        let out = EmulatedMaskedCrossEntropy::new()
            .forward_backward(&input, &CeOptions::default())
            .unwrap();
        assert_eq!((out.count, out.loss), (0, 0.0));
        assert!(out.grad.unwrap().iter().all(|&g| g == 0.0));
    }

    #[test]
    fn strided_rows_and_in_place() {
        // Row stride larger than vocab (a view into a wider buffer), vocab not a multiple of 8.
        let (rows, vocab, stride) = (5, 37, 48);
        let logits: Vec<f32> = (0..rows * stride)
            .map(|i| ((i * 31) % 23) as f32 * 0.25 - 2.0)
            .collect();
        let labels: Vec<i32> = vec![0, 36, 5, 17, 2];
        let mask = vec![true, false, true, true, true];
        let input = CeInput {
            logits: &logits,
            shape: LogitsShape {
                rows,
                vocab,
                row_stride: stride,
            },
            labels: Labels::I32(&labels),
            mask: &mask,
            weights: None,
        };
        let kernel = EmulatedMaskedCrossEntropy::new();
        let separate = kernel
            .forward_backward(&input, &CeOptions::default())
            .unwrap();
        let in_place = kernel
            .forward_backward_in_place(&input, &CeOptions::default())
            .unwrap();
        let (separate, in_place) = (separate.grad.unwrap(), in_place.grad.unwrap());
        for r in 0..rows {
            assert_eq!(
                &in_place[r * stride..r * stride + vocab],
                &separate[r * vocab..(r + 1) * vocab]
            );
            // Columns past vocab are not touched.
            assert_eq!(
                &in_place[r * stride + vocab..(r + 1) * stride],
                &logits[r * stride + vocab..(r + 1) * stride]
            );
        }
    }

    #[test]
    fn a_bad_label_on_a_masked_row_is_a_typed_error_not_a_read() {
        let logits = vec![0.5f32; 2 * 10];
        let mask = vec![true, false];
        let kernel = EmulatedMaskedCrossEntropy::new();
        for bad in [10i64, -1, i64::MAX] {
            let labels = vec![bad, 3];
            let input = CeInput::new(&logits, 10, Labels::I64(&labels), &mask);
            assert!(matches!(
                kernel.forward(&input, &CeOptions::default()),
                Err(Error::DeviceLabelOutOfRange)
            ));
        }
        // On an unmasked row a bad label is never looked at.
        let labels = vec![3i64, -100];
        let input = CeInput::new(&logits, 10, Labels::I64(&labels), &mask);
        assert!(kernel.forward(&input, &CeOptions::default()).is_ok());
    }
}
