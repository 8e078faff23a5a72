//! A trainer's use of the CUDA API beside its own cudarc (see ../README.md). Checked, not run, in CI.

use std::sync::Arc;

use sft_collate::backend::cuda::{
    self, DeviceCeTargets, DeviceLabels, ForeignSlice, MaskedCrossEntropy,
};
use sft_collate::loss::{CeOptions, CeRequest, LogitsShape};
use sft_collate::{tokenize_pairs, CollateSpec, Device, Tokenizer};

fn main() -> sft_collate::Result<()> {
    // The framework's own context and stream, and memory it owns.
    let context = cudarc::driver::CudaContext::new(0).expect("a GPU");
    let stream: Arc<cudarc::driver::CudaStream> = context.new_stream().expect("a stream");
    let device = Device::cuda_on_stream(stream.clone())?;
    let tokenizer = Tokenizer::load("o200k_base")?;
    let spec = CollateSpec {
        pad_id: tokenizer.pad_id(),
        ..Default::default()
    };
    let ragged = tokenize_pairs(&["2+2?"], &["4"], &tokenizer, spec.limit())?;
    let batch = device.collate(&ragged, &spec)?.to_host()?;
    let logits = stream.alloc_zeros::<f32>(3 * 100).expect("memory");
    // SAFETY: 3 + 3 elements of the framework's allocations, alive until the end of main.
    let labels = unsafe { ForeignSlice::<i64>::new(stream.clone(), logits_ptr(&logits), 3) };
    let mask = stream.clone_htod(&[1u8, 1, 0]).expect("copy");
    let loss = MaskedCrossEntropy::new(stream.clone())?;
    let targets = DeviceCeTargets::new(
        LogitsShape::dense(3, 100),
        DeviceLabels::I64(&labels),
        &mask,
    );
    let out = loss.forward(&logits, &targets, &CeOptions::default(), CeRequest::default())?;
    cuda::hand_off(&stream, &context.default_stream())?;
    println!("{:?} {:?}", batch.shape(), out.to_host()?.loss);
    Ok(())
}

fn logits_ptr(slice: &cudarc::driver::CudaSlice<f32>) -> u64 {
    use cudarc::driver::DevicePtr;
    let (ptr, _guard) = slice.device_ptr(slice.stream());
    ptr
}
