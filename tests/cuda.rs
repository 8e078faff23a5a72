//! What only the CUDA backend has: probing without a driver, the device-resident cross-entropy API
//! (in-place gradient, the device-side bad-label flag). The kernel properties themselves run on every
//! device in `tests/backends.rs`. Ignored without a GPU; `scripts/gpu-check.sh` runs them.
#![cfg(feature = "cuda")]

use sft_collate::backend::cuda::{self, DeviceCeTargets, DeviceLabels, MaskedCrossEntropy};
use sft_collate::loss::{CeOptions, CeRequest, LogitsShape};
use sft_collate::{Device, DeviceChoice, DeviceKind, Error};

#[test]
fn probing_never_panics() {
    // On a machine without libcuda this is an error; with a GPU it is a count. Either way, no panic, and
    // `auto` always gives a device, saying why it is not a GPU.
    match cuda::device_count() {
        Ok(n) => assert!(n > 0),
        Err(e) => eprintln!("no GPU here: {e}"),
    }
    let device = Device::new(DeviceChoice::Auto).unwrap();
    if device.kind() == DeviceKind::Cpu {
        assert!(device.fallback().is_some());
    }
}

fn kernels() -> (MaskedCrossEntropy, std::sync::Arc<cuda::CudaStream>) {
    let stream = cuda::default_stream(0).expect("a CUDA device");
    (
        MaskedCrossEntropy::new(stream.clone()).expect("kernels load"),
        stream,
    )
}

#[test]
#[ignore = "needs a CUDA device"]
fn in_place_gradient_equals_the_separate_one() {
    let (ce, stream) = kernels();
    let (rows, vocab) = (7, 1000);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 37) % 101) as f32 * 0.1)
        .collect();
    let labels: Vec<i64> = (0..rows as i64).map(|r| r * 13).collect();
    let mask: Vec<u8> = vec![1, 0, 1, 1, 0, 1, 1];
    let d_logits = stream.clone_htod(&logits).unwrap();
    let d_labels = stream.clone_htod(&labels).unwrap();
    let d_mask = stream.clone_htod(&mask).unwrap();
    let targets = DeviceCeTargets {
        shape: LogitsShape::dense(rows, vocab),
        labels: DeviceLabels::I64(&d_labels),
        mask: &d_mask,
        weights: None,
    };
    let options = CeOptions::default();
    let separate = ce
        .forward_backward(&d_logits, &targets, &options, CeRequest::default())
        .unwrap()
        .to_host()
        .unwrap();
    let mut in_place = d_logits.clone();
    let out = ce
        .forward_backward_in_place(&mut in_place, &targets, &options, CeRequest::default())
        .unwrap();
    out.check().unwrap();
    assert_eq!(Some(stream.clone_dtoh(&in_place).unwrap()), separate.grad);
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_bad_label_sets_the_device_flag() {
    let (ce, stream) = kernels();
    let logits = stream.clone_htod(&vec![0.5f32; 20]).unwrap();
    let labels = stream.clone_htod(&[10i32, 3]).unwrap();
    let mask = stream.clone_htod(&[1u8, 0]).unwrap();
    let targets = DeviceCeTargets {
        shape: LogitsShape::dense(2, 10),
        labels: DeviceLabels::I32(&labels),
        mask: &mask,
        weights: None,
    };
    let out = ce
        .forward(&logits, &targets, &Default::default(), CeRequest::default())
        .unwrap();
    assert!(matches!(out.check(), Err(Error::DeviceLabelOutOfRange)));
}
