//! Every kernel property, written once and run on every device present (as candle's `test_device!`):
//! the CPU always, the emulator (the same `.cu` on CPU threads) with `--features emulation`, and the GPU
//! (ignored without one; `scripts/gpu-check.sh` runs them with `--ignored`). Each compares a device's
//! results with the CPU oracle: bit for bit for collation, within the documented tolerances for the
//! cross-entropy.

mod common;

use common::ce::{case_strategy, check, extreme_rows_case, non_finite_case, Case};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sft_collate::backend::cpu;
use sft_collate::loss::{
    CeInput, CeOptions, CeRequest, Labels, LogitElem, LogitsShape, Normalization,
};
use sft_collate::{CollateSpec, Device, DeviceKind, Error, IdDtype, LabelFormat, RaggedBatch};

device_tests!(
    collate_matches_the_oracle,
    pack_matches_the_oracle,
    trainable_flags_of_multi_segment_rows,
    wide_rows_and_many_rows,
    pack_across_many_blocks,
    edge_batches,
    refuses_bad_input_before_launch,
    cross_entropy_matches_the_oracle,
    cross_entropy_extreme_rows,
    cross_entropy_hundreds_of_rows,
    cross_entropy_all_or_nothing_masked,
    cross_entropy_strided_rows,
    cross_entropy_bad_labels,
    cross_entropy_non_finite_logits,
    cross_entropy_options_on_extreme_rows,
    cross_entropy_sequence_mean_of_a_packed_batch,
);

// Not `cross_entropy_hundreds_of_rows`: on the emulator it costs two minutes and checks nothing the
// others do not (its vocabulary takes one CTA; the random cases have weights and many rows).
one_read_tests!(
    cross_entropy_matches_the_oracle,
    cross_entropy_extreme_rows,
    cross_entropy_all_or_nothing_masked,
    cross_entropy_strided_rows,
    cross_entropy_bad_labels,
    cross_entropy_non_finite_logits,
    cross_entropy_options_on_extreme_rows,
    cross_entropy_sequence_mean_of_a_packed_batch,
);

/// Random cases per property: many where a case is cheap (CPU, GPU), fewer on the emulator (a thread
/// per CUDA thread).
fn runner(device: &Device, cheap: u32, emulated: u32) -> TestRunner {
    let cases = match device.kind() {
        DeviceKind::Emulated => emulated,
        _ => cheap,
    };
    TestRunner::new(Config {
        cases,
        max_shrink_iters: 50,
        ..Config::default()
    })
}

fn pairs(
    max_rows: usize,
    max_prompt: usize,
    max_output: usize,
) -> impl Strategy<Value = RaggedBatch> {
    prop::collection::vec(
        (
            prop::collection::vec(0u32..200_000, 0..max_prompt),
            prop::collection::vec(0u32..200_000, 0..max_output),
        ),
        0..max_rows,
    )
    .prop_map(RaggedBatch::from_pairs)
}

fn collate_matches_the_oracle(device: &Device) {
    let (rows, prompt, output) = match device.kind() {
        DeviceKind::Cuda => (40, 300, 1500),
        _ => (9, 40, 40),
    };
    runner(device, 300, 64)
        .run(
            &(pairs(rows, prompt, output), common::spec_strategy(70)),
            |(batch, spec)| {
                let want = cpu::collate(&batch, &spec).unwrap();
                let got = device.collate(&batch, &spec).unwrap().to_host().unwrap();
                prop_assert_eq!(got, want);
                Ok(())
            },
        )
        .unwrap();
}

fn pack_matches_the_oracle(device: &Device) {
    runner(device, 200, 48)
        .run(
            &(pairs(30, 200, 900), common::spec_strategy(70)),
            |(batch, spec)| {
                let want = cpu::collate_pack(&batch, &spec).unwrap();
                let got = device
                    .collate_pack(&batch, &spec)
                    .unwrap()
                    .to_host()
                    .unwrap();
                prop_assert_eq!(got, want);
                Ok(())
            },
        )
        .unwrap();
}

fn trainable_flags_of_multi_segment_rows(device: &Device) {
    let rows = prop::collection::vec(
        prop::collection::vec(
            (prop::collection::vec(0u32..200_000, 0..40), any::<bool>()),
            0..8,
        ),
        0..20,
    );
    runner(device, 100, 24)
        .run(&(rows, common::spec_strategy(70)), |(rows, spec)| {
            let segments: Vec<Vec<(&[u32], bool)>> = rows
                .iter()
                .map(|r| r.iter().map(|(t, f)| (t.as_slice(), *f)).collect())
                .collect();
            let batch = RaggedBatch::from_segments(segments);
            prop_assert_eq!(
                device.collate(&batch, &spec).unwrap().to_host().unwrap(),
                cpu::collate(&batch, &spec).unwrap()
            );
            prop_assert_eq!(
                device
                    .collate_pack(&batch, &spec)
                    .unwrap()
                    .to_host()
                    .unwrap(),
                cpu::collate_pack(&batch, &spec).unwrap()
            );
            Ok(())
        })
        .unwrap();
}

fn wide_rows_and_many_rows(device: &Device) {
    // Widths past 1024 positions need blockIdx.x > 0, at every alignment; on a GPU, more rows than one
    // gridDim.y holds (the kernel walks rows grid-stride).
    for extra in [0u32, 1, 2, 3] {
        let batch = RaggedBatch::from_pairs([
            (
                (0..700).collect::<Vec<u32>>(),
                (0..(1800 + extra)).collect(),
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
            let want = cpu::collate(&batch, &spec).unwrap();
            assert_eq!(
                device.collate(&batch, &spec).unwrap().to_host().unwrap(),
                want
            );
        }
    }
    let many = match device.kind() {
        DeviceKind::Cuda => 70_000u32,
        _ => 300,
    };
    let mut rows: Vec<(Vec<u32>, Vec<u32>)> = (0..many)
        .map(|i| (vec![i; 1], vec![i; (i % 3) as usize]))
        .collect();
    rows.push(((0..3000).collect(), (0..2000).collect()));
    let batch = RaggedBatch::from_pairs(rows);
    let spec = CollateSpec {
        pad_id: Some(7),
        attention_mask: true,
        ..Default::default()
    };
    let want = cpu::collate(&batch, &spec).unwrap();
    assert_eq!(
        device.collate(&batch, &spec).unwrap().to_host().unwrap(),
        want
    );
}

fn pack_across_many_blocks(device: &Device) {
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
    let batch = RaggedBatch::from_pairs(pairs);
    for id_dtype in [IdDtype::I32, IdDtype::I64] {
        let spec = CollateSpec {
            pad_id: Some(7),
            id_dtype,
            pad_to_multiple_of: Some(128),
            label_format: LabelFormat::IGNORE_INDEX,
            ..Default::default()
        };
        let want = cpu::collate_pack(&batch, &spec).unwrap();
        let got = device
            .collate_pack(&batch, &spec)
            .unwrap()
            .to_host()
            .unwrap();
        assert_eq!(got, want);
    }
}

fn edge_batches(device: &Device) {
    let spec = CollateSpec {
        pad_id: Some(1),
        ..Default::default()
    };
    for batch in [
        RaggedBatch::new(),
        RaggedBatch::from_pairs([(vec![3], vec![])]),
        RaggedBatch::from_pairs([(vec![], vec![])]),
        RaggedBatch::from_pairs([(vec![], vec![4, 5]), (vec![6, 7], vec![])]),
    ] {
        let want = cpu::collate(&batch, &spec).unwrap();
        assert_eq!(
            device.collate(&batch, &spec).unwrap().to_host().unwrap(),
            want
        );
        let want = cpu::collate_pack(&batch, &spec).unwrap();
        let got = device
            .collate_pack(&batch, &spec)
            .unwrap()
            .to_host()
            .unwrap();
        assert_eq!(got, want);
    }
}

fn refuses_bad_input_before_launch(device: &Device) {
    assert!(RaggedBatch::from_parts(vec![1, 2, 3], vec![0, 5], vec![0]).is_err());
    // Ids that do not fit i32 are refused before launch, as on the CPU.
    let batch = RaggedBatch::from_pairs([(vec![u32::MAX], vec![1])]);
    let spec = CollateSpec {
        pad_id: Some(0),
        ..Default::default()
    };
    assert!(matches!(
        device.collate(&batch, &spec),
        Err(Error::IdOverflow { .. })
    ));
    assert!(device.collate_pack(&batch, &spec).is_err());
}

// ---- The masked cross-entropy against the f64 oracle.

fn run_ce_case<T: LogitElem>(device: &Device, case: &Case, labels_i32: bool) {
    let logits: Vec<T> = case.logits.iter().map(|&x| T::from_f32(x)).collect();
    let labels32: Vec<i32> = case.labels.iter().map(|&l| l as i32).collect();
    let input = case.input(
        &logits,
        match labels_i32 {
            true => Labels::I32(&labels32),
            false => Labels::I64(&case.labels),
        },
    );
    let what = format!(
        "{} {} {}x{}",
        device.kind(),
        T::SUFFIX,
        case.rows,
        case.vocab
    );
    let want = cpu::loss::masked_cross_entropy(&input, &case.options, true).unwrap();
    let request = CeRequest::default();
    let forward = device
        .cross_entropy(&input, &case.options, request, false)
        .unwrap()
        .to_host()
        .unwrap();
    assert!(forward.grad.is_none());
    check(&forward, &want, &format!("{what} forward"));
    let both = device
        .cross_entropy(&input, &case.options, request, true)
        .unwrap()
        .to_host()
        .unwrap();
    check(&both, &want, &format!("{what} forward+backward"));
    // Outputs not asked for come back empty (the kernels' lean and entropy-only variants run); the
    // loss and what was asked for are the oracle's still.
    let lean = CeRequest {
        log_probs: true,
        ..CeRequest::NONE
    };
    let entropy_only = CeRequest {
        entropy: true,
        ..CeRequest::NONE
    };
    for (name, request) in [("lean", lean), ("entropy only", entropy_only)] {
        for with_grad in [false, true] {
            let out = device
                .cross_entropy(&input, &case.options, request, with_grad)
                .unwrap()
                .to_host()
                .unwrap();
            assert!(out.lse.is_empty() && out.argmax.is_empty() && out.row_loss.is_empty());
            assert_eq!(out.log_probs.is_empty(), !request.log_probs);
            assert_eq!(out.entropy.is_empty(), !request.entropy);
            assert_eq!(out.correct, 0);
            check(&out, &want, &format!("{what} {name} grad {with_grad}"));
        }
    }
}

fn cross_entropy_matches_the_oracle(device: &Device) {
    runner(device, 40, 10)
        .run(&(case_strategy(), any::<bool>()), |(case, labels_i32)| {
            run_ce_case::<f32>(device, &case, labels_i32);
            run_ce_case::<half::bf16>(device, &case, labels_i32);
            run_ce_case::<half::f16>(device, &case, labels_i32);
            Ok(())
        })
        .unwrap();
}

fn cross_entropy_extreme_rows(device: &Device) {
    let case = extreme_rows_case();
    run_ce_case::<f32>(device, &case, false);
    run_ce_case::<half::bf16>(device, &case, true);
    run_ce_case::<half::f16>(device, &case, false);
}

fn cross_entropy_hundreds_of_rows(device: &Device) {
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
        mask: Some((0..rows).map(|r| r % 3 != 1).collect()),
        weights: Some((0..rows).map(|r| (r % 5) as f32 * 0.5).collect()),
        cu_seqlens: Some(vec![0, 1, 100, 100, 250, 300]),
        options: CeOptions {
            normalization: Normalization::SequenceMean,
            ..CeOptions::default()
        },
    };
    run_ce_case::<f32>(device, &case, true);
    run_ce_case::<half::bf16>(device, &case, false);
}

fn cross_entropy_all_or_nothing_masked(device: &Device) {
    let (rows, vocab) = (9, 333);
    let logits: Vec<f32> = (0..rows * vocab).map(|i| (i % 17) as f32 * 0.3).collect();
    let labels: Vec<i64> = (0..rows as i64).collect();
    for mask in [vec![true; rows], vec![false; rows]] {
        let case = Case {
            rows,
            vocab,
            logits: logits.clone(),
            labels: labels.clone(),
            mask: Some(mask),
            weights: None,
            cu_seqlens: None,
            options: CeOptions::default(),
        };
        run_ce_case::<f32>(device, &case, false);
    }
    // No masked row: token mean is 0, not NaN, and the gradient is all zeros.
    let mask = vec![false; rows];
    let input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
    let out = device
        .cross_entropy(&input, &CeOptions::default(), CeRequest::default(), true)
        .unwrap()
        .to_host()
        .unwrap();
    assert_eq!((out.count, out.loss), (0, 0.0));
    assert!(out.grad.unwrap().iter().all(|&g| g == 0.0));
}

fn cross_entropy_strided_rows(device: &Device) {
    // Row stride larger than vocab (a view into a wider buffer), vocab not a multiple of 8: the result
    // is the dense problem's.
    let (rows, vocab, stride) = (5, 37, 48);
    let logits: Vec<f32> = (0..rows * stride)
        .map(|i| ((i * 31) % 23) as f32 * 0.25 - 2.0)
        .collect();
    let dense: Vec<f32> = logits
        .chunks(stride)
        .flat_map(|r| r[..vocab].to_vec())
        .collect();
    let labels: Vec<i32> = vec![0, 36, 5, 17, 2];
    let mask = vec![true, false, true, true, true];
    let strided = CeInput {
        logits: &logits,
        shape: LogitsShape {
            rows,
            vocab,
            row_stride: stride,
        },
        labels: Labels::I32(&labels),
        mask: Some(&mask),
        weights: None,
        cu_seqlens: None,
    };
    let options = CeOptions::default();
    let run = |input: &CeInput<'_, f32>| {
        device
            .cross_entropy(input, &options, CeRequest::default(), true)
            .unwrap()
            .to_host()
            .unwrap()
    };
    let want = cpu::loss::masked_cross_entropy(&strided, &options, true).unwrap();
    let got = run(&strided);
    check(&got, &want, &format!("{} strided", device.kind()));
    let dense_input = CeInput::new(&dense, vocab, Labels::I32(&labels), &mask);
    assert_eq!(run(&dense_input), got);
}

fn cross_entropy_bad_labels(device: &Device) {
    let logits = vec![0.5f32; 2 * 10];
    let mask = vec![true, false];
    let run = |labels: &[i64]| {
        let input = CeInput::new(&logits, 10, Labels::I64(labels), &mask);
        device
            .cross_entropy(&input, &CeOptions::default(), CeRequest::default(), true)
            .and_then(|out| out.to_host())
    };
    for bad in [10i64, -1, i64::MAX] {
        let err = run(&[bad, 3]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::DeviceLabelOutOfRange | Error::LabelOutOfRange { .. }
            ),
            "{err:?}"
        );
    }
    // On an unmasked row a bad label is never looked at.
    assert!(run(&[3, -100]).is_ok());
}

fn cross_entropy_non_finite_logits(device: &Device) {
    // NaN and infinities as PyTorch treats them, on every device as in the oracle (tests/masked_ce.rs
    // pins the oracle's own values): the tail path (vocab 37), the vector path (1000).
    for vocab in [37, 1000] {
        let case = non_finite_case(vocab);
        run_ce_case::<f32>(device, &case, false);
        run_ce_case::<half::bf16>(device, &case, true);
        run_ce_case::<half::f16>(device, &case, false);
    }
}

/// Every option on rows that stress the numerics (±1e4 logits, -inf entries, a peaked row) and on
/// non-finite ones: the options' terms keep PyTorch's NaN and infinity semantics, as the oracle does.
fn cross_entropy_options_on_extreme_rows(device: &Device) {
    let option_sets = [
        CeOptions {
            z_loss: 1e-4,
            ..CeOptions::default()
        },
        CeOptions {
            label_smoothing: 0.1,
            ..CeOptions::default()
        },
        CeOptions {
            softcap: Some(30.0),
            ..CeOptions::default()
        },
        CeOptions {
            z_loss: 1e-4,
            label_smoothing: 1.0,
            softcap: Some(3.0),
            normalization: Normalization::SequenceMean,
            upstream: 0.5,
            ignore_index: None,
        },
    ];
    for options in option_sets {
        let mut case = extreme_rows_case();
        case.options = options;
        run_ce_case::<f32>(device, &case, false);
        run_ce_case::<half::bf16>(device, &case, true);
        for vocab in [37, 1000] {
            let mut case = non_finite_case(vocab);
            case.options = options;
            run_ce_case::<f32>(device, &case, false);
        }
    }
}

/// The padding-free layout: documents of different lengths packed in one row set, the per-sequence
/// mean from cu_seqlens, trained rows chosen by ignore_index labels (no mask) as a collator writes
/// them; a long document weighs as much as a short one.
fn cross_entropy_sequence_mean_of_a_packed_batch(device: &Device) {
    let vocab = 300;
    let lengths = [3usize, 120, 1, 40, 0, 77];
    let rows: usize = lengths.iter().sum();
    let mut cu = vec![0i32];
    for l in lengths {
        cu.push(cu.last().unwrap() + l as i32);
    }
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919) % 2003) as f32 / 100.0 - 10.0)
        .collect();
    // The first third of each document is its prompt: ignored.
    let mut labels = Vec::new();
    for l in lengths {
        labels.extend((0..l).map(|i| {
            if i < l / 3 {
                -100
            } else {
                ((i * 13) % vocab) as i64
            }
        }));
    }
    let case = Case {
        rows,
        vocab,
        logits,
        labels,
        mask: None,
        weights: None,
        cu_seqlens: Some(cu),
        options: CeOptions {
            normalization: Normalization::SequenceMean,
            ignore_index: Some(-100),
            ..CeOptions::default()
        },
    };
    run_ce_case::<f32>(device, &case, false);
    run_ce_case::<half::bf16>(device, &case, true);
}
