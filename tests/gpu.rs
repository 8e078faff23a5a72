//! The CUDA backend on a real GPU, compared bit for bit with the CPU oracle. These tests need a device:
//! they are ignored by default and run by `scripts/gpu-check.sh` (`cargo test -- --ignored`).
#![cfg(feature = "cuda")]

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sft_collate::cuda::{self, CudaCollator};
use sft_collate::{cpu, CollateSpec, IdDtype, LabelFormat, PackedBatch};

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

fn spec_strategy() -> impl Strategy<Value = CollateSpec> {
    (
        prop::option::of(1usize..70),
        prop_oneof![Just(LabelFormat::Pad), Just(LabelFormat::IGNORE_INDEX)],
        prop_oneof![Just(IdDtype::I32), Just(IdDtype::I64)],
        0u32..200_000,
        any::<bool>(),
    )
        .prop_map(
            |(pad_to_multiple_of, label_format, id_dtype, pad, attention_mask)| CollateSpec {
                pad_id: Some(pad),
                pad_to_multiple_of,
                label_format,
                id_dtype,
                attention_mask,
                ..Default::default()
            },
        )
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
        .run(&(batches, spec_strategy()), |(packed, spec)| {
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
