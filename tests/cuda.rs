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
    let targets = DeviceCeTargets::new(
        LogitsShape::dense(rows, vocab),
        DeviceLabels::I64(&d_labels),
        &d_mask,
    );
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
    let targets =
        DeviceCeTargets::new(LogitsShape::dense(2, 10), DeviceLabels::I32(&labels), &mask);
    let out = ce
        .forward(&logits, &targets, &Default::default(), CeRequest::default())
        .unwrap();
    assert!(matches!(out.check(), Err(Error::DeviceLabelOutOfRange)));
}

/// cu_seqlens on the device are only read, never trusted: boundaries that do not rise from 0 to the
/// rows set the flag (a typed error on `check`), and nothing is read out of bounds (compute-sanitizer
/// runs this in gpu-check.sh). Without a mask, the ignore index chooses the trained rows.
#[test]
#[ignore = "needs a CUDA device"]
fn bad_device_cu_seqlens_set_the_flag_and_touch_nothing_outside() {
    use sft_collate::loss::Normalization;
    let (ce, stream) = kernels();
    let logits = stream.clone_htod(&vec![0.5f32; 40]).unwrap();
    let labels = stream.clone_htod(&[1i32, -100, 3, 2]).unwrap();
    let options = CeOptions {
        normalization: Normalization::SequenceMean,
        ignore_index: Some(-100),
        ..CeOptions::default()
    };
    let shape = LogitsShape::dense(4, 10);
    for (cu, ok) in [
        (vec![0i32, 2, 4], true),
        (vec![0, 3, 2, 4], false),
        (vec![0, 2, 9], false),
        (vec![1, 2, 4], false),
        (vec![0, -5, 4], false),
        (vec![0, 2, 3], false),
    ] {
        let d_cu = stream.clone_htod(&cu).unwrap();
        let targets = DeviceCeTargets {
            cu_seqlens: Some(&d_cu),
            ..DeviceCeTargets::unmasked(shape, DeviceLabels::I32(&labels))
        };
        let out = ce
            .forward(&logits, &targets, &options, CeRequest::default())
            .unwrap();
        match ok {
            true => {
                let host = out.to_host().unwrap();
                assert_eq!((host.count, host.documents), (3, 2));
                // Two documents, each row's loss ln 10: the mean of means is ln 10.
                assert!((host.loss - 10f32.ln()).abs() < 1e-5, "{}", host.loss);
            }
            false => assert!(matches!(out.check(), Err(Error::Shape(_))), "{cu:?}"),
        }
    }
}

/// What a data-parallel trainer shares between threads is `Send` and `Sync`.
#[test]
fn device_types_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Device>();
    send_sync::<cuda::CudaDevice>();
    send_sync::<cuda::CudaCollator>();
    send_sync::<MaskedCrossEntropy>();
    send_sync::<cuda::DeviceBatch>();
    send_sync::<cuda::DeviceCeOutput<half::bf16>>();
    send_sync::<cuda::ForeignSlice<f32>>();
}

mod trainer_memory {
    use super::*;
    use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
    use sft_collate::backend::cpu;
    use sft_collate::backend::cuda::{BatchBuffers, DeviceIdsMut, ForeignSlice, PackBuffers};
    use sft_collate::loss::{CeInput, Labels, Normalization};
    use sft_collate::{CollateSpec, IdDtype, LabelFormat, RaggedBatch};
    use std::sync::Arc;

    fn stream() -> Arc<CudaStream> {
        cuda::default_stream(0).expect("a CUDA device")
    }

    fn addr<T>(slice: &CudaSlice<T>) -> u64 {
        slice.device_ptr(slice.stream()).0
    }

    fn batch() -> (RaggedBatch, CollateSpec) {
        let ragged = RaggedBatch::from_pairs([
            (vec![5, 6, 7], vec![8, 9]),
            (vec![1], vec![2, 3, 4, 5, 6, 7]),
            (vec![], vec![4]),
        ]);
        let spec = CollateSpec {
            pad_id: Some(0),
            label_format: LabelFormat::IGNORE_INDEX,
            id_dtype: IdDtype::I64,
            attention_mask: true,
            ..Default::default()
        };
        (ragged, spec)
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn collate_into_the_trainers_buffers_reused_every_step() {
        let stream = stream();
        let collator = cuda::CudaCollator::new(stream.clone()).unwrap();
        let (ragged, spec) = batch();
        let want = cpu::collate(&ragged, &spec).unwrap();
        let n = want.response_mask.len();
        // Larger than needed, as a trainer's reused buffers are; the tail is left alone.
        let mut ids = stream.alloc_zeros::<i64>(n + 5).unwrap();
        let mut labels = stream.alloc_zeros::<i64>(n + 5).unwrap();
        let mut mask = stream.alloc_zeros::<u8>(n + 5).unwrap();
        let mut attention = stream.alloc_zeros::<u8>(n + 5).unwrap();
        for _step in 0..3 {
            let stats = collator
                .collate_into(
                    &ragged,
                    &spec,
                    &mut BatchBuffers {
                        input_ids: DeviceIdsMut::I64(&mut ids),
                        labels: DeviceIdsMut::I64(&mut labels),
                        response_mask: &mut mask,
                        attention_mask: Some(&mut attention),
                    },
                )
                .unwrap();
            assert_eq!(stats, want.stats);
            assert_eq!(
                &stream.clone_dtoh(&ids).unwrap()[..n],
                want.input_ids.to_i64()
            );
            assert_eq!(
                &stream.clone_dtoh(&labels).unwrap()[..n],
                want.labels.to_i64()
            );
            let mask_host: Vec<bool> = stream.clone_dtoh(&mask).unwrap()[..n]
                .iter()
                .map(|&b| b == 1)
                .collect();
            assert_eq!(mask_host, want.response_mask);
        }
        // A view at an offset into a larger buffer is a buffer too.
        let mut big = stream.alloc_zeros::<i64>(3 * n).unwrap();
        let mut view = big.slice_mut(n..2 * n);
        let mut labels_view = labels.slice_mut(0..n);
        collator
            .collate_into(
                &ragged,
                &spec,
                &mut BatchBuffers {
                    input_ids: DeviceIdsMut::I64(&mut view),
                    labels: DeviceIdsMut::I64(&mut labels_view),
                    response_mask: &mut mask,
                    attention_mask: Some(&mut attention),
                },
            )
            .unwrap();
        let host = stream.clone_dtoh(&big).unwrap();
        assert_eq!(&host[n..2 * n], want.input_ids.to_i64());
        assert!(host[..n].iter().chain(&host[2 * n..]).all(|&x| x == 0));
        // Too small, or of the wrong dtype: refused before launch.
        let mut small = stream.alloc_zeros::<i64>(n - 1).unwrap();
        let too_small = collator.collate_into(
            &ragged,
            &spec,
            &mut BatchBuffers {
                input_ids: DeviceIdsMut::I64(&mut small),
                labels: DeviceIdsMut::I64(&mut labels),
                response_mask: &mut mask,
                attention_mask: Some(&mut attention),
            },
        );
        assert!(too_small.is_err());
        let mut wrong = stream.alloc_zeros::<i32>(n).unwrap();
        let wrong_dtype = collator.collate_into(
            &ragged,
            &spec,
            &mut BatchBuffers {
                input_ids: DeviceIdsMut::I32(&mut wrong),
                labels: DeviceIdsMut::I64(&mut labels),
                response_mask: &mut mask,
                attention_mask: Some(&mut attention),
            },
        );
        assert!(wrong_dtype.is_err());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn pack_into_foreign_memory_on_a_borrowed_stream() {
        // A framework's stream and memory: a raw CUstream and raw addresses, wrapped, never owned.
        let owner = cuda::default_stream(0)
            .unwrap()
            .context()
            .new_stream()
            .unwrap();
        // SAFETY: `owner` outlives everything made on the borrowed stream below.
        let stream = unsafe { cuda::borrowed_stream(0, owner.cu_stream() as u64) }.unwrap();
        let collator = cuda::CudaCollator::new(stream.clone()).unwrap();
        let (ragged, spec) = batch();
        let want = cpu::collate_pack(&ragged, &spec).unwrap();
        let total = want.response_mask.len();
        let buffers: Vec<CudaSlice<i64>> = (0..3)
            .map(|_| owner.alloc_zeros::<i64>(total).unwrap())
            .collect();
        let mask = owner.alloc_zeros::<u8>(total).unwrap();
        let cu = owner.alloc_zeros::<i32>(want.cu_seqlens.len()).unwrap();
        // SAFETY: each wraps a live allocation of exactly that many elements, kept until the end.
        let (mut ids, mut labels, mut positions, mut m, mut c) = unsafe {
            (
                ForeignSlice::<i64>::new(stream.clone(), addr(&buffers[0]), total),
                ForeignSlice::<i64>::new(stream.clone(), addr(&buffers[1]), total),
                ForeignSlice::<i64>::new(stream.clone(), addr(&buffers[2]), total),
                ForeignSlice::<u8>::new(stream.clone(), addr(&mask), total),
                ForeignSlice::<i32>::new(stream.clone(), addr(&cu), want.cu_seqlens.len()),
            )
        };
        let layout = collator
            .collate_pack_into(
                &ragged,
                &spec,
                &mut PackBuffers {
                    input_ids: DeviceIdsMut::I64(&mut ids),
                    labels: DeviceIdsMut::I64(&mut labels),
                    response_mask: &mut m,
                    position_ids: DeviceIdsMut::I64(&mut positions),
                    cu_seqlens: &mut c,
                },
            )
            .unwrap();
        assert_eq!(layout.cu_seqlens, want.cu_seqlens);
        assert_eq!(layout.stats, want.stats);
        owner.synchronize().unwrap();
        assert_eq!(
            owner.clone_dtoh(&buffers[0]).unwrap(),
            want.input_ids.to_i64()
        );
        assert_eq!(owner.clone_dtoh(&buffers[1]).unwrap(), want.labels.to_i64());
        assert_eq!(
            owner.clone_dtoh(&buffers[2]).unwrap(),
            want.position_ids.to_i64()
        );
        assert_eq!(owner.clone_dtoh(&cu).unwrap(), want.cu_seqlens);
    }

    /// The cross-entropy over views (logits as rows of a larger buffer, at an offset), the gradient into
    /// the trainer's buffer and in place, and the upstream gradient as a device scalar: all equal to the
    /// dense, host-upstream computation.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn cross_entropy_over_views_into_buffers_with_a_device_upstream() {
        let stream = stream();
        let ce = MaskedCrossEntropy::new(stream.clone()).unwrap();
        let (rows, vocab, stride, offset) = (6, 1003, 1010, 37);
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919) % 2003) as f32 / 100.0 - 10.0)
            .collect();
        let labels: Vec<i32> = (0..rows as i32).map(|r| r * 151 % vocab as i32).collect();
        let mask_host = [true, false, true, true, false, true];
        let mask: Vec<u8> = mask_host.iter().map(|&m| u8::from(m)).collect();
        let options = CeOptions {
            normalization: Normalization::TokenMean,
            upstream: 0.37,
            ..CeOptions::default()
        };
        let input = CeInput::new(&logits, vocab, Labels::I32(&labels), &mask_host);
        let want = cpu::loss::masked_cross_entropy(&input, &options, true).unwrap();
        // The logits as rows `stride` apart inside a larger buffer, starting at `offset`.
        let mut padded = vec![f32::NAN; offset + rows * stride];
        for r in 0..rows {
            padded[offset + r * stride..][..vocab].copy_from_slice(&logits[r * vocab..][..vocab]);
        }
        let big = stream.clone_htod(&padded).unwrap();
        let view = big.slice(offset..);
        let d_labels = stream.clone_htod(&labels).unwrap();
        let d_mask = stream.clone_htod(&mask).unwrap();
        let upstream = stream.clone_htod(&[0.37f32]).unwrap();
        let shape = LogitsShape {
            rows,
            vocab,
            row_stride: stride,
        };
        let mut targets = DeviceCeTargets::new(shape, DeviceLabels::I32(&d_labels), &d_mask);
        targets.upstream = Some(&upstream);
        let host_upstream = CeOptions {
            upstream: 123.0, // replaced by the device scalar
            ..options
        };
        let mut grad = stream.alloc_zeros::<f32>(rows * stride).unwrap();
        let out = ce
            .forward_backward_into(
                &view,
                &targets,
                &host_upstream,
                CeRequest::default(),
                &mut grad,
                stride,
            )
            .unwrap()
            .to_host()
            .unwrap();
        assert!((f64::from(out.loss) - want.loss).abs() < 1e-5 * want.loss.abs());
        let grad = stream.clone_dtoh(&grad).unwrap();
        let want_grad = want.grad.as_ref().unwrap();
        for r in 0..rows {
            for i in 0..vocab {
                let (g, w) = (f64::from(grad[r * stride + i]), want_grad[r * vocab + i]);
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs() + 1e-9,
                    "[{r}, {i}] {g} vs {w}"
                );
            }
            assert!(grad[r * stride + vocab..(r + 1) * stride]
                .iter()
                .all(|&x| x == 0.0));
        }
        // In place over the strided view gives the same gradient in the logits' layout.
        let mut big = big;
        let mut view = big.slice_mut(offset..);
        ce.forward_backward_in_place(&mut view, &targets, &host_upstream, CeRequest::default())
            .unwrap()
            .check()
            .unwrap();
        let in_place = stream.clone_dtoh(&big).unwrap();
        for r in 0..rows {
            assert_eq!(
                &in_place[offset + r * stride..][..vocab],
                &grad[r * stride..][..vocab],
                "row {r}"
            );
        }
    }

    /// A trainer's step never waits for the device: with the stream busy for 400 ms, the device-resident
    /// calls return at once (uploads, launches), and only reading a result back waits.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn device_calls_never_wait_for_the_device() {
        use std::time::{Duration, Instant};
        let device = Device::cuda(0).unwrap();
        let cuda_device = device.as_cuda().unwrap();
        let stream = cuda_device.stream().clone();
        let collator = cuda_device.collator().unwrap();
        let ce = cuda_device.masked_cross_entropy().unwrap();
        let (ragged, spec) = batch();
        let (rows, vocab) = (64, 32_000);
        let logits = stream.alloc_zeros::<half::bf16>(rows * vocab).unwrap();
        let labels = stream.alloc_zeros::<i64>(rows).unwrap();
        let mask = stream.clone_htod(&vec![1u8; rows]).unwrap();
        let upstream = stream.clone_htod(&[1.0f32]).unwrap();
        let mut targets = DeviceCeTargets::new(
            LogitsShape::dense(rows, vocab),
            DeviceLabels::I64(&labels),
            &mask,
        );
        targets.upstream = Some(&upstream);
        let mut grad = stream.alloc_zeros::<half::bf16>(rows * vocab).unwrap();
        let step = |grad: &mut CudaSlice<half::bf16>| {
            let batch = device.collate(&ragged, &spec).unwrap();
            let pack = collator.collate_pack(&ragged, &spec).unwrap();
            let out = ce
                .forward_backward_into(
                    &logits,
                    &targets,
                    &CeOptions::default(),
                    CeRequest::default(),
                    grad,
                    vocab,
                )
                .unwrap();
            (batch, pack, out)
        };
        // Warm up: modules loaded, staging buffers made.
        let _ = step(&mut grad);
        stream.synchronize().unwrap();
        // Kept until the end: unloading the module would wait for the spin.
        let spinning = sft_collate::backend::cuda::bench::spin(&stream, 400_000_000).unwrap();
        let started = Instant::now();
        let mut results = Vec::new();
        // Three steps: six uploads, within the eight staging buffers (with more uploads in flight than
        // that, an upload waits for the oldest by design; five steps' ten did, on an H200).
        for _ in 0..3 {
            results.push(step(&mut grad));
        }
        let issued = started.elapsed();
        assert!(
            issued < Duration::from_millis(150),
            "3 steps took {issued:?} to issue"
        );
        let (batch, _, out) = results.pop().unwrap();
        batch.to_host().unwrap();
        out.check().unwrap();
        let done = started.elapsed();
        assert!(
            done > Duration::from_millis(300),
            "read back after {done:?}: was the spin skipped?"
        );
        eprintln!("issued 3 steps in {issued:?}; the results were ready after {done:?}");
        drop(spinning);
    }

    /// Two streams of one device (one per "rank" thread), each with its own collator and loss, at the same
    /// time: every result equals the oracle.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn two_streams_from_two_threads() {
        let context = cuda::default_stream(0).unwrap().context().clone();
        std::thread::scope(|scope| {
            for rank in 0..2u32 {
                let context = context.clone();
                scope.spawn(move || {
                    let device = Device::cuda_on_stream(context.new_stream().unwrap()).unwrap();
                    for step in 0..20u32 {
                        let ragged = RaggedBatch::from_pairs([(
                            (0..rank + step).collect::<Vec<u32>>(),
                            (0..17 + step).collect::<Vec<u32>>(),
                        )]);
                        let spec = CollateSpec {
                            pad_id: Some(rank),
                            ..Default::default()
                        };
                        let got = device.collate(&ragged, &spec).unwrap().to_host().unwrap();
                        assert_eq!(got, cpu::collate(&ragged, &spec).unwrap(), "rank {rank}");
                        let logits: Vec<f32> =
                            (0..4 * 50).map(|i| (i as f32 * 0.37).sin()).collect();
                        let mask = [true, true, false, true];
                        let labels = [1i64, 2, 3, (step % 50) as i64];
                        let input = CeInput::new(&logits, 50, Labels::I64(&labels), &mask);
                        let out = device
                            .cross_entropy(
                                &input,
                                &CeOptions::default(),
                                CeRequest::default(),
                                true,
                            )
                            .unwrap()
                            .to_host()
                            .unwrap();
                        let want =
                            cpu::loss::masked_cross_entropy(&input, &CeOptions::default(), true)
                                .unwrap();
                        assert!((f64::from(out.loss) - want.loss).abs() < 1e-5);
                    }
                });
            }
        });
    }

    /// Producing on one stream and consuming on another: the consumer waits on the device.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn hand_off_orders_two_streams_without_the_host() {
        let producer = cuda::default_stream(0)
            .unwrap()
            .context()
            .new_stream()
            .unwrap();
        let consumer = producer.context().new_stream().unwrap();
        let collator = cuda::CudaCollator::new(producer.clone()).unwrap();
        let (ragged, spec) = batch();
        // The producer is still spinning when the batch is made and handed off (the module is kept:
        // unloading it would wait).
        let spinning = sft_collate::backend::cuda::bench::spin(&producer, 100_000_000).unwrap();
        let batch = collator.collate(&ragged, &spec).unwrap();
        cuda::hand_off(&producer, &consumer).unwrap();
        // A copy on the consumer stream sees the finished batch.
        let mut copy = consumer
            .alloc_zeros::<u8>(batch.response_mask.len())
            .unwrap();
        consumer
            .memcpy_dtod(&batch.response_mask, &mut copy)
            .unwrap();
        let host = consumer.clone_dtoh(&copy).unwrap();
        let want = cpu::collate(&ragged, &spec).unwrap();
        let want: Vec<u8> = want.response_mask.iter().map(|&m| u8::from(m)).collect();
        assert_eq!(host, want);
        drop(spinning);
    }
}
