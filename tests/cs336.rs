//! Conformance with the Stanford CS336 assignment 5 test vectors (`../shared/fixtures/cs336`, with the
//! Qwen2 tokenizer). Token ids and masks must match exactly; floats within 1e-5 relative (the upstream
//! tests allow rtol 1e-4, atol 1e-2).

mod common;

use serde_json::Value;
use sft_collate::backend::cpu::loss;
use sft_collate::{tokenize_prompt_and_output, CollateSpec, IdDtype};

fn floats(v: &Value) -> Vec<f64> {
    fn walk(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            Value::Number(n) => out.push(n.as_f64().unwrap()),
            Value::Null => out.push(f64::NAN),
            other => panic!("not a number: {other}"),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

fn bools(v: &Value) -> Vec<bool> {
    fn walk(v: &Value, out: &mut Vec<bool>) {
        match v {
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            Value::Bool(b) => out.push(*b),
            other => panic!("not a bool: {other}"),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// Relative error within 1e-5 (absolute 1e-9 near zero); NaN equals NaN, as upstream's assert_allclose.
fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: got {g}, want NaN");
            continue;
        }
        let tol = 1e-5 * w.abs() + 1e-9;
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn tokenize_prompt_and_output_matches() {
    let Some(shared) = common::shared_dir("tokenize_prompt_and_output_matches") else {
        return;
    };
    let fx = common::fixture_json(&shared, "cs336/tokenize_prompt_and_output.json");
    let tokenizer = common::qwen2(&shared);
    let strs = |k: &str| -> Vec<String> {
        fx[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let (prompts, outputs) = (strs("prompt_strs"), strs("output_strs"));

    // Prompts and outputs tokenize separately to the recorded ids.
    for (texts, key) in [
        (&prompts, "prompt_token_ids"),
        (&outputs, "output_token_ids"),
    ] {
        for (text, want) in texts.iter().zip(fx[key].as_array().unwrap()) {
            let want: Vec<u32> = floats(want).iter().map(|&x| x as u32).collect();
            assert_eq!(tokenizer.encode(text).unwrap(), want, "{text:?}");
        }
    }

    // The pad id comes from the tokenizer (tokenizer_config.json's pad_token), as upstream.
    assert_eq!(
        tokenizer.pad_id(),
        Some(fx["pad_token_id"].as_u64().unwrap() as u32)
    );
    for id_dtype in [IdDtype::I64, IdDtype::I32] {
        let spec = CollateSpec {
            id_dtype,
            ..Default::default()
        };
        let batch = tokenize_prompt_and_output(&prompts, &outputs, &tokenizer, &spec).unwrap();
        let want_shape = shape(&fx["shape"]);
        assert_eq!(batch.shape(), (want_shape[0], want_shape[1]));
        let ints = |k: &str| -> Vec<i64> { floats(&fx[k]).iter().map(|&x| x as i64).collect() };
        assert_eq!(batch.input_ids.to_i64(), ints("input_ids"));
        assert_eq!(batch.labels.to_i64(), ints("labels"));
        assert_eq!(batch.response_mask, bools(&fx["response_mask"]));
        assert_eq!(batch.input_ids.dtype(), id_dtype);
    }
}

#[test]
fn compute_entropy_matches() {
    let Some(shared) = common::shared_dir("compute_entropy_matches") else {
        return;
    };
    let fx = common::fixture_json(&shared, "cs336/compute_entropy.json");
    let logits: Vec<f32> = floats(&fx["logits"]).iter().map(|&x| x as f32).collect();
    let vocab = *shape(&fx["logits_shape"]).last().unwrap();
    let got = loss::compute_entropy(&logits, vocab).unwrap();
    assert_close(&got, &floats(&fx["expected"]), "entropy");
}

fn tensor_and_mask(shared: &std::path::Path) -> (Vec<f32>, Vec<bool>, Vec<usize>) {
    let fx = common::fixture_json(shared, "cs336/masked_normalize.json");
    let x = floats(&fx["tensor"]).iter().map(|&v| v as f32).collect();
    (x, bools(&fx["mask"]), shape(&fx["tensor_shape"]))
}

fn dim_of(case: &Value) -> Option<isize> {
    case["dim"].as_i64().map(|d| d as isize)
}

#[test]
fn masked_normalize_matches() {
    let Some(shared) = common::shared_dir("masked_normalize_matches") else {
        return;
    };
    let fx = common::fixture_json(&shared, "cs336/masked_normalize.json");
    let (x, mask, shape_) = tensor_and_mask(&shared);
    let c = fx["normalize_constant"].as_f64().unwrap();
    let cases = fx["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 4);
    for (name, case) in cases {
        let (got, got_shape) = loss::masked_normalize(&x, &mask, &shape_, dim_of(case), c).unwrap();
        assert_eq!(got_shape, shape(&case["expected_shape"]), "{name}");
        assert_close(&got, &floats(&case["expected"]), name);
    }
}

#[test]
fn masked_mean_matches_including_nan() {
    let Some(shared) = common::shared_dir("masked_mean_matches_including_nan") else {
        return;
    };
    let fx = common::fixture_json(&shared, "cs336/masked_mean.json");
    let (x, mask, shape_) = tensor_and_mask(&shared);
    for (name, case) in fx["cases"].as_object().unwrap() {
        let (got, got_shape) = loss::masked_mean(&x, &mask, &shape_, dim_of(case)).unwrap();
        assert_eq!(got_shape, shape(&case["expected_shape"]), "{name}");
        assert_close(&got, &floats(&case["expected"]), name);
    }
}

#[test]
fn sft_microbatch_train_step_matches() {
    let Some(shared) = common::shared_dir("sft_microbatch_train_step_matches") else {
        return;
    };
    let fx = common::fixture_json(&shared, "cs336/sft_microbatch_train_step.json");
    let log_probs: Vec<f32> = floats(&fx["policy_log_probs"])
        .iter()
        .map(|&x| x as f32)
        .collect();
    let mask = bools(&fx["response_mask"]);
    let batch_size = fx["policy_log_probs"].as_array().unwrap().len();
    let gas = fx["gradient_accumulation_steps"].as_u64().unwrap() as usize;
    for (name, case) in fx["cases"].as_object().unwrap() {
        let nc = case["normalize_constant"].as_f64().unwrap();
        let (loss_value, grad) =
            loss::sft_microbatch_loss(&log_probs, &mask, batch_size, gas, nc).unwrap();
        match case.get("steps").and_then(Value::as_u64) {
            // Upstream accumulates .grad in place over the steps; every recorded loss is the same.
            Some(steps) => {
                let losses = floats(&case["loss"]);
                assert_eq!(losses.len() as u64, steps);
                assert_close(&vec![loss_value; losses.len()], &losses, name);
                let accumulated: Vec<f64> = grad.iter().map(|g| g * steps as f64).collect();
                let all = floats(&case["policy_log_probs_grad"]);
                for step in all.chunks(accumulated.len()) {
                    assert_close(&accumulated, step, name);
                }
            }
            None => {
                assert_close(&[loss_value], &[case["loss"].as_f64().unwrap()], name);
                assert_close(&grad, &floats(&case["policy_log_probs_grad"]), name);
            }
        }
    }
}

/// The CS336 vectors through every device's cross-entropy (the fused kernel on the emulator and the GPU).
mod through_each_device {
    use super::*;
    use sft_collate::loss::{
        CeInput, CeOptions, CeOutput, CeRequest, Labels, LogitsShape, Normalization,
    };
    use sft_collate::Device;

    crate::device_tests!(
        compute_entropy_through_the_kernel,
        masked_normalize_through_the_kernel_weights,
        sft_microbatch_train_step_through_the_kernel,
    );

    fn run(
        device: &Device,
        input: &CeInput<'_, f32>,
        options: &CeOptions,
        grad: bool,
    ) -> CeOutput<f32> {
        device
            .cross_entropy(input, options, CeRequest::default(), grad)
            .unwrap()
            .to_host()
            .unwrap()
    }

    fn compute_entropy_through_the_kernel(device: &Device) {
        let Some(shared) = common::shared_dir("compute_entropy_through_the_kernel") else {
            return;
        };
        let fx = common::fixture_json(&shared, "cs336/compute_entropy.json");
        let logits: Vec<f32> = floats(&fx["logits"]).iter().map(|&x| x as f32).collect();
        let vocab = *shape(&fx["logits_shape"]).last().unwrap();
        let rows = logits.len() / vocab;
        let (labels, mask) = (vec![0i64; rows], vec![true; rows]);
        let input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
        let out = run(device, &input, &CeOptions::default(), false);
        let got: Vec<f64> = out.entropy.iter().map(|&x| f64::from(x)).collect();
        assert_close(&got, &floats(&fx["expected"]), "kernel entropy");
    }

    /// Rows whose label has log-probability exactly -1 in exact arithmetic: [0, ln(e - 1)], label 0. With
    /// the tensor as per-token weights, the kernel's weighted sum is then Σ tensor · mask.
    fn unit_loss_rows(rows: usize) -> (Vec<f32>, Vec<i64>) {
        let z = (std::f64::consts::E - 1.0).ln() as f32;
        ((0..rows).flat_map(|_| [0.0, z]).collect(), vec![0; rows])
    }

    fn masked_normalize_through_the_kernel_weights(device: &Device) {
        let Some(shared) = common::shared_dir("masked_normalize_through_the_kernel_weights") else {
            return;
        };
        let fx = common::fixture_json(&shared, "cs336/masked_normalize.json");
        let (x, mask, shape_) = tensor_and_mask(&shared);
        let c = fx["normalize_constant"].as_f64().unwrap();
        let sum_normalization = CeOptions {
            normalization: Normalization::Sum,
            upstream: 1.0,
            ..CeOptions::default()
        };
        // dim = None: one call over every element.
        let (logits, labels) = unit_loss_rows(x.len());
        let mut input = CeInput::new(&logits, 2, Labels::I64(&labels), &mask);
        input.weights = Some(&x);
        let out = run(device, &input, &sum_normalization, false);
        let want = fx["cases"]["dimNone"]["expected"].as_f64().unwrap();
        assert_close(
            &[f64::from(out.sum) / c],
            &[want],
            "dimNone through the kernel",
        );
        // dim = -1: one call per slice of the last dimension.
        let last = *shape_.last().unwrap();
        let want = floats(&fx["cases"]["dimlast"]["expected"]);
        let (logits, labels) = unit_loss_rows(last);
        for (slice, (xs, ms)) in x.chunks(last).zip(mask.chunks(last)).enumerate() {
            let mut input = CeInput::new(&logits, 2, Labels::I64(&labels), ms);
            input.weights = Some(xs);
            let out = run(device, &input, &sum_normalization, false);
            assert_close(
                &[f64::from(out.sum) / c],
                &[want[slice]],
                "dimlast through the kernel",
            );
        }
    }

    fn sft_microbatch_train_step_through_the_kernel(device: &Device) {
        let Some(shared) = common::shared_dir("sft_microbatch_train_step_through_the_kernel")
        else {
            return;
        };
        let fx = common::fixture_json(&shared, "cs336/sft_microbatch_train_step.json");
        let mask = bools(&fx["response_mask"]);
        let batch_size = fx["response_mask"].as_array().unwrap().len();
        let gas = fx["gradient_accumulation_steps"].as_u64().unwrap() as usize;
        let rows = mask.len();
        let vocab = 5;
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 37) % 11) as f32 * 0.4 - 2.0)
            .collect();
        let labels: Vec<i64> = (0..rows as i64).map(|r| r % vocab as i64).collect();
        let input = CeInput {
            logits: &logits,
            shape: LogitsShape::dense(rows, vocab),
            labels: Labels::I64(&labels),
            mask: Some(&mask),
            weights: None,
            cu_seqlens: None,
        };
        for name in [
            "test_sft_microbatch_train_step",
            "test_sft_microbatch_train_step_normalize",
        ] {
            let case = &fx["cases"][name];
            let nc = case["normalize_constant"].as_f64().unwrap();
            let options = CeOptions {
                normalization: Normalization::Cs336 {
                    normalize_constant: nc,
                    batch_size,
                    gradient_accumulation_steps: gas,
                },
                upstream: 1.0,
                ..CeOptions::default()
            };
            let out = run(device, &input, &options, true);
            // The loss is CS336's, applied to the kernel's own log-probs.
            let log_probs: Vec<f64> = out.log_probs.iter().map(|&x| f64::from(x)).collect();
            let (want_loss, _) =
                loss::sft_microbatch_loss(&log_probs, &mask, batch_size, gas, nc).unwrap();
            assert_close(&[f64::from(out.loss)], &[want_loss], name);
            // Chain rule: d loss / d logits = (d loss / d log_prob, CS336's recorded gradient) ·
            // (onehot(label) - softmax).
            let upstream = floats(&case["policy_log_probs_grad"]);
            let grad = out.grad.unwrap();
            for row in 0..rows {
                let x = &logits[row * vocab..(row + 1) * vocab];
                let lse = loss::logsumexp(x);
                for i in 0..vocab {
                    let p = (f64::from(x[i]) - lse).exp();
                    let onehot = if i as i64 == labels[row] { 1.0 } else { 0.0 };
                    let want = upstream[row] * (onehot - p);
                    let got = f64::from(grad[row * vocab + i]);
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs() + 1e-9,
                        "{name} grad[{row}, {i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
