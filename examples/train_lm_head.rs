//! A small language model trained on GSM8K with the collator and the fused linear cross-entropy, no
//! framework: an embedding table and an LM head (a bigram model: each position predicts the next token
//! from its own), over the vocabulary the data uses (o200k_base ids renumbered densely). Each step
//! tokenizes nothing new: it selects rows, collates them padding-free on the device (`collate_pack`),
//! gathers the embeddings of the positions whose label is trained, runs `Device::linear_cross_entropy` (the loss and `d hidden`, `d weight`,
//! `d bias` without `[N, V]` logits on the chunked backends), scatters `d hidden` into the embeddings and
//! takes an Adam step. The loss printed falls; the run fails if it does not.
//!
//! ```sh
//! cargo run --release --example train_lm_head -- [--data FILE] [--device cpu|emulated] [--steps 200]
//!     [--batch 8] [--hidden 32] [--lr 0.01] [--chunk-rows N]
//! ```
//!
//! The data defaults to `$SFT_COLLATE_SHARED/fixtures/gsm8k/train.jsonl` (else `../shared/...`), with
//! the `r1_zero.prompt` template beside it. `cpu` runs the f64 oracle (it makes the whole `[N, V]`
//! logits); `emulated` (built with `--features emulation`) runs the chunked path with the CUDA kernel on
//! CPU threads (slow: use a few steps).

use std::path::PathBuf;
use std::time::Instant;

use sft_collate::loss::linear::{LinearCeConfig, LinearCeInput};
use sft_collate::loss::{CeOptions, CeRequest, Labels};
use sft_collate::{
    tokenize_pairs, CollateSpec, Device, DeviceChoice, IdTensor, RaggedBatch, Tokenizer, Truncation,
};

struct Args {
    data: PathBuf,
    device: DeviceChoice,
    steps: usize,
    batch: usize,
    hidden: usize,
    lr: f32,
    chunk_rows: Option<usize>,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let shared = std::env::var_os("SFT_COLLATE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let mut args = Args {
        data: shared.join("fixtures/gsm8k/train.jsonl"),
        device: DeviceChoice::Cpu,
        steps: 200,
        batch: 8,
        hidden: 32,
        lr: 0.01,
        chunk_rows: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => args.data = value()?.into(),
            "--device" => args.device = value()?.parse()?,
            "--steps" => args.steps = value()?.parse()?,
            "--batch" => args.batch = value()?.parse()?,
            "--hidden" => args.hidden = value()?.parse()?,
            "--lr" => args.lr = value()?.parse()?,
            "--chunk-rows" => args.chunk_rows = Some(value()?.parse()?),
            other => return Err(format!("unknown flag {other} (see the file's header)").into()),
        }
    }
    if args.batch == 0 || args.hidden == 0 || args.steps == 0 {
        return Err("--steps, --batch and --hidden must be at least 1".into());
    }
    Ok(args)
}

/// (prompt, answer) pairs of a GSM8K jsonl file, the prompt from the template beside it.
fn read_pairs(path: &PathBuf) -> Result<(Vec<String>, Vec<String>), Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let template = path
        .parent()
        .map(|dir| dir.join("r1_zero.prompt"))
        .and_then(|t| std::fs::read_to_string(t).ok())
        .unwrap_or_else(|| "{question}".into());
    let (mut prompts, mut outputs) = (Vec::new(), Vec::new());
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: serde_json::Value = serde_json::from_str(line)?;
        let field = |k: &str| {
            row[k]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{}:{}: no string {k:?}", path.display(), i + 1))
        };
        prompts.push(template.replace("{question}", &field("question")?));
        outputs.push(format!(" {}", field("answer")?));
    }
    Ok((prompts, outputs))
}

/// Adam on one parameter tensor.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(len: usize) -> Self {
        Adam {
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    fn step(&mut self, param: &mut [f32], grad: &[f32], lr: f32, t: i32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (((p, g), m), v) in param.iter_mut().zip(grad).zip(&mut self.m).zip(&mut self.v) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
    }
}

/// A deterministic uniform draw in [-1, 1).
fn uniform(state: &mut u64) -> f32 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn ids(t: &IdTensor) -> Vec<i64> {
    match t {
        IdTensor::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
        IdTensor::I64(v) => v.clone(),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let device = Device::new(args.device)?;
    let (prompts, outputs) = read_pairs(&args.data)?;
    let tokenizer = Tokenizer::builtin("o200k_base")?;
    let spec = CollateSpec {
        pad_id: Some(0),
        max_len: Some(512),
        truncation: Truncation::OutputRight,
        ..CollateSpec::default()
    };
    let started = Instant::now();
    let ragged = tokenize_pairs(&prompts, &outputs, &tokenizer, spec.limit())?;
    // The data's vocabulary, renumbered densely (id 0 is kept for padding, which is never trained).
    let mut dense = std::collections::HashMap::from([(u32::MAX, 0u32)]);
    let tokens: Vec<u32> = ragged
        .tokens()
        .iter()
        .map(|&t| {
            let next = dense.len() as u32;
            *dense.entry(t).or_insert(next)
        })
        .collect();
    let ragged = RaggedBatch::from_parts(
        tokens,
        ragged.row_offsets().to_vec(),
        ragged.prompt_lens().to_vec(),
    )?;
    let (v, h) = (dense.len(), args.hidden);
    eprintln!(
        "{} rows, {} tokens, vocabulary {v} (of o200k_base), hidden {h}, on {} ({:.2} s to tokenize)",
        ragged.rows(),
        ragged.tokens().len(),
        device.description(),
        started.elapsed().as_secs_f64()
    );

    let mut seed = 0x5EED_u64;
    let mut embed: Vec<f32> = (0..v * h).map(|_| uniform(&mut seed)).collect();
    let scale = 1.0 / (h as f32).sqrt();
    let mut head: Vec<f32> = (0..v * h).map(|_| scale * uniform(&mut seed)).collect();
    let mut bias = vec![0.0f32; v];
    let (mut adam_e, mut adam_w, mut adam_b) = (Adam::new(v * h), Adam::new(v * h), Adam::new(v));
    let config = LinearCeConfig {
        chunk_rows: args.chunk_rows,
        ..LinearCeConfig::default()
    };
    // The mean loss over each tenth of the run is printed; the first tenth's is compared with the last's.
    let report = (args.steps / 10).max(1);
    let (mut first, mut window, mut trained_tokens) = (None, Vec::new(), 0usize);
    let mut last_mean = f32::NAN;
    let started = Instant::now();
    for step in 1..=args.steps {
        // A batch of rows, walking the data in a fixed shuffled order.
        let rows: Vec<usize> = (0..args.batch)
            .map(|_| (uniform(&mut seed).abs() * ragged.rows() as f32) as usize % ragged.rows())
            .collect();
        let pack = device
            .collate_pack(&ragged.select(&rows), &spec)?
            .to_host()?;
        // Only positions whose label is trained carry a loss: gather them (the prompts' positions need
        // no logits at all).
        let (all_ids, all_labels) = (ids(&pack.input_ids), ids(&pack.labels));
        let trained: Vec<usize> = (0..all_ids.len())
            .filter(|&i| pack.response_mask[i])
            .collect();
        let input_ids: Vec<i64> = trained.iter().map(|&i| all_ids[i]).collect();
        let labels: Vec<i64> = trained.iter().map(|&i| all_labels[i]).collect();
        let hidden: Vec<f32> = input_ids
            .iter()
            .flat_map(|&t| embed[t as usize * h..(t as usize + 1) * h].iter().copied())
            .collect();
        let input = LinearCeInput {
            bias: Some(&bias[..]),
            ..LinearCeInput::new(&hidden[..], &head[..], h, Labels::I64(&labels), None)
        };
        let out =
            device.linear_cross_entropy(&input, &CeOptions::default(), CeRequest::NONE, &config)?;
        let (dh, dw, db) = (
            out.grad_hidden.unwrap(),
            out.grad_weight.unwrap(),
            out.grad_bias.unwrap(),
        );
        // d embed: each position's d hidden added to its token's row.
        let mut de = vec![0.0f32; v * h];
        for (row, &t) in dh.chunks_exact(h).zip(&input_ids) {
            de[t as usize * h..(t as usize + 1) * h]
                .iter_mut()
                .zip(row)
                .for_each(|(d, g)| *d += g);
        }
        let t = step as i32;
        adam_e.step(&mut embed, &de, args.lr, t);
        adam_w.step(&mut head, &dw, args.lr, t);
        adam_b.step(&mut bias, &db, args.lr, t);
        trained_tokens += out.ce.count as usize;
        window.push(out.ce.loss);
        if step % report == 0 || step == args.steps {
            last_mean = window.iter().sum::<f32>() / window.len() as f32;
            first.get_or_insert(last_mean);
            let secs = started.elapsed().as_secs_f64();
            println!(
                "step {step:>5}  loss {last_mean:.4}  ({} trained tokens/step, {:.0} trained tokens/s, chunk {} rows)",
                out.ce.count,
                trained_tokens as f64 / secs,
                out.chunk_rows
            );
            window.clear();
        }
    }
    let first = first.unwrap_or(f32::NAN);
    println!(
        "mean loss {first:.4} over the first {report} steps, {last_mean:.4} over the last ones (ln V = {:.4})",
        (v as f32).ln()
    );
    // NaN (a diverged run) fails too.
    if last_mean.partial_cmp(&first) != Some(std::cmp::Ordering::Less) {
        return Err(format!("the loss did not fall: {first} → {last_mean}").into());
    }
    Ok(())
}
