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

#[test]
fn in_place_gradient_equals_the_separate_one_and_spares_the_stride() {
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
        mask: Some(&mask),
        weights: None,
        cu_seqlens: None,
    };
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
        }
        .cross_entropy(&input, &options, CeRequest::default(), Grad::Separate)
        .unwrap()
    };
    let (by_value, by_pointer) = (run(false), run(true));
    assert_eq!(by_value, by_pointer);
    assert!(by_value.grad.unwrap().iter().any(|&g| g != 0.0));
}
