//! What only the emulator has: its CUDA built-ins tested on their own, the kernels' ABI as its C++
//! compiler lays it out, and the in-place gradient on host memory. The kernel properties themselves run
//! on every device in `tests/backends.rs`.
#![cfg(feature = "emulation")]

use sft_collate::backend::abi::ABI_LAYOUT;
use sft_collate::backend::emulation::{abi_layout, selftest_reduce, Emulator, Grad};
use sft_collate::loss::{CeInput, CeOptions, CeRequest, Labels, LogitsShape};

#[test]
fn the_generated_abi_matches_the_compiled_kernels() {
    let cpp = abi_layout();
    assert_eq!(
        cpp.len(),
        ABI_LAYOUT.len(),
        "one entry per struct and field"
    );
    for ((what, rust), c) in ABI_LAYOUT.iter().zip(&cpp) {
        assert_eq!(*rust as u64, *c, "{what}: Rust {rust}, C++ {c}");
    }
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

/// `rows` rows of `vocab` logits, `stride` apart, with i32 labels and a mask.
fn strided<'a>(
    logits: &'a [f32],
    (rows, vocab, stride): (usize, usize, usize),
    labels: &'a [i32],
    mask: &'a [bool],
) -> CeInput<'a, f32> {
    CeInput {
        logits,
        shape: LogitsShape {
            rows,
            vocab,
            row_stride: stride,
        },
        labels: Labels::I32(labels),
        mask: Some(mask),
        weights: None,
        cu_seqlens: None,
    }
}

#[test]
fn in_place_gradient_equals_the_separate_one_and_spares_the_stride() {
    let (rows, vocab, stride) = (5, 37, 48);
    let logits: Vec<f32> = (0..rows * stride)
        .map(|i| ((i * 31) % 23) as f32 * 0.25 - 2.0)
        .collect();
    let labels: Vec<i32> = vec![0, 36, 5, 17, 2];
    let mask = vec![true, false, true, true, true];
    let input = strided(&logits, (rows, vocab, stride), &labels, &mask);
    let emulator = Emulator::new();
    let run = |grad| {
        emulator
            .cross_entropy(&input, &CeOptions::default(), CeRequest::default(), grad)
            .unwrap()
            .grad
            .unwrap()
    };
    let (separate, in_place) = (run(Grad::Separate), run(Grad::InPlace));
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
fn the_upstream_gradient_by_pointer_equals_by_value() {
    use sft_collate::loss::Normalization;
    let (rows, vocab) = (7, 301);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919) % 1009) as f32 / 50.0 - 10.0)
        .collect();
    let labels: Vec<i64> = (0..rows as i64).map(|r| r * 41 % vocab as i64).collect();
    let mask = vec![true, true, false, true, true, false, true];
    let input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
    let options = CeOptions {
        normalization: Normalization::Sum,
        upstream: -2.75,
        ..CeOptions::default()
    };
    let run = |upstream_by_pointer| {
        Emulator {
            upstream_by_pointer,
            ..Emulator::default()
        }
        .cross_entropy(&input, &options, CeRequest::default(), Grad::Separate)
        .unwrap()
    };
    let (by_value, by_pointer) = (run(false), run(true));
    assert_eq!(by_value, by_pointer);
    assert!(by_value.grad.unwrap().iter().any(|&g| g != 0.0));
}

#[test]
fn one_read_plans_the_smallest_cluster_that_holds_the_row() {
    use sft_collate::backend::abi::{ClusterPlan, CE_CLUSTER_HEAD};
    let head = CE_CLUSTER_HEAD as usize;
    // 1,000 f32 columns: one CTA needs 4,000 bytes + head; two need 500 columns each, rounded up to 504
    // (2,016 bytes); four 256 (1,024 bytes).
    let plan = ClusterPlan::for_row(1000, 4, head + 2016).unwrap();
    assert_eq!((plan.ctas, plan.slice), (2, 504));
    assert_eq!(plan.smem_bytes as usize, head + 504 * 4);
    let plan = ClusterPlan::for_row(1000, 4, head + 2015).unwrap();
    assert_eq!((plan.ctas, plan.slice), (4, 256));
    assert_eq!(ClusterPlan::for_row(1000, 4, head + 4000).unwrap().ctas, 1);
    // Slices are multiples of 8 columns (16-byte aligned for every dtype); 8 CTAs at most.
    let plan = ClusterPlan::for_row(151_936, 2, 227 * 1024).unwrap();
    assert_eq!((plan.ctas, plan.slice), (2, 75_968));
    assert!(ClusterPlan::for_row(151_936, 4, 16 * 1024).is_none());
    assert_eq!(ClusterPlan::for_row(1, 4, head + 32).unwrap().slice, 8);
    // Grids are whole clusters.
    let launch = ClusterPlan::for_row(1000, 4, head + 1024)
        .unwrap()
        .launch(7);
    assert_eq!(launch.grid[0], 7 * 4);
}

#[test]
fn one_read_in_place_gradient_equals_the_separate_one() {
    // Rows split over 4 CTAs (160 bytes of row each: 40 f32 columns), a stride that misaligns every
    // other row (the scalar paths), and an unaligned one.
    let (rows, vocab) = (6, 150);
    for stride in [152, 155] {
        let logits: Vec<f32> = (0..rows * stride)
            .map(|i| ((i * 37) % 29) as f32 * 0.3 - 4.0)
            .collect();
        let labels: Vec<i32> = vec![0, 149, 40, 41, 79, 120];
        let mask = vec![true, true, false, true, true, true];
        let input = strided(&logits, (rows, vocab, stride), &labels, &mask);
        let one_read = Emulator {
            ce_row_kernel: sft_collate::CeRowKernel::OneRead {
                smem_per_cta: Some(sft_collate::backend::abi::CE_CLUSTER_HEAD as usize + 160),
            },
            ..Emulator::default()
        };
        let run = |emulator: &Emulator, grad| {
            emulator
                .cross_entropy(&input, &CeOptions::default(), CeRequest::default(), grad)
                .unwrap()
        };
        let (separate, in_place) = (
            run(&one_read, Grad::Separate),
            run(&one_read, Grad::InPlace),
        );
        let two_pass = run(&Emulator::new(), Grad::Separate);
        let (separate, in_place) = (separate.grad.unwrap(), in_place.grad.unwrap());
        let two_pass = two_pass.grad.unwrap();
        for r in 0..rows {
            assert_eq!(
                &in_place[r * stride..r * stride + vocab],
                &separate[r * vocab..(r + 1) * vocab],
                "stride {stride}, row {r}"
            );
            assert_eq!(
                &in_place[r * stride + vocab..(r + 1) * stride],
                &logits[r * stride + vocab..(r + 1) * stride]
            );
            for c in 0..vocab {
                let (a, b) = (separate[r * vocab + c], two_pass[r * vocab + c]);
                assert!(
                    (a - b).abs() <= 1e-6 + 1e-5 * b.abs(),
                    "row {r} col {c}: {a} vs {b}"
                );
            }
        }
        assert!(separate.iter().any(|&g| g != 0.0));
    }
}
