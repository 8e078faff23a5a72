//! Conformance with the Stanford CS336 assignment 5 test vectors (`../shared/fixtures/cs336`, with the
//! Qwen2 tokenizer). Token ids and masks must match exactly; floats within 1e-5 relative (the upstream
//! tests allow rtol 1e-4, atol 1e-2).

mod common;

use serde_json::Value;
use sft_collate::cpu::loss;
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
