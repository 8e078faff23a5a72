//! Masked cross-entropy test helpers shared by the emulated and the GPU tests: random cases, and the
#![allow(dead_code)]
//! comparison of kernel outputs with the f64 oracle.

use proptest::prelude::*;
use sft_collate::backend::cpu::loss::CeReference;
use sft_collate::loss::{CeInput, CeOptions, CeOutput, Labels, LogitElem, Normalization};

/// |got - want| <= rtol·|want| + atol; NaN only where NaN is expected, an infinity only where the same
/// infinity is.
pub fn close(got: f64, want: f64, rtol: f64, atol: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    if want.is_infinite() || got.is_infinite() {
        return got == want;
    }
    (got - want).abs() <= rtol * want.abs() + atol
}

/// The scalar outputs within 1e-5 relative of the f64 oracle for every dtype (the kernel reads the
/// same values the oracle reads and computes in f32); the gradient within 1e-5 for f32 and 1e-2 for
/// f16/bf16 (it is rounded once to the logits' dtype; f16 underflows below 2^-24).
pub fn check<T: LogitElem>(got: &CeOutput<T>, want: &CeReference, what: &str) {
    let rows = [&got.log_probs, &got.entropy, &got.lse, &got.row_loss];
    check_rows(rows.map(Vec::as_slice), want, (1e-5, 1e-6), what);
    if !got.argmax.is_empty() {
        assert_eq!(got.argmax, want.argmax, "{what}: argmax");
        assert_eq!(got.correct as usize, want.correct, "{what}: correct");
    }
    assert_eq!(got.count as usize, want.count, "{what}: count");
    assert_eq!(got.documents as usize, want.documents, "{what}: documents");
    assert!(
        close(f64::from(got.z_sum), want.z_sum, 1e-5, 1e-6),
        "{what}: z_sum {} vs {}",
        got.z_sum,
        want.z_sum
    );
    assert!(
        close(f64::from(got.sum), want.sum, 1e-5, 1e-6),
        "{what}: sum {} vs {}",
        got.sum,
        want.sum
    );
    assert!(
        close(f64::from(got.loss), want.loss, 1e-5, 1e-7),
        "{what}: loss {} vs {}",
        got.loss,
        want.loss
    );
    if let (Some(g), Some(w)) = (&got.grad, &want.grad) {
        let (rtol, atol) = match T::SUFFIX {
            "f32" => (1e-5, 1e-9),
            "bf16" => (1e-2, 1e-30),
            _ => (1e-2, 1e-7),
        };
        let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
        // With label smoothing a gradient element is `c·(p - ε/V)`, and where `p` is near `ε/V` the f32
        // error of `p` (about 1e-6 of it, and `p ≈ ε/V ≤ 1/V`) is not small relative to the difference,
        // whatever the output dtype. So each element is also allowed 1e-5 of its row's largest gradient
        // (about `c`) over the row's width (at most V): above that error, far below the element's terms.
        let width = (w.len() / want.lse.len().max(1)).max(1);
        for (r, (g_row, w_row)) in g.chunks(width).zip(w.chunks(width)).enumerate() {
            let row_scale = w_row.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (j, (g, &w)) in g_row.iter().zip(w_row).enumerate() {
                let g = g.to_f64();
                let atol = (atol * scale.max(1.0)).max(1e-5 * row_scale / width as f64);
                assert!(
                    close(g, w, rtol, atol),
                    "{what}: grad[{}] = {g}, want {w}",
                    r * width + j
                );
            }
        }
    }
}

/// Per-row outputs (log-probs, entropy, lse, row losses, in that order; any float type) against the
/// oracle's, within `(rtol, atol)`.
pub fn check_rows<G: Copy + Into<f64> + std::fmt::Display>(
    got: [&[G]; 4],
    want: &CeReference,
    (rtol, atol): (f64, f64),
    what: &str,
) {
    let names = ["log_probs", "entropy", "lse", "row_loss"];
    let wants = [&want.log_probs, &want.entropy, &want.lse, &want.row_loss];
    for ((name, g), w) in names.into_iter().zip(got).zip(wants) {
        for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
            assert!(
                close(g.into(), w, rtol, atol),
                "{what}: {name}[{i}] = {g}, want {w}"
            );
        }
    }
}

#[derive(Debug)]
pub struct Case {
    pub rows: usize,
    pub vocab: usize,
    pub logits: Vec<f32>,
    pub labels: Vec<i64>,
    /// `None`: trained where the label is not the options' ignore_index.
    pub mask: Option<Vec<bool>>,
    pub weights: Option<Vec<f32>>,
    pub cu_seqlens: Option<Vec<i32>>,
    pub options: CeOptions,
}

impl Case {
    /// The case as the library takes it, with `logits` converted to the dtype under test.
    pub fn input<'a, T>(&'a self, logits: &'a [T], labels: Labels<'a>) -> CeInput<'a, T> {
        CeInput {
            mask: self.mask.as_deref(),
            weights: self.weights.as_deref(),
            cu_seqlens: self.cu_seqlens.as_deref(),
            ..CeInput::unmasked(logits, self.vocab, labels)
        }
    }
}

/// Options drawn for a case: the normalization (with document boundaries for the per-sequence mean),
/// ignore_index instead of a mask, z-loss, label smoothing, softcap.
pub fn options_of(bits: u32, rows: usize, upstream: f32) -> CeOptions {
    let normalization = match bits % 5 {
        0 => Normalization::TokenMean,
        1 => Normalization::Sum,
        2 => Normalization::SequenceMean,
        _ => Normalization::Cs336 {
            normalize_constant: 3.5,
            batch_size: rows,
            gradient_accumulation_steps: 2,
        },
    };
    let pick = |shift: u32, on: f32| if bits >> shift & 1 == 1 { on } else { 0.0 };
    CeOptions {
        normalization,
        upstream,
        ignore_index: (bits >> 3 & 1 == 1).then_some(-100),
        z_loss: pick(4, 1e-3),
        label_smoothing: pick(5, 0.1),
        softcap: (bits >> 6 & 1 == 1).then_some(7.5),
    }
}

pub fn case_strategy() -> impl Strategy<Value = Case> {
    let vocab = prop_oneof![
        Just(1usize),
        Just(7),
        Just(8),
        Just(997),
        Just(4096),
        Just(32_003),
        Just(50_000),
        2usize..300
    ];
    (
        1usize..10,
        vocab,
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
        0.1f32..3.0,
    )
        .prop_map(|(rows, vocab, seed, bits, weighted, upstream)| {
            let mut state = seed | 1;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let logits = (0..rows * vocab)
                .map(|_| ((next() % 20_000) as f32 / 1000.0 - 10.0) * 1.5)
                .collect();
            let options = options_of(bits, rows, upstream);
            let mask: Vec<bool> = (0..rows).map(|_| next() % 4 != 0).collect();
            // With an ignore index and no mask, the untrained rows carry it as their label.
            let without_mask = options.ignore_index.is_some() && bits >> 7 & 1 == 1;
            let labels = (0..rows)
                .map(|r| match without_mask && !mask[r] {
                    true => -100,
                    false => (next() % vocab as u64) as i64,
                })
                .collect();
            let weights =
                weighted.then(|| (0..rows).map(|_| (next() % 1000) as f32 / 500.0).collect());
            // Documents: cut the rows at random points (some documents empty).
            let cu_seqlens = (bits >> 8 & 1 == 1).then(|| {
                let mut cuts: Vec<i32> = (0..next() % 4)
                    .map(|_| (next() % (rows as u64 + 1)) as i32)
                    .collect();
                cuts.extend([0, rows as i32]);
                cuts.sort_unstable();
                cuts
            });
            Case {
                rows,
                vocab,
                logits,
                labels,
                mask: (!without_mask).then_some(mask),
                weights,
                cu_seqlens,
                options,
            }
        })
}

pub fn extreme_case(rows: Vec<Vec<f32>>, labels: Vec<i64>) -> Case {
    let vocab = rows[0].len();
    Case {
        rows: rows.len(),
        vocab,
        mask: Some(vec![true; rows.len()]),
        logits: rows.concat(),
        labels,
        weights: None,
        cu_seqlens: None,
        options: CeOptions::default(),
    }
}

/// Rows that stress the numerics: ±1e4 logits, -inf entries, all-equal rows, one huge logit, and a
/// peaked row whose entropy (~1e-7) needs the log1p form.
pub fn extreme_rows_case() -> Case {
    let v = 1000;
    let mut huge = vec![0.0f32; v];
    huge[3] = 1e4;
    let mut mixed: Vec<f32> = (0..v)
        .map(|i| if i % 2 == 0 { 1e4 } else { -1e4 })
        .collect();
    mixed[7] = 9_990.0;
    let mut with_inf = vec![f32::NEG_INFINITY; v];
    with_inf[10] = 2.0;
    with_inf[500] = -3.0;
    let mut peaked = vec![0.0f32; v];
    peaked[0] = 25.0;
    extreme_case(
        vec![huge, mixed, with_inf, vec![3.0; v], peaked.clone(), peaked],
        vec![3, 7, 500, 999, 0, 1],
    )
}

/// Rows with NaN and infinities where the kernels read them differently (inside 16-byte vectors, in a
/// whole vector, in the scalar tail, in different threads), and one finite row; row 1 is unmasked, so its
/// NaN must change nothing.
pub fn non_finite_case(vocab: usize) -> Case {
    let base = |r: usize| -> Vec<f32> {
        (0..vocab)
            .map(|i| ((i * 7 + r * 13) % 29) as f32 * 0.5 - 7.0)
            .collect()
    };
    let nan = f32::NAN;
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    let mut push = |row: Vec<f32>, label: usize| {
        rows.push(row);
        labels.push(label as i64);
    };
    let mut r = base(0);
    r[5] = nan;
    push(r, 1); // a NaN inside a vector
    let mut r = base(1);
    r[2] = nan;
    push(r, 0); // unmasked
    let mut r = base(2);
    r[vocab - 1] = nan;
    push(r, 3); // a NaN in the scalar tail
    let mut r = base(3);
    for x in r.iter_mut().take(24.min(vocab)).skip(16.min(vocab)) {
        *x = nan;
    }
    push(r, 2); // a whole vector of NaN
    push(vec![f32::NEG_INFINITY; vocab], 4); // nothing but -inf
    let mut r = base(5);
    r[3] = f32::INFINITY;
    push(r, 6); // +inf, the label finite
    let mut r = base(6);
    r[7] = f32::INFINITY;
    push(r, 7); // +inf at the label
    let mut r = base(7);
    r[1] = f32::INFINITY;
    r[vocab - 2] = f32::INFINITY;
    push(r, 5); // two +inf, far apart (different threads)
    let mut r = base(8);
    r[9] = f32::NEG_INFINITY;
    push(r, 0); // finite, with a -inf entry
    let n = rows.len();
    Case {
        rows: n,
        vocab,
        logits: rows.concat(),
        labels,
        mask: Some((0..n).map(|r| r != 1).collect()),
        weights: None,
        cu_seqlens: None,
        options: CeOptions::default(),
    }
}
