//! The CUDA backend on a real GPU, compared bit for bit with the CPU oracle. These tests need a device:
//! they are ignored by default and run by `scripts/gpu-check.sh` (`cargo test -- --ignored`).
#![cfg(feature = "cuda")]

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sft_collate::cuda::{self, CudaCollator};
use sft_collate::{cpu, CollateSpec, PackedBatch};

#[test]
fn probing_never_panics() {
    // On a machine without libcuda this is an error; with a GPU it is a count. Either way, no panic.
    match cuda::device_count() {
        Ok(n) => assert!(n > 0),
        Err(e) => eprintln!("no GPU here: {e}"),
    }
}

fn collator() -> CudaCollator {
    let stream = cuda::default_stream(0).expect("a CUDA device");
    let collator = CudaCollator::new(stream).expect("kernels load");
    eprintln!("collate module: {:?}", collator.origin());
    collator
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_kernel_matches_the_oracle_on_random_batches() {
    let collator = collator();
    let batches = prop::collection::vec(
        (
            prop::collection::vec(0u32..200_000, 0..300),
            prop::collection::vec(0u32..200_000, 0..1500),
        ),
        0..40,
    )
    .prop_map(PackedBatch::from_pairs);
    let mut runner = TestRunner::new(Config::with_cases(300));
    runner
        .run(&(batches, common::spec_strategy(70)), |(packed, spec)| {
            let want = cpu::collate(&packed, &spec).unwrap();
            let got = collator.collate(&packed, &spec).unwrap().to_host().unwrap();
            prop_assert_eq!(got, want);
            Ok(())
        })
        .unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_large_batch_and_edges() {
    let collator = collator();
    let spec = CollateSpec {
        pad_id: Some(7),
        attention_mask: true,
        ..Default::default()
    };
    // More rows than one gridDim.y could hold, and rows several blocks wide.
    let mut rows: Vec<(Vec<u32>, Vec<u32>)> = (0..70_000u32)
        .map(|i| (vec![i; 1], vec![i; (i % 3) as usize]))
        .collect();
    rows.push(((0..3000).collect(), (0..2000).collect()));
    for packed in [
        PackedBatch::from_pairs(rows),
        PackedBatch::new(),
        PackedBatch::from_pairs([(vec![1], vec![])]),
    ] {
        let want = cpu::collate(&packed, &spec).unwrap();
        let got = collator.collate(&packed, &spec).unwrap();
        assert_eq!(got.shape(), want.shape());
        assert_eq!(got.to_host().unwrap(), want);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_refuses_bad_input_before_launch() {
    let collator = collator();
    let packed = PackedBatch::from_pairs([(vec![u32::MAX], vec![1])]);
    let spec = CollateSpec {
        pad_id: Some(0),
        ..Default::default()
    };
    assert!(collator.collate(&packed, &spec).is_err());
}

// ---- The fused masked cross-entropy kernels on the GPU against the f64 oracle.

mod ce {
    use super::common::ce::{case_strategy, check, extreme_rows_case, Case};
    use proptest::test_runner::{Config, TestRunner};
    use sft_collate::cpu::loss::masked_cross_entropy;
    use sft_collate::cuda::{self, CeRequest, DeviceCeTargets, DeviceLabels, MaskedCrossEntropy};
    use sft_collate::loss::{CeInput, Labels, LogitElem, LogitsShape};
    use sft_collate::Error;

    fn run_case<T: LogitElem + cudarc::driver::DeviceRepr>(ce: &MaskedCrossEntropy, case: &Case) {
        let stream = cuda::default_stream(0).unwrap();
        let logits: Vec<T> = case.logits.iter().map(|&x| T::from_f32(x)).collect();
        let shape = LogitsShape::dense(case.rows, case.vocab);
        let input = CeInput {
            logits: &logits,
            shape,
            labels: Labels::I64(&case.labels),
            mask: &case.mask,
            weights: case.weights.as_deref(),
        };
        let want = masked_cross_entropy(&input, &case.options, true).unwrap();
        let d_logits = stream.clone_htod(&logits).unwrap();
        let d_labels = stream.clone_htod(&case.labels).unwrap();
        let mask: Vec<u8> = case.mask.iter().map(|&m| u8::from(m)).collect();
        let d_mask = stream.clone_htod(&mask).unwrap();
        let d_weights = case.weights.as_ref().map(|w| stream.clone_htod(w).unwrap());
        let targets = DeviceCeTargets {
            shape,
            labels: DeviceLabels::I64(&d_labels),
            mask: &d_mask,
            weights: d_weights.as_ref(),
        };
        let what = format!("cuda {} {}x{}", T::SUFFIX, case.rows, case.vocab);
        let forward = ce
            .forward(&d_logits, &targets, &case.options, CeRequest::default())
            .unwrap();
        check(
            &forward.to_host().unwrap(),
            &want,
            &format!("{what} forward"),
        );
        let both = ce
            .forward_backward(&d_logits, &targets, &case.options, CeRequest::default())
            .unwrap()
            .to_host()
            .unwrap();
        check(&both, &want, &format!("{what} forward_backward"));
        let mut in_place = d_logits.clone();
        let out = ce
            .forward_backward_in_place(&mut in_place, &targets, &case.options, CeRequest::default())
            .unwrap();
        out.check().unwrap();
        assert_eq!(
            Some(stream.clone_dtoh(&in_place).unwrap()),
            both.grad,
            "{what}: in place"
        );
    }

    fn kernels() -> MaskedCrossEntropy {
        MaskedCrossEntropy::new(cuda::default_stream(0).expect("a CUDA device"))
            .expect("kernels load")
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn cuda_masked_ce_matches_the_oracle() {
        let ce = kernels();
        let mut runner = TestRunner::new(Config::with_cases(40));
        runner
            .run(&case_strategy(), |case| {
                run_case::<f32>(&ce, &case);
                run_case::<half::bf16>(&ce, &case);
                run_case::<half::f16>(&ce, &case);
                Ok(())
            })
            .unwrap();
        let extreme = extreme_rows_case();
        run_case::<f32>(&ce, &extreme);
        run_case::<half::bf16>(&ce, &extreme);
        run_case::<half::f16>(&ce, &extreme);
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn cuda_masked_ce_flags_bad_labels() {
        let ce = kernels();
        let stream = cuda::default_stream(0).unwrap();
        let logits = stream.clone_htod(&vec![0.5f32; 20]).unwrap();
        let labels = stream.clone_htod(&[10i32, 3]).unwrap();
        let mask = stream.clone_htod(&[1u8, 0]).unwrap();
        let targets = DeviceCeTargets {
            shape: LogitsShape::dense(2, 10),
            labels: DeviceLabels::I32(&labels),
            mask: &mask,
            weights: None,
        };
        let out = ce
            .forward(&logits, &targets, &Default::default(), CeRequest::default())
            .unwrap();
        assert!(matches!(out.check(), Err(Error::DeviceLabelOutOfRange)));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_packed_layout_matches_the_oracle() {
    let collator = collator();
    let batches = prop::collection::vec(
        (
            prop::collection::vec(0u32..200_000, 0..200),
            prop::collection::vec(0u32..200_000, 0..900),
        ),
        0..30,
    )
    .prop_map(PackedBatch::from_pairs);
    let mut runner = TestRunner::new(Config::with_cases(200));
    runner
        .run(&(batches, common::spec_strategy(70)), |(packed, spec)| {
            let want = cpu::collate_packed(&packed, &spec).unwrap();
            let got = collator
                .collate_packed(&packed, &spec)
                .unwrap()
                .to_host()
                .unwrap();
            prop_assert_eq!(got, want);
            Ok(())
        })
        .unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_follows_trainable_flags_of_multi_segment_rows() {
    let collator = collator();
    let rows = prop::collection::vec(
        prop::collection::vec(
            (prop::collection::vec(0u32..200_000, 0..40), any::<bool>()),
            0..8,
        ),
        0..20,
    );
    let mut runner = TestRunner::new(Config::with_cases(100));
    runner
        .run(&(rows, common::spec_strategy(70)), |(rows, spec)| {
            let segments: Vec<Vec<(&[u32], bool)>> = rows
                .iter()
                .map(|r| r.iter().map(|(t, f)| (t.as_slice(), *f)).collect())
                .collect();
            let packed = PackedBatch::from_segments(segments);
            prop_assert_eq!(
                collator.collate(&packed, &spec).unwrap().to_host().unwrap(),
                cpu::collate(&packed, &spec).unwrap()
            );
            prop_assert_eq!(
                collator
                    .collate_packed(&packed, &spec)
                    .unwrap()
                    .to_host()
                    .unwrap(),
                cpu::collate_packed(&packed, &spec).unwrap()
            );
            Ok(())
        })
        .unwrap();
}
