//! The candle bridge on the CPU against candle's own ops: the loss and `d loss / d logits` of
//! `MaskedCrossEntropy` equal those of the same formula written in candle (log_sum_exp, gather, a masked
//! mean) and differentiated by candle's autograd; a collated batch trains a toy model.

use candle_core::{DType, Device, Tensor, Var, D};
use downstream_candle::{collate, MaskedCrossEntropy};
use sft_collate::loss::{CeOptions, Normalization};
use sft_collate::{tokenize_pairs, CollateSpec, IdDtype, Tokenizer};

/// A seeded generator (xorshift), so that failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The masked mean cross-entropy written with candle's ops (differentiable by candle's autograd).
fn candle_reference(
    logits: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let lse = logits.log_sum_exp(D::Minus1)?;
    let picked = logits
        .gather(&labels.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let mask = mask.to_dtype(DType::F32)?;
    let total = ((lse - picked)? * &mask)?.sum_all()?;
    total.broadcast_div(&mask.sum_all()?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Random logits `[2, 7, vocab]` (±8), labels in range, a mask with some rows off.
fn inputs(seed: u64, vocab: usize) -> (Vec<f32>, Vec<i64>, Vec<u8>) {
    let mut rng = Rng(seed);
    let rows = 14;
    let logits = (0..rows * vocab)
        .map(|_| rng.uniform() * 16.0 - 8.0)
        .collect();
    let labels = (0..rows)
        .map(|_| (rng.next() % vocab as u64) as i64)
        .collect();
    let mut mask: Vec<u8> = (0..rows)
        .map(|_| !rng.next().is_multiple_of(3) as u8)
        .collect();
    mask[0] = 1;
    (logits, labels, mask)
}

#[test]
fn loss_and_gradient_equal_candles_own_ops() {
    let dev = Device::Cpu;
    for (seed, vocab) in [(1u64, 37usize), (2, 1), (3, 300), (4, 4099)] {
        let (logits, labels, mask) = inputs(seed, vocab);
        let logits = Var::from_vec(logits, (2, 7, vocab), &dev).unwrap();
        let labels = Tensor::from_vec(labels, (2, 7), &dev).unwrap();
        let mask = Tensor::from_vec(mask, (2, 7), &dev).unwrap();

        let ours = MaskedCrossEntropy::default()
            .loss(logits.as_tensor(), &labels, &mask)
            .unwrap();
        let theirs = candle_reference(logits.as_tensor(), &labels, &mask).unwrap();
        let (a, b) = (
            ours.to_scalar::<f32>().unwrap(),
            theirs.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "vocab {vocab}: {a} vs {b}"
        );

        // Through a scale, so that the upstream gradient is not 1.
        let g_ours = (ours * 3.0).unwrap().backward().unwrap();
        let g_theirs = (theirs * 3.0).unwrap().backward().unwrap();
        let (g_ours, g_theirs) = (
            g_ours.get(logits.as_tensor()).unwrap(),
            g_theirs.get(logits.as_tensor()).unwrap(),
        );
        assert_eq!(g_ours.dims(), &[2, 7, vocab]);
        let diff = max_abs_diff(g_ours, g_theirs);
        assert!(diff <= 1e-6, "vocab {vocab}: gradients differ by {diff}");
    }
}

#[test]
fn half_precision_logits_and_i32_labels() {
    let dev = Device::Cpu;
    let (logits, labels, mask) = inputs(7, 513);
    let labels32: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
    let mask = Tensor::from_vec(mask, 14, &dev).unwrap();
    let f32_logits = Tensor::from_vec(logits, (14, 513), &dev).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        // The reference sees the same rounded values.
        let logits = Var::from_tensor(&f32_logits.to_dtype(dtype).unwrap()).unwrap();
        let labels = Tensor::from_vec(labels32.clone(), 14, &dev).unwrap();
        let ours = MaskedCrossEntropy::default()
            .loss(logits.as_tensor(), &labels, &mask)
            .unwrap();
        let labels64 = labels.to_dtype(DType::I64).unwrap();
        let theirs = candle_reference(logits.as_tensor(), &labels64, &mask).unwrap();
        let (a, b) = (
            ours.to_scalar::<f32>().unwrap(),
            theirs.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{dtype:?}: {a} vs {b}"
        );
        let grad = ours.backward().unwrap();
        let grad = grad.get(logits.as_tensor()).unwrap();
        assert_eq!(grad.dtype(), dtype, "the gradient in the logits' dtype");
        let reference = theirs.backward().unwrap();
        let reference = reference.get(logits.as_tensor()).unwrap();
        // One rounding to the logits' dtype: half an ulp of the largest gradient entry.
        let diff = max_abs_diff(grad, reference);
        assert!(
            diff <= 1.0 / 14.0 / 128.0,
            "{dtype:?}: gradients differ by {diff}"
        );
    }
}

#[test]
fn options_reach_the_op() {
    // A per-sequence mean over two documents (rows 0..7, 7..14) is not the token mean.
    let dev = Device::Cpu;
    let (logits, labels, mask) = inputs(11, 64);
    let logits = Tensor::from_vec(logits, (14, 64), &dev).unwrap();
    let labels = Tensor::from_vec(labels, 14, &dev).unwrap();
    let mask = Tensor::from_vec(mask, 14, &dev).unwrap();
    let token_mean = MaskedCrossEntropy::default()
        .loss(&logits, &labels, &mask)
        .unwrap();
    let summed = MaskedCrossEntropy {
        options: CeOptions {
            normalization: Normalization::Sum,
            ..CeOptions::default()
        },
    }
    .loss(&logits, &labels, &mask)
    .unwrap();
    let trained = mask
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let (mean, sum) = (
        token_mean.to_scalar::<f32>().unwrap(),
        summed.to_scalar::<f32>().unwrap(),
    );
    assert!((sum - mean * trained).abs() <= 1e-4 * sum.abs());
    let bad = MaskedCrossEntropy {
        options: CeOptions {
            label_smoothing: 2.0,
            ..CeOptions::default()
        },
    }
    .loss(&logits, &labels, &mask);
    assert!(bad.unwrap_err().to_string().contains("label_smoothing"));
}

#[test]
fn wrong_shapes_and_dtypes_are_errors() {
    let dev = Device::Cpu;
    let logits = Tensor::zeros((4, 10), DType::F32, &dev).unwrap();
    let labels = Tensor::zeros(4, DType::I64, &dev).unwrap();
    let mask = Tensor::ones(4, DType::U8, &dev).unwrap();
    let op = MaskedCrossEntropy::default();
    let short = Tensor::zeros(3, DType::I64, &dev).unwrap();
    assert!(op
        .loss(&logits, &short, &mask)
        .unwrap_err()
        .to_string()
        .contains("labels has 3"));
    let float_labels = Tensor::zeros(4, DType::F32, &dev).unwrap();
    assert!(op
        .loss(&logits, &float_labels, &mask)
        .unwrap_err()
        .to_string()
        .contains("I64 or I32"));
    let bool_mask = Tensor::ones(4, DType::F32, &dev).unwrap();
    assert!(op
        .loss(&logits, &labels, &bool_mask)
        .unwrap_err()
        .to_string()
        .contains("U8"));
    let strided = Tensor::zeros((10, 4), DType::F32, &dev)
        .unwrap()
        .t()
        .unwrap();
    assert!(op
        .loss(&strided, &labels, &mask)
        .unwrap_err()
        .to_string()
        .contains("contiguous"));
    let out_of_range = Tensor::new(&[0i64, 1, 2, 10], &dev).unwrap();
    assert!(op.loss(&logits, &out_of_range, &mask).is_err());
}

#[test]
fn a_collated_batch_trains_a_toy_model() {
    let dev = Device::Cpu;
    let tokenizer = Tokenizer::load("o200k_base").unwrap();
    let spec = CollateSpec {
        pad_id: Some(0),
        id_dtype: IdDtype::I64,
        ..CollateSpec::default()
    };
    let prompts = ["What is 2+2?", "Name a colour."];
    let outputs = [" 4", " Blue, like the sky."];
    let ragged = tokenize_pairs(&prompts, &outputs, &tokenizer, spec.limit()).unwrap();
    let batch = collate(&dev, &ragged, &spec).unwrap();
    let (rows, width) = (batch.stats.rows, batch.stats.width);
    assert_eq!(batch.input_ids.dims(), &[rows, width]);
    let trained = batch
        .response_mask
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(
        trained.to_scalar::<f32>().unwrap() as usize,
        batch.stats.response_tokens
    );

    // A bigram model: logits = embedding(input_ids) @ head, over the tokenizer's whole vocabulary.
    let vocab = tokenizer.vocab_size();
    let dim = 8;
    let mut rng = Rng(5);
    let init =
        |n: usize, rng: &mut Rng| -> Vec<f32> { (0..n).map(|_| rng.uniform() - 0.5).collect() };
    let embedding = Var::from_vec(init(vocab * dim, &mut rng), (vocab, dim), &dev).unwrap();
    let head = Var::from_vec(init(dim * vocab, &mut rng), (dim, vocab), &dev).unwrap();
    let ids = batch.input_ids.flatten_all().unwrap();
    let labels = batch.labels.flatten_all().unwrap();
    let mask = batch.response_mask.flatten_all().unwrap();
    let op = MaskedCrossEntropy::default();
    let mut losses = Vec::new();
    for _ in 0..4 {
        let hidden = embedding.as_tensor().index_select(&ids, 0).unwrap();
        let logits = hidden.matmul(head.as_tensor()).unwrap();
        let loss = op.loss(&logits, &labels, &mask).unwrap();
        let reference = candle_reference(&logits, &labels, &mask)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let value = loss.to_scalar::<f32>().unwrap();
        assert!(
            (value - reference).abs() <= 1e-4 * reference,
            "{value} vs {reference}"
        );
        losses.push(value);
        let grads = loss.backward().unwrap();
        for var in [&embedding, &head] {
            let g = grads.get(var.as_tensor()).unwrap();
            var.set(&(var.as_tensor() - (g * 2.0).unwrap()).unwrap())
                .unwrap();
        }
    }
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "the loss falls under SGD: {losses:?}"
    );
}
