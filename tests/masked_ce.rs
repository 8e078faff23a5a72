//! The CPU oracle of the masked cross-entropy: its gradient against finite differences of its own loss,
//! its edge cases, and its agreement with the CS336 companions it generalizes.

use sft_collate::backend::cpu::loss::{self, masked_cross_entropy};
use sft_collate::loss::{CeInput, CeOptions, Labels, LogitsShape, Normalization};
use sft_collate::Error;

fn small_case() -> (Vec<f64>, Vec<i64>, Vec<bool>, Vec<f32>) {
    let rows = 4;
    let vocab = 6;
    let logits = (0..rows * vocab)
        .map(|i| ((i * 7) % 13) as f64 * 0.37 - 2.0)
        .collect();
    (
        logits,
        vec![1, 5, 0, 3],
        vec![true, false, true, true],
        vec![0.5, 2.0, 1.5, 1.0],
    )
}

#[test]
fn gradient_matches_finite_differences() {
    let (logits, labels, mask, weights) = small_case();
    let vocab = 6;
    for normalization in [
        Normalization::TokenMean,
        Normalization::Sum,
        Normalization::Cs336 {
            normalize_constant: 2.0,
            batch_size: 2,
            gradient_accumulation_steps: 3,
        },
    ] {
        let options = CeOptions {
            normalization,
            upstream: 0.7,
            ..CeOptions::default()
        };
        let loss_at = |x: &[f64]| {
            let mut input = CeInput::new(x, vocab, Labels::I64(&labels), &mask);
            input.weights = Some(&weights);
            masked_cross_entropy(&input, &options, false).unwrap().loss * 0.7
        };
        let mut input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
        input.weights = Some(&weights);
        let grad = masked_cross_entropy(&input, &options, true)
            .unwrap()
            .grad
            .unwrap();
        let h = 1e-6;
        for i in 0..logits.len() {
            let (mut up, mut down) = (logits.clone(), logits.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (loss_at(&up) - loss_at(&down)) / (2.0 * h);
            assert!(
                (grad[i] - numeric).abs() < 1e-7,
                "{normalization:?} grad[{i}]: {} vs {numeric}",
                grad[i]
            );
        }
    }
}

#[test]
fn agrees_with_the_cs336_companions() {
    let (logits, labels, mask, _) = small_case();
    let vocab = 6;
    let input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
    let out = masked_cross_entropy(&input, &CeOptions::default(), false).unwrap();
    let masked_rows: Vec<usize> = (0..4).filter(|&r| mask[r]).collect();
    let log_probs = loss::log_probs(&logits, vocab, &labels).unwrap();
    let entropy = loss::compute_entropy(&logits, vocab).unwrap();
    for &r in &masked_rows {
        assert!((out.log_probs[r] - log_probs[r]).abs() < 1e-12);
        assert!((out.entropy[r] - entropy[r]).abs() < 1e-12);
    }
    // Token mean = masked_mean of -log_probs.
    let neg: Vec<f64> = log_probs.iter().map(|x| -x).collect();
    let (mean, _) = loss::masked_mean(&neg, &mask, &[4], None).unwrap();
    assert!((out.loss - mean[0]).abs() < 1e-12);
    assert_eq!(out.count, masked_rows.len());
}

#[test]
fn edges_are_typed_errors_or_zeros() {
    let logits = vec![0.0f32; 12];
    let labels = vec![0i64, 9];
    let none = vec![false, false];
    // Nothing masked: loss 0 (not NaN) and a bad label on an unmasked row is never looked at.
    let input = CeInput::new(&logits, 6, Labels::I64(&labels), &none);
    let out = masked_cross_entropy(&input, &CeOptions::default(), true).unwrap();
    assert_eq!((out.loss, out.count), (0.0, 0));
    assert!(out.grad.unwrap().iter().all(|&g| g == 0.0));
    let both = vec![true, true];
    let input = CeInput::new(&logits, 6, Labels::I64(&labels), &both);
    assert!(matches!(
        masked_cross_entropy(&input, &CeOptions::default(), false),
        Err(Error::LabelOutOfRange {
            row: 1,
            label: 9,
            ..
        })
    ));
    // Shapes that do not fit are refused.
    let bad_stride = CeInput {
        logits: &logits,
        shape: LogitsShape {
            rows: 2,
            vocab: 6,
            row_stride: 7,
        },
        labels: Labels::I64(&labels),
        mask: Some(&none),
        weights: None,
        cu_seqlens: None,
    };
    assert!(matches!(bad_stride.validate(), Err(Error::Shape(_))));
    let zero_denominator = CeOptions {
        normalization: Normalization::Cs336 {
            normalize_constant: 0.0,
            batch_size: 1,
            gradient_accumulation_steps: 1,
        },
        upstream: 1.0,
        ..CeOptions::default()
    };
    assert!(masked_cross_entropy(&input, &zero_denominator, false).is_err());
}

#[test]
fn non_finite_logits_follow_pytorch() {
    const INF: f64 = f64::INFINITY;
    const NAN: f64 = f64::NAN;
    let vocab = 4;
    let rows: Vec<[f64; 4]> = vec![
        [0.0, NAN, 1.0, 2.0],     // a NaN: every output NaN
        [-INF, -INF, -INF, -INF], // all -inf: lse -inf, the rest NaN
        [0.0, INF, 1.0, 2.0],     // +inf, label 0 finite
        [0.0, INF, 1.0, 2.0],     // +inf at the label
        [0.0, -INF, 1.0, 2.0],    // finite, with a -inf entry
    ];
    let logits: Vec<f64> = rows.concat();
    let labels = [0i64, 0, 0, 1, 0];
    let mask = [true; 5];
    let input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
    let options = CeOptions {
        normalization: Normalization::Sum,
        upstream: 1.0,
        ..CeOptions::default()
    };
    let out = masked_cross_entropy(&input, &options, true).unwrap();
    let grad = out.grad.as_ref().unwrap();
    let g = |r: usize| &grad[r * vocab..(r + 1) * vocab];
    // NaN row.
    assert!(out.log_probs[0].is_nan() && out.entropy[0].is_nan() && out.lse[0].is_nan());
    assert!(g(0).iter().all(|x| x.is_nan()));
    // All -inf.
    assert_eq!(out.lse[1], -INF);
    assert!(out.log_probs[1].is_nan() && out.entropy[1].is_nan());
    assert!(g(1).iter().all(|x| x.is_nan()));
    // +inf with a finite label: log p = -inf, the gradient NaN at the +inf, -1 at the label, 0 elsewhere.
    assert_eq!((out.lse[2], out.log_probs[2]), (INF, -INF));
    assert!(out.entropy[2].is_nan());
    assert!(g(2)[1].is_nan());
    assert_eq!((g(2)[0], g(2)[2], g(2)[3]), (-1.0, 0.0, 0.0));
    // +inf at the label: log p NaN.
    assert!(out.log_probs[3].is_nan() && g(3)[1].is_nan());
    // A finite row with a -inf entry is an ordinary row.
    let p = |x: f64| x.exp() / (1.0 + 1f64.exp() + 2f64.exp());
    assert!((out.log_probs[4] - p(0.0).ln()).abs() < 1e-12);
    assert_eq!(g(4)[1], 0.0);
    // One NaN row makes the loss NaN.
    assert!(out.sum.is_nan() && out.loss.is_nan());
    // Unmasked, the same rows change nothing.
    let mask = [false, false, false, false, true];
    let input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
    let out = masked_cross_entropy(&input, &options, true).unwrap();
    assert!((out.loss + p(0.0).ln()).abs() < 1e-12);
    assert!(out.grad.unwrap()[..4 * vocab].iter().all(|&x| x == 0.0));
}

#[test]
fn huge_logits_keep_full_precision() {
    // Two equal maxima: log p = -ln 2 exactly, however large the logits (m + ln 2 is not representable
    // next to 1e12 or 1e16; the oracle never forms it).
    for big in [1e12f64, 1e16, 1e30] {
        let logits = [big, big, 0.0];
        let input = CeInput::new(&logits, 3, Labels::I64(&[0]), &[true]);
        let out = masked_cross_entropy(&input, &CeOptions::default(), true).unwrap();
        assert!(
            (out.log_probs[0] + std::f64::consts::LN_2).abs() < 1e-15,
            "{big}: {}",
            out.log_probs[0]
        );
        assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-15);
        let grad = out.grad.unwrap();
        assert!((grad[0] + 0.5).abs() < 1e-15 && (grad[1] - 0.5).abs() < 1e-15);
    }
}

/// The loss of one row by the textbook formulas, independently of the oracle's numerics: softcap, then
/// log-softmax, PyTorch's label smoothing, the z-loss.
fn textbook_row(x: &[f64], label: usize, options: &CeOptions) -> f64 {
    let x: Vec<f64> = x
        .iter()
        .map(|&v| {
            options
                .softcap
                .map_or(v, |c| f64::from(c) * (v / f64::from(c)).tanh())
        })
        .collect();
    let lse = x.iter().map(|v| v.exp()).sum::<f64>().ln();
    let log_p: Vec<f64> = x.iter().map(|v| v - lse).collect();
    let eps = f64::from(options.label_smoothing);
    let smooth = -log_p.iter().sum::<f64>() / x.len() as f64;
    (1.0 - eps) * -log_p[label] + eps * smooth + f64::from(options.z_loss) * lse * lse
}

fn option_sets() -> Vec<CeOptions> {
    let mut sets = Vec::new();
    for z_loss in [0.0, 0.01] {
        for label_smoothing in [0.0, 0.2, 1.0] {
            for softcap in [None, Some(1.5)] {
                for normalization in [
                    Normalization::TokenMean,
                    Normalization::SequenceMean,
                    Normalization::Sum,
                ] {
                    sets.push(CeOptions {
                        normalization,
                        upstream: 0.7,
                        z_loss,
                        label_smoothing,
                        softcap,
                        ignore_index: Some(-100),
                    });
                }
            }
        }
    }
    sets
}

#[test]
fn every_option_matches_the_textbook_and_finite_differences() {
    // Six rows in three documents [0, 2), [2, 2) (empty), [2, 6); rows 1 and 4 not trained (the mask,
    // and an ignore_index label), so documents weigh 1 and 3 trained rows.
    let (rows, vocab) = (6, 5);
    let logits: Vec<f64> = (0..rows * vocab)
        .map(|i| ((i * 7) % 13) as f64 * 0.61 - 3.0)
        .collect();
    let labels = [1i64, 4, 0, 3, -100, 2];
    let mask = [true, false, true, true, true, true];
    let weights = [0.5f32, 2.0, 1.5, 1.0, 3.0, 0.25];
    let cu = [0i32, 2, 2, 6];
    fn input_at<'a>(
        x: &'a [f64],
        labels: &'a [i64],
        mask: &'a [bool],
        weights: &'a [f32],
        cu: &'a [i32],
    ) -> CeInput<'a, f64> {
        CeInput {
            mask: Some(mask),
            weights: Some(weights),
            cu_seqlens: Some(cu),
            ..CeInput::unmasked(x, 5, Labels::I64(labels))
        }
    }
    let trained = [0usize, 2, 3, 5];
    for options in option_sets() {
        let out = masked_cross_entropy(
            &input_at(&logits, &labels, &mask, &weights, &cu),
            &options,
            true,
        )
        .unwrap();
        assert_eq!((out.count, out.documents), (4, 2), "{options:?}");
        // The loss by the textbook: per-row terms, weighted, normalized as asked.
        let in_doc = |r: usize| if r < 2 { 1.0 } else { 3.0 };
        let mut want = 0.0;
        for &r in &trained {
            let mut w = f64::from(weights[r]);
            if options.normalization == Normalization::SequenceMean {
                w /= in_doc(r);
            }
            let term = w * textbook_row(
                &logits[r * vocab..(r + 1) * vocab],
                labels[r] as usize,
                &options,
            );
            assert!(
                (out.row_loss[r] - term).abs() < 1e-12,
                "{options:?} row {r}"
            );
            want += term;
        }
        let want = match options.normalization {
            Normalization::TokenMean => want / 4.0,
            Normalization::SequenceMean => want / 2.0,
            _ => want,
        };
        assert!(
            (out.loss - want).abs() < 1e-12,
            "{options:?}: {} vs {want}",
            out.loss
        );
        assert_eq!(out.row_loss[1], 0.0);
        assert_eq!(out.row_loss[4], 0.0);
        // The gradient against central differences of the loss.
        let grad = out.grad.unwrap();
        let loss_at = |x: &[f64]| {
            let input = input_at(x, &labels, &mask, &weights, &cu);
            masked_cross_entropy(&input, &options, false).unwrap().loss
        };
        let h = 1e-6;
        for i in 0..logits.len() {
            let (mut up, mut down) = (logits.clone(), logits.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = 0.7 * (loss_at(&up) - loss_at(&down)) / (2.0 * h);
            assert!(
                (grad[i] - numeric).abs() < 1e-7,
                "{options:?} grad[{i}]: {} vs {numeric}",
                grad[i]
            );
        }
    }
}

#[test]
fn ignore_index_without_a_mask_and_argmax_accuracy() {
    let vocab = 4;
    let logits = [
        0.0,
        3.0,
        3.0,
        1.0, // a tie: the first maximum (1)
        f64::NEG_INFINITY,
        f64::NEG_INFINITY,
        f64::NEG_INFINITY,
        f64::NEG_INFINITY, // argmax 0
        0.0,
        f64::NAN,
        9.0,
        1.0, // a NaN: -1
        5.0,
        0.0,
        0.0,
        0.0, // argmax 0, ignored row
    ];
    let labels = [1i64, 0, 2, -100];
    let input = CeInput::unmasked(&logits[..], vocab, Labels::I64(&labels));
    let options = CeOptions {
        ignore_index: Some(-100),
        ..CeOptions::default()
    };
    let out = masked_cross_entropy(&input, &options, false).unwrap();
    assert_eq!(out.argmax, vec![1, 0, -1, -1]);
    // Rows 0 (the tie) and 1 (all -inf, argmax 0) predict their labels.
    assert_eq!((out.count, out.correct, out.documents), (3, 2, 1));
    // Without the ignore index, -100 is an out-of-range label on a trained row.
    assert!(matches!(
        masked_cross_entropy(&input, &CeOptions::default(), false),
        Err(Error::LabelOutOfRange {
            row: 3,
            label: -100,
            ..
        })
    ));
}

#[test]
fn options_outside_their_domain_are_refused() {
    let logits = [0.0f32; 4];
    let input = CeInput::unmasked(&logits[..], 4, Labels::I64(&[0]));
    for bad in [
        CeOptions {
            label_smoothing: 1.5,
            ..CeOptions::default()
        },
        CeOptions {
            label_smoothing: -0.1,
            ..CeOptions::default()
        },
        CeOptions {
            label_smoothing: f32::NAN,
            ..CeOptions::default()
        },
        CeOptions {
            z_loss: f32::INFINITY,
            ..CeOptions::default()
        },
        CeOptions {
            softcap: Some(0.0),
            ..CeOptions::default()
        },
        CeOptions {
            softcap: Some(-3.0),
            ..CeOptions::default()
        },
    ] {
        assert!(
            matches!(
                masked_cross_entropy(&input, &bad, false),
                Err(Error::InvalidOption { .. })
            ),
            "{bad:?}"
        );
    }
    for cu in [&[0, 2][..], &[1, 1], &[0], &[0, 1, 0, 1]] {
        let input = CeInput {
            cu_seqlens: Some(cu),
            ..input
        };
        assert!(matches!(input.validate(), Err(Error::Shape(_))), "{cu:?}");
    }
}
