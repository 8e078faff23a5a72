//! The fused linear cross-entropy (`loss::linear`): the f64 oracle against finite differences; the
//! chunked path (the emulator: CPU GEMMs around the cross-entropy kernel) against the unfused kernel on
//! the same logits, bit for bit, at every chunk size, and against the oracle; the chunk rule; bad input
//! refused on every device.

mod common;

use common::ce::close;
use sft_collate::backend::cpu;
use sft_collate::loss::linear::{LinearCeConfig, LinearCeGrads, LinearCeInput};
use sft_collate::loss::{CeOptions, CeRequest, Labels, Normalization};
use sft_collate::{Device, Error};
#[cfg(feature = "emulation")]
use {
    common::ce::{case_strategy, Case},
    proptest::prelude::*,
    sft_collate::loss::LogitElem,
};

#[cfg(feature = "emulation")]
/// A linear problem: a cross-entropy case's targets and options, with hidden states, an LM head and
/// maybe a bias whose logits are of the case's size.
#[derive(Debug)]
struct LinearCase {
    case: Case,
    hidden_size: usize,
    hidden: Vec<f32>,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    chunk_rows: Option<usize>,
}

#[cfg(feature = "emulation")]
impl LinearCase {
    fn input<'a, T>(
        &'a self,
        hidden: &'a [T],
        weight: &'a [T],
        bias: Option<&'a [T]>,
    ) -> LinearCeInput<'a, T> {
        LinearCeInput {
            bias,
            mask: self.case.mask.as_deref(),
            weights: self.case.weights.as_deref(),
            cu_seqlens: self.case.cu_seqlens.as_deref(),
            ..LinearCeInput::new(
                hidden,
                weight,
                self.hidden_size,
                Labels::I64(&self.case.labels),
                None,
            )
        }
    }
}

#[cfg(feature = "emulation")]
fn linear_case() -> impl Strategy<Value = LinearCase> {
    (
        case_strategy(),
        1usize..20,
        any::<u64>(),
        any::<bool>(),
        0usize..8,
    )
        .prop_map(|(case, hidden_size, seed, with_bias, chunk_pick)| {
            let mut state = seed | 1;
            let mut uniform = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
            };
            // Logits of a few units: hidden ~ U(-2, 2), weight ~ U(-1, 1) / √H.
            let scale = 1.0 / (hidden_size as f32).sqrt();
            let hidden = (0..case.rows * hidden_size)
                .map(|_| 2.0 * uniform())
                .collect();
            let weight = (0..case.vocab * hidden_size)
                .map(|_| scale * uniform())
                .collect();
            let bias = with_bias.then(|| (0..case.vocab).map(|_| uniform()).collect());
            let chunk_rows = match chunk_pick {
                0 => None,
                1 => Some(1),
                2 => Some(2),
                3 => Some(3),
                4 => Some(case.rows),
                5 => Some(case.rows + 3),
                _ => Some(case.rows.div_ceil(2)),
            };
            LinearCase {
                case,
                hidden_size,
                hidden,
                weight,
                bias,
                chunk_rows,
            }
        })
}

#[cfg(feature = "emulation")]
fn convert<T: LogitElem>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

/// The fused path of `c` on `device` (inputs in `T`, the case's options and chunk, every output
/// requested), with `grads`.
#[cfg(feature = "emulation")]
fn fused_on<T: LogitElem>(
    device: &Device,
    c: &LinearCase,
    grads: LinearCeGrads,
) -> sft_collate::loss::linear::LinearCeOutput<T> {
    let (hidden, weight) = (convert::<T>(&c.hidden), convert::<T>(&c.weight));
    let bias = c.bias.as_ref().map(|b| convert::<T>(b));
    let config = LinearCeConfig {
        chunk_rows: c.chunk_rows,
        grads,
        ..LinearCeConfig::default()
    };
    device
        .linear_cross_entropy(
            &c.input(&hidden, &weight, bias.as_deref()),
            &c.case.options,
            CeRequest::default(),
            &config,
        )
        .unwrap()
}

/// The largest magnitude in `v` (a scale for absolute tolerances of sums that may cancel).
fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// `got` within `rtol · |want| + atol · max|want|` of `want`, element by element.
fn check_vec(got: &[f64], want: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = max_abs(want).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            close(*g, *w, rtol, atol * scale),
            "{what}[{i}] = {g}, want {w}"
        );
    }
}

mod oracle {
    use super::*;

    /// d loss / d hidden, weight and bias of the oracle equal central differences of its loss, under
    /// every option (z-loss, smoothing, softcap, weights, per-sequence means, ignore_index).
    #[test]
    fn gradients_are_the_finite_differences_of_the_loss() {
        let (n, v, h) = (6, 7, 3);
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        let hidden: Vec<f64> = (0..n * h).map(|_| 2.0 * uniform()).collect();
        let weight: Vec<f64> = (0..v * h).map(|_| uniform()).collect();
        let bias: Vec<f64> = (0..v).map(|_| uniform()).collect();
        let labels = [3i64, -100, 0, 6, 2, 5];
        let weights = [1.0f32, 0.5, 2.0, 1.5, 0.25, 1.0];
        let cu = [0i32, 2, 2, 6];
        for options in [
            CeOptions {
                ignore_index: Some(-100),
                ..CeOptions::default()
            },
            CeOptions {
                ignore_index: Some(-100),
                normalization: Normalization::SequenceMean,
                z_loss: 1e-2,
                label_smoothing: 0.1,
                softcap: Some(2.5),
                upstream: 0.7,
            },
            CeOptions {
                ignore_index: Some(-100),
                normalization: Normalization::Sum,
                softcap: Some(1.5),
                ..CeOptions::default()
            },
        ] {
            let input = LinearCeInput {
                bias: Some(&bias[..]),
                weights: Some(&weights[..]),
                cu_seqlens: Some(&cu[..]),
                ..LinearCeInput::new(&hidden[..], &weight[..], h, Labels::I64(&labels), None)
            };
            let got =
                cpu::linear::linear_cross_entropy(&input, &options, LinearCeGrads::ALL).unwrap();
            // The oracle's loss of the problem with perturbed parameters.
            let loss_of = |hidden: &[f64], weight: &[f64], bias: &[f64]| {
                let input = LinearCeInput {
                    bias: Some(bias),
                    weight,
                    hidden,
                    ..input
                };
                cpu::linear::linear_cross_entropy(&input, &options, LinearCeGrads::NONE)
                    .unwrap()
                    .ce
                    .loss
            };
            let upstream = f64::from(options.upstream);
            let step = 1e-6;
            let fd = |which: usize, i: usize| {
                let (mut hp, mut wp, mut bp) = (hidden.clone(), weight.clone(), bias.clone());
                let (mut hm, mut wm, mut bm) = (hidden.clone(), weight.clone(), bias.clone());
                match which {
                    0 => (hp[i] += step, hm[i] -= step),
                    1 => (wp[i] += step, wm[i] -= step),
                    _ => (bp[i] += step, bm[i] -= step),
                };
                let plus = loss_of(&hp, &wp, &bp);
                let minus = loss_of(&hm, &wm, &bm);
                upstream * (plus - minus) / (2.0 * step)
            };
            let grads = [
                got.grad_hidden.as_ref().unwrap(),
                got.grad_weight.as_ref().unwrap(),
                got.grad_bias.as_ref().unwrap(),
            ];
            for (which, grad) in grads.into_iter().enumerate() {
                let numeric: Vec<f64> = (0..grad.len()).map(|i| fd(which, i)).collect();
                check_vec(
                    grad,
                    &numeric,
                    1e-5,
                    1e-6,
                    &format!("{options:?} gradient {which}"),
                );
            }
            // The ignored row's d hidden is zero.
            assert!(grads[0][h..2 * h].iter().all(|&g| g == 0.0));
        }
    }
}

/// Which default chunk a realistic LM head gets: Liger's rule keeps the chunk of logits near the hidden
/// states' size, far under an eighth of the unfused logits and their gradient.
#[test]
fn the_default_chunk_is_a_small_part_of_the_unfused_logits() {
    let (n, v, h, bytes) = (16_384usize, 151_936usize, 3_584usize, 2usize);
    let config = LinearCeConfig::default();
    let rows = config.chunk_rows(n, v, h, bytes).unwrap();
    assert!(rows.is_power_of_two() && rows >= 1 && rows < n);
    let unfused = 2 * n * v * bytes; // logits + their gradient
    assert!(rows * v * bytes * 8 <= unfused, "{rows} rows");
    // The chunk's logits are about the size of the hidden states (within the power-of-two rounding).
    assert!(
        rows * v <= 2 * n * h + 2 * v && 2 * rows * v >= n * h,
        "{rows} rows"
    );
    // A byte cap wins over the rule, down to one row; an explicit size wins over both.
    let capped = LinearCeConfig {
        max_chunk_bytes: Some(64 * v * bytes),
        ..config
    };
    assert_eq!(capped.chunk_rows(n, v, h, bytes).unwrap(), 64);
    let tiny = LinearCeConfig {
        max_chunk_bytes: Some(1),
        ..config
    };
    assert_eq!(tiny.chunk_rows(n, v, h, bytes).unwrap(), 1);
    let set = LinearCeConfig {
        chunk_rows: Some(100),
        max_chunk_bytes: Some(1),
        ..config
    };
    assert_eq!(set.chunk_rows(n, v, h, bytes).unwrap(), 100);
    assert_eq!(set.chunk_rows(7, v, h, bytes).unwrap(), 7);
    assert_eq!(config.chunk_rows(0, v, h, bytes).unwrap(), 1);
    let zero = LinearCeConfig {
        chunk_rows: Some(0),
        ..config
    };
    assert!(matches!(
        zero.chunk_rows(n, v, h, bytes),
        Err(Error::InvalidOption {
            name: "chunk_rows",
            ..
        })
    ));
}

/// Bad input is a typed error on every device, before anything is computed.
fn refuses_bad_input(device: &Device) {
    let (hidden, weight, bias) = (vec![0.5f32; 3 * 2], vec![0.25f32; 4 * 2], vec![0.0f32; 4]);
    let (labels, mask) = ([1i64, 3, 0], [true, true, false]);
    let config = LinearCeConfig::default();
    let run = |input: &LinearCeInput<'_, f32>, options: &CeOptions, config: &LinearCeConfig| {
        device.linear_cross_entropy(input, options, CeRequest::default(), config)
    };
    let good = LinearCeInput::new(
        &hidden[..],
        &weight[..],
        2,
        Labels::I64(&labels),
        Some(&mask[..]),
    );
    let options = CeOptions::default();
    assert!(run(&good, &options, &config).is_ok());
    let shape = |input: LinearCeInput<'_, f32>| {
        let got = run(&input, &options, &config);
        assert!(matches!(got, Err(Error::Shape(_))), "{got:?}");
    };
    shape(LinearCeInput {
        hidden: &hidden[..5],
        ..good
    });
    shape(LinearCeInput {
        weight: &weight[..7],
        ..good
    });
    shape(LinearCeInput {
        bias: Some(&bias[..3]),
        ..good
    });
    shape(LinearCeInput {
        hidden_size: 0,
        ..good
    });
    shape(LinearCeInput {
        mask: Some(&mask[..2]),
        ..good
    });
    shape(LinearCeInput {
        cu_seqlens: Some(&[0, 2]),
        ..good
    });
    // A label outside the vocabulary on a trained row; on an untrained one it is never read.
    let bad_labels = [1i64, 4, 0];
    let got = run(
        &LinearCeInput {
            labels: Labels::I64(&bad_labels),
            ..good
        },
        &options,
        &config,
    );
    assert!(
        matches!(
            got,
            Err(Error::LabelOutOfRange {
                row: 1,
                label: 4,
                vocab: 4
            })
        ),
        "{got:?}"
    );
    let unread = [1i64, 3, 99];
    assert!(run(
        &LinearCeInput {
            labels: Labels::I64(&unread),
            ..good
        },
        &options,
        &config
    )
    .is_ok());
    let got = run(
        &good,
        &options,
        &LinearCeConfig {
            chunk_rows: Some(0),
            ..config
        },
    );
    assert!(
        matches!(
            got,
            Err(Error::InvalidOption {
                name: "chunk_rows",
                ..
            })
        ),
        "{got:?}"
    );
    let got = run(
        &good,
        &CeOptions {
            label_smoothing: 2.0,
            ..options
        },
        &config,
    );
    assert!(
        matches!(
            got,
            Err(Error::InvalidOption {
                name: "label_smoothing",
                ..
            })
        ),
        "{got:?}"
    );
}

/// No rows, and rows all masked: a zero loss and zero gradients, never NaN.
fn empty_and_all_masked(device: &Device) {
    let weight = [0.5f32; 5 * 3];
    let none = LinearCeInput::new(&[][..], &weight[..], 3, Labels::I32(&[]), Some(&[][..]));
    let out = device
        .linear_cross_entropy(
            &none,
            &CeOptions::default(),
            CeRequest::default(),
            &LinearCeConfig::default(),
        )
        .unwrap();
    assert_eq!((out.ce.loss, out.ce.count), (0.0, 0));
    assert_eq!(out.grad_hidden.unwrap(), Vec::<f32>::new());
    assert!(out.grad_weight.unwrap().iter().all(|&g| g == 0.0));
    let hidden = [1.0f32; 4 * 3];
    let masked = LinearCeInput::new(
        &hidden[..],
        &weight[..],
        3,
        Labels::I32(&[0, 1, 2, 3]),
        Some(&[false; 4][..]),
    );
    let out = device
        .linear_cross_entropy(
            &masked,
            &CeOptions::default(),
            CeRequest::default(),
            &LinearCeConfig::default(),
        )
        .unwrap();
    assert_eq!((out.ce.loss, out.ce.count), (0.0, 0));
    assert!(out.grad_hidden.unwrap().iter().all(|&g| g == 0.0));
    assert!(out.grad_weight.unwrap().iter().all(|&g| g == 0.0));
}

device_tests!(refuses_bad_input, empty_and_all_masked);

#[cfg(feature = "emulation")]
mod emulated {
    use super::*;
    use common::ce::{check, options_of};
    use sft_collate::backend::cpu::gemm::{gemm, Mat, MatMut};
    use sft_collate::backend::emulation::{linear_row_stride, Emulator, Grad};
    use sft_collate::loss::Float;
    use sft_collate::loss::{CeInput, LogitsShape};

    fn widen<T: Float>(x: &[T]) -> Vec<f32> {
        x.iter().map(|v| v.to_f64() as f32).collect()
    }

    /// `a [m, k] · b` with `b` given as `[n, k]` (transposed) or `[k, n]`, in f32.
    fn product(
        a: &[f32],
        m: usize,
        k: usize,
        b: &[f32],
        n: usize,
        b_transposed: bool,
        init: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut out = match init {
            Some(row) => row.repeat(m),
            None => vec![0.0; m * n],
        };
        let b = if b_transposed {
            Mat::rows(b, n, k).t()
        } else {
            Mat::rows(b, k, n)
        };
        let beta = if init.is_some() { 1.0 } else { 0.0 };
        gemm(
            1.0,
            Mat::rows(a, m, k),
            b,
            beta,
            MatMut {
                data: &mut out,
                rows: m,
                cols: n,
            },
        );
        out
    }

    /// The unfused computation on the emulator: the whole logits made (by the same GEMM calls as the
    /// fused path, `chunk` rows each: the CPU GEMM's rounding may depend on how many rows it is given),
    /// rounded to `T`, the cross-entropy kernel over all of them with a separate gradient, then
    /// `G · W` (in the same row blocks) and `Gᵀ · H`.
    fn unfused<T: LogitElem>(
        c: &LinearCase,
        chunk: usize,
        options: &CeOptions,
        request: CeRequest,
    ) -> (sft_collate::loss::CeOutput<T>, Vec<T>, Vec<f32>) {
        let (n, v, h) = (c.case.rows, c.case.vocab, c.hidden_size);
        let (hidden, weight) = (
            widen(&convert::<T>(&c.hidden)),
            widen(&convert::<T>(&c.weight)),
        );
        let bias = c.bias.as_ref().map(|b| widen(&convert::<T>(b)));
        let by_chunks = |a: &[f32], k: usize, b: &[f32], cols: usize, transposed, init| {
            a.chunks(chunk * k)
                .flat_map(|rows| product(rows, rows.len() / k, k, b, cols, transposed, init))
                .collect::<Vec<f32>>()
        };
        let dense = by_chunks(&hidden, h, &weight, v, true, bias.as_deref());
        // Rows in the fused path's layout (padded to 16 bytes): the kernel's summation order depends on
        // a row's alignment.
        let stride = linear_row_stride::<T>(v);
        let mut logits = vec![T::from_f32(0.0); n * stride];
        for (out, row) in logits.chunks_exact_mut(stride).zip(dense.chunks_exact(v)) {
            out[..v].copy_from_slice(&convert::<T>(row));
        }
        let input = CeInput {
            shape: LogitsShape {
                rows: n,
                vocab: v,
                row_stride: stride,
            },
            ..c.case.input(&logits, Labels::I64(&c.case.labels))
        };
        let mut out = Emulator::new()
            .cross_entropy(&input, options, request, Grad::Separate)
            .unwrap();
        let g = widen(&out.grad.take().unwrap());
        let dh = convert(&by_chunks(&g, v, &weight, h, false, None));
        // Gᵀ · H: [v, n] · [n, h].
        let gt: Vec<f32> = (0..v * n).map(|i| g[(i % n) * v + i / n]).collect();
        let dw = product(&gt, v, n, &hidden, h, false, None);
        (out, dh, dw)
    }

    /// At every chunk size the fused path gives what the unfused kernel gives on the same logits: every
    /// per-row output, the sums, loss and counts bit for bit (the batch is normalized once, whatever the
    /// chunks), `d hidden` bit for bit, `d weight` up to f32 summation order.
    fn fused_equals_unfused<T: LogitElem>(c: &LinearCase) {
        let (options, request) = (c.case.options, CeRequest::default());
        let got = fused_on::<T>(&Device::emulated(), c, LinearCeGrads::ALL);
        let (want, dh, dw) = unfused::<T>(c, got.chunk_rows, &options, request);
        let what = format!("{} chunk {:?}", T::SUFFIX, c.chunk_rows);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (name, g, w) in [
            ("log_probs", &got.ce.log_probs, &want.log_probs),
            ("entropy", &got.ce.entropy, &want.entropy),
            ("lse", &got.ce.lse, &want.lse),
            ("row_loss", &got.ce.row_loss, &want.row_loss),
        ] {
            assert_eq!(bits(g), bits(w), "{what}: {name}");
        }
        assert_eq!(got.ce.argmax, want.argmax, "{what}: argmax");
        assert_eq!(
            (got.ce.count, got.ce.correct, got.ce.documents),
            (want.count, want.correct, want.documents),
            "{what}: counts"
        );
        assert_eq!(
            bits(&[got.ce.sum, got.ce.loss, got.ce.z_sum]),
            bits(&[want.sum, want.loss, want.z_sum]),
            "{what}: sums"
        );
        assert_eq!(got.grad_hidden.as_ref().unwrap(), &dh, "{what}: d hidden");
        let dw64: Vec<f64> = dw.iter().map(|&x| f64::from(x)).collect();
        let got_dw: Vec<f64> = got
            .grad_weight
            .unwrap()
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        check_vec(&got_dw, &dw64, 1e-5, 1e-6, &format!("{what}: d weight"));
        assert_eq!(got.grad_bias.is_some(), c.bias.is_some(), "{what}: d bias");
        let rows = c.case.rows;
        assert_eq!(
            got.chunk_rows,
            c.chunk_rows.map_or(got.chunk_rows, |r| r.min(rows)),
            "{what}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 50, ..ProptestConfig::default() })]

        #[test]
        fn fused_equals_the_unfused_kernel_at_every_chunk_size(c in linear_case()) {
            fused_equals_unfused::<f32>(&c);
            fused_equals_unfused::<half::bf16>(&c);
            fused_equals_unfused::<half::f16>(&c);
        }

        /// f32 against the f64 oracle: the cross-entropy's outputs within its usual tolerances, the
        /// gradients within 1e-4 relative (plus 1e-5 of their largest entry: sums that cancel).
        #[test]
        fn fused_f32_is_the_oracle(c in linear_case()) {
            let options = c.case.options;
            let got = fused_on::<f32>(&Device::emulated(), &c, LinearCeGrads::ALL);
            let bias = c.bias.as_deref();
            let want = cpu::linear::linear_cross_entropy(&c.input(&c.hidden, &c.weight, bias), &options, LinearCeGrads::ALL).unwrap();
            check(&got.ce, &want.ce, "linear f32");
            let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
            check_vec(&f64s(got.grad_hidden.as_ref().unwrap()), want.grad_hidden.as_ref().unwrap(), 1e-4, 1e-5, "d hidden");
            check_vec(&f64s(got.grad_weight.as_ref().unwrap()), want.grad_weight.as_ref().unwrap(), 1e-4, 1e-5, "d weight");
            if let Some(db) = &want.grad_bias {
                check_vec(&f64s(got.grad_bias.as_ref().unwrap()), db, 1e-4, 1e-5, "d bias");
            }
        }
    }

    /// Forward only, and each gradient alone: the same numbers as with all of them, nothing else made.
    #[test]
    fn gradients_come_only_when_asked_for() {
        let c = LinearCase {
            case: Case {
                rows: 5,
                vocab: 11,
                logits: Vec::new(),
                labels: vec![0, 10, 3, 3, 7],
                mask: Some(vec![true, false, true, true, true]),
                weights: None,
                cu_seqlens: None,
                options: options_of(0, 5, 1.0),
            },
            hidden_size: 4,
            hidden: (0..20).map(|i| (i as f32 * 0.37).sin()).collect(),
            weight: (0..44).map(|i| (i as f32 * 0.11).cos()).collect(),
            bias: Some((0..11).map(|i| i as f32 * 0.01).collect()),
            chunk_rows: Some(2),
        };
        let input = c.input(&c.hidden, &c.weight, c.bias.as_deref());
        let run = |grads: LinearCeGrads| {
            let config = LinearCeConfig {
                grads,
                chunk_rows: c.chunk_rows,
                ..LinearCeConfig::default()
            };
            Device::emulated()
                .linear_cross_entropy(&input, &c.case.options, CeRequest::NONE, &config)
                .unwrap()
        };
        let all = run(LinearCeGrads::ALL);
        let none = run(LinearCeGrads::NONE);
        assert_eq!(
            (none.grad_hidden, none.grad_weight, none.grad_bias),
            (None, None, None)
        );
        assert_eq!(none.ce.loss.to_bits(), all.ce.loss.to_bits());
        assert!(none.ce.log_probs.is_empty() && none.ce.row_loss.is_empty());
        let only_w = run(LinearCeGrads {
            weight: true,
            ..LinearCeGrads::NONE
        });
        assert_eq!(
            (only_w.grad_hidden.is_none(), only_w.grad_bias.is_none()),
            (true, true)
        );
        assert_eq!(only_w.grad_weight, all.grad_weight);
        let only_b = run(LinearCeGrads {
            bias: true,
            ..LinearCeGrads::NONE
        });
        assert_eq!(only_b.grad_bias, all.grad_bias);
    }
}

/// The CUDA path (cuBLAS GEMMs around the same kernels, feature `cublas`) on a GPU: f32 against the f64
/// oracle as tightly as the emulated path; every dtype against the emulated chunked path at the same
/// chunk size (the same kernel; the GEMMs sum in another order, so the logits may round one ulp apart:
/// within 2% for f16/bf16); a gradient asked for alone (bad input and empty batches: `on_cuda::*`). Run
/// by `scripts/gpu-check.sh`.
#[cfg(all(feature = "cublas", feature = "emulation"))]
mod cuda_linear {
    use super::*;
    use common::ce::check;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    fn f64s<T: sft_collate::loss::Float>(v: &[T]) -> Vec<f64> {
        v.iter().map(|x| x.to_f64()).collect()
    }

    fn like_the_emulator<T: LogitElem>(cuda: &Device, c: &LinearCase, tol: f64) {
        let got = fused_on::<T>(cuda, c, LinearCeGrads::ALL);
        let want = fused_on::<T>(&Device::emulated(), c, LinearCeGrads::ALL);
        let what = format!("{} chunk {:?}", T::SUFFIX, c.chunk_rows);
        assert_eq!(got.chunk_rows, want.chunk_rows, "{what}");
        assert_eq!(
            (got.ce.count, got.ce.documents),
            (want.ce.count, want.ce.documents),
            "{what}: counts"
        );
        for (name, g, w) in [
            ("log_probs", &got.ce.log_probs, &want.ce.log_probs),
            ("row_loss", &got.ce.row_loss, &want.ce.row_loss),
            ("lse", &got.ce.lse, &want.ce.lse),
        ] {
            check_vec(&f64s(g), &f64s(w), tol, tol, &format!("{what}: {name}"));
        }
        check_vec(
            &f64s(&[got.ce.loss]),
            &f64s(&[want.ce.loss]),
            tol,
            1e-6,
            &what,
        );
        for (name, g, w) in [
            (
                "d hidden",
                got.grad_hidden.map(|g| f64s(&g)),
                want.grad_hidden.map(|g| f64s(&g)),
            ),
            (
                "d weight",
                got.grad_weight.map(|g| f64s(&g)),
                want.grad_weight.map(|g| f64s(&g)),
            ),
            (
                "d bias",
                got.grad_bias.map(|g| f64s(&g)),
                want.grad_bias.map(|g| f64s(&g)),
            ),
        ] {
            assert_eq!(g.is_some(), w.is_some(), "{what}: {name}");
            if let (Some(g), Some(w)) = (g, w) {
                check_vec(&g, &w, tol, tol, &format!("{what}: {name}"));
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn cuda_is_the_oracle_and_the_emulated_path() {
        let cuda = Device::cuda(0).expect("a CUDA device and cuBLAS");
        let mut runner = TestRunner::deterministic();
        for _ in 0..24 {
            let c = linear_case().new_tree(&mut runner).unwrap().current();
            let got = fused_on::<f32>(&cuda, &c, LinearCeGrads::ALL);
            let bias = c.bias.as_deref();
            let want = cpu::linear::linear_cross_entropy(
                &c.input(&c.hidden, &c.weight, bias),
                &c.case.options,
                LinearCeGrads::ALL,
            )
            .unwrap();
            check(&got.ce, &want.ce, "cuda linear f32");
            let hidden = want.grad_hidden.as_ref().unwrap();
            check_vec(
                &f64s(got.grad_hidden.as_ref().unwrap()),
                hidden,
                1e-4,
                1e-5,
                "d hidden",
            );
            let weight = want.grad_weight.as_ref().unwrap();
            check_vec(
                &f64s(got.grad_weight.as_ref().unwrap()),
                weight,
                1e-4,
                1e-5,
                "d weight",
            );
            if let Some(db) = &want.grad_bias {
                check_vec(
                    &f64s(got.grad_bias.as_ref().unwrap()),
                    db,
                    1e-4,
                    1e-5,
                    "d bias",
                );
            }
            like_the_emulator::<f32>(&cuda, &c, 1e-4);
            like_the_emulator::<half::bf16>(&cuda, &c, 2e-2);
            like_the_emulator::<half::f16>(&cuda, &c, 2e-2);
        }
    }

    /// Each gradient alone equals the same gradient made with the others, and forward only makes none.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn cuda_gradients_come_only_when_asked_for() {
        let cuda = Device::cuda(0).expect("a CUDA device and cuBLAS");
        let mut runner = TestRunner::deterministic();
        let c = linear_case().new_tree(&mut runner).unwrap().current();
        let all = fused_on::<f32>(&cuda, &c, LinearCeGrads::ALL);
        let none = fused_on::<f32>(&cuda, &c, LinearCeGrads::NONE);
        assert_eq!(none.ce.loss.to_bits(), all.ce.loss.to_bits());
        assert!(none.grad_hidden.is_none() && none.grad_weight.is_none());
        let only_w = fused_on::<f32>(
            &cuda,
            &c,
            LinearCeGrads {
                weight: true,
                ..LinearCeGrads::NONE
            },
        );
        assert_eq!(only_w.grad_weight, all.grad_weight);
        assert!(only_w.grad_hidden.is_none());
    }
}
