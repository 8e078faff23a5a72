//! Vocabulary-parallel cross-entropy: ranks that each hold some columns of the logits, exchanging one
//! record per trained row through an in-process group, get what the unsplit oracle gives — per-row
//! outputs, sums, loss, and each rank the gradient of its columns — for any split, every option, and
//! the rows that stress the numerics (±1e4, -inf, NaN, +inf, ties across ranks). Bad splits and bad
//! inputs fail on every rank, never hang.

mod common;

use common::ce::{
    case_strategy, check, check_rows, close, extreme_rows_case, non_finite_case, Case,
};
use proptest::prelude::*;
use sft_collate::backend::cpu::loss::{
    masked_cross_entropy, vocab_parallel_cross_entropy, CeReference,
};
use sft_collate::loss::parallel::{Communicator, InProcessGroup, VocabShard};
use sft_collate::loss::{CeInput, CeRequest, Labels, LogitElem, LogitsShape};
use sft_collate::{Device, DeviceKind, Error, Result};

/// Rank input: columns `start..start + width` of every row of `logits` (the case's layout, `case.vocab`
/// apart), with the case's targets.
fn shard_input<'a, T>(
    case: &'a Case,
    logits: &'a [T],
    start: usize,
    width: usize,
) -> CeInput<'a, T> {
    CeInput {
        logits: &logits[start.min(logits.len())..],
        shape: LogitsShape {
            rows: case.rows,
            vocab: width,
            row_stride: case.vocab,
        },
        ..case.input(logits, Labels::I64(&case.labels))
    }
}

/// Run `case` split into the column ranges `shards` (one rank each, on its own thread; `vocab` is the
/// whole vocabulary the ranks are told of); each rank's result.
fn run_sharded(
    case: &Case,
    shards: &[(usize, usize)],
    vocab: usize,
    with_grad: bool,
) -> Vec<Result<CeReference>> {
    let group = InProcessGroup::new(shards.len()).unwrap();
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .zip(shards)
            .map(|(comm, &(start, width))| {
                scope.spawn(move || {
                    let input = shard_input(case, &case.logits, start, width);
                    let shard = VocabShard { start, vocab };
                    vocab_parallel_cross_entropy(&input, shard, &case.options, &comm, with_grad)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The column ranges of `vocab` cut at `cuts` (positions in 1..vocab, any order, repeats ignored).
fn shards_at(vocab: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % vocab).filter(|&c| c > 0).collect();
    points.extend([0, vocab]);
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
}

/// Every rank's result against the unsplit oracle: f64 all the way, so only summation order differs.
fn check_against_oracle(case: &Case, shards: &[(usize, usize)], with_grad: bool) {
    let input = case.input(&case.logits, Labels::I64(&case.labels));
    let want = masked_cross_entropy(&input, &case.options, with_grad).unwrap();
    let results = run_sharded(case, shards, case.vocab, with_grad);
    for (rank, (got, &(start, width))) in results.into_iter().zip(shards).enumerate() {
        let got = got.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        let what = format!("rank {rank} of {shards:?}");
        let rows = [&got.log_probs, &got.entropy, &got.lse, &got.row_loss];
        check_rows(rows.map(Vec::as_slice), &want, (1e-10, 1e-12), &what);
        assert_eq!(got.argmax, want.argmax, "{what}: argmax");
        assert_eq!(
            (got.count, got.correct, got.documents),
            (want.count, want.correct, want.documents),
            "{what}: counts"
        );
        for (name, g, w) in [
            ("sum", got.sum, want.sum),
            ("z_sum", got.z_sum, want.z_sum),
            ("loss", got.loss, want.loss),
        ] {
            assert!(close(g, w, 1e-10, 1e-12), "{what}: {name} = {g}, want {w}");
        }
        if with_grad {
            let (g, w) = (got.grad.unwrap(), want.grad.as_ref().unwrap());
            assert_eq!(g.len(), case.rows * width);
            for r in 0..case.rows {
                for i in 0..width {
                    let (gv, wv) = (g[r * width + i], w[r * case.vocab + start + i]);
                    assert!(
                        close(gv, wv, 1e-10, 1e-14),
                        "{what}: grad[{r}, {}] = {gv}, want {wv}",
                        start + i
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random problems (every option, masks or ignore_index, weights, documents), random splits into
    /// 1 to 6 ranks.
    #[test]
    fn any_split_gives_the_unsplit_loss_and_gradient(
        case in case_strategy(),
        cuts in prop::collection::vec(1usize..60_000, 0..5),
        with_grad in any::<bool>(),
    ) {
        let shards = shards_at(case.vocab, &cuts);
        check_against_oracle(&case, &shards, with_grad);
    }
}

#[test]
fn extreme_and_non_finite_rows_split_anywhere() {
    for case in [extreme_rows_case(), non_finite_case(40)] {
        let v = case.vocab;
        // Cuts that put the maxima, the -inf runs, the NaN and the +inf on either side, and one column
        // per rank.
        for cuts in [
            vec![1],
            vec![4],
            vec![v / 2],
            vec![3, 8, 11],
            vec![6, 9, 500, 998],
        ] {
            let shards = shards_at(v, &cuts);
            for with_grad in [false, true] {
                check_against_oracle(&case, &shards, with_grad);
            }
        }
    }
    // One column per rank.
    let case = non_finite_case(12);
    let shards: Vec<(usize, usize)> = (0..12).map(|i| (i, 1)).collect();
    check_against_oracle(&case, &shards, true);
}

#[test]
fn ties_across_ranks_keep_the_first_column() {
    // Equal maxima in different ranks: argmax is the first column, as torch.argmax; the softmax
    // counts every one of them.
    let case = common::ce::extreme_case(
        vec![
            vec![1.0, 5.0, 0.0, 5.0, 5.0],
            vec![-1.0, -1.0, -1.0, -1.0, -1.0],
        ],
        vec![3, 4],
    );
    for cuts in [vec![2], vec![1, 3], vec![4]] {
        check_against_oracle(&case, &shards_at(5, &cuts), true);
    }
    let results = run_sharded(&case, &shards_at(5, &[2]), 5, false);
    assert_eq!(results[1].as_ref().unwrap().argmax, vec![1, 0]);
}

#[test]
fn bad_splits_and_inputs_fail_on_every_rank() {
    let case = extreme_rows_case();
    let v = case.vocab;
    let collective = |results: Vec<Result<CeReference>>| {
        results
            .into_iter()
            .all(|r| matches!(r, Err(Error::Collective(_))))
    };
    // A gap, an overlap, columns beyond the vocabulary (that rank refuses its input), a rank told of
    // another vocabulary.
    assert!(collective(run_sharded(
        &case,
        &[(0, 10), (11, v - 11)],
        v,
        false
    )));
    assert!(collective(run_sharded(
        &case,
        &[(0, 10), (9, v - 9)],
        v,
        false
    )));
    let results = run_sharded(&case, &[(0, 10), (10, v)], v, false);
    assert!(
        matches!(results[1], Err(Error::Shape(_))),
        "{:?}",
        results[1]
    );
    assert!(matches!(results[0], Err(Error::Collective(_))));
    // A label outside the vocabulary: the same error on every rank (they all see the labels).
    let mut bad = extreme_rows_case();
    bad.labels[2] = v as i64;
    for r in run_sharded(&bad, &[(0, 500), (500, v - 500)], v, false) {
        assert!(
            matches!(r, Err(Error::LabelOutOfRange { row: 2, .. })),
            "{r:?}"
        );
    }
}

#[test]
fn a_rank_that_leaves_does_not_hang_the_others() {
    let mut group = InProcessGroup::new(3).unwrap();
    drop(group.pop());
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| scope.spawn(move || comm.all_gather(&[comm.rank() as u8])))
            .collect();
        for h in handles {
            assert!(matches!(h.join().unwrap(), Err(Error::Collective(_))));
        }
    });
}

#[test]
fn all_gather_concatenates_in_rank_order_and_refuses_uneven_lengths() {
    let group = InProcessGroup::new(4).unwrap();
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| {
                scope.spawn(move || {
                    let r = comm.rank() as u8;
                    let first = comm.all_gather(&[r, r + 10]).unwrap();
                    // Several rounds in a row, no rank waiting for the slowest to read.
                    let second = comm.all_gather(&[r * 2, 0]).unwrap();
                    let uneven = comm.all_gather(&vec![r; comm.rank() + 1]);
                    (first, second, uneven)
                })
            })
            .collect();
        for h in handles {
            let (first, second, uneven) = h.join().unwrap();
            assert_eq!(first, vec![0, 10, 1, 11, 2, 12, 3, 13]);
            assert_eq!(second, vec![0, 0, 2, 0, 4, 0, 6, 0]);
            assert!(matches!(uneven, Err(Error::Collective(_))));
        }
    });
    assert!(InProcessGroup::new(0).is_err());
}

/// Each rank on the device `device_of(rank)` gives, for the whole vocabulary, what the unsplit oracle
/// gives on the same logits (within the kernels' tolerances: `common::ce::check`), and the gradient of
/// its own columns.
fn device_split<T: LogitElem>(
    device_of: &(dyn Fn(usize) -> Device + Sync),
    case: &Case,
    shards: &[(usize, usize)],
    with_grad: bool,
) {
    let logits: Vec<T> = case.logits.iter().map(|&x| T::from_f32(x)).collect();
    let want = masked_cross_entropy(
        &case.input(&logits, Labels::I64(&case.labels)),
        &case.options,
        with_grad,
    )
    .unwrap();
    let group = InProcessGroup::new(shards.len()).unwrap();
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .zip(shards)
            .enumerate()
            .map(|(rank, (comm, &(start, width)))| {
                let logits = &logits;
                scope.spawn(move || {
                    let input = shard_input(case, logits, start, width);
                    let shard = VocabShard {
                        start,
                        vocab: case.vocab,
                    };
                    device_of(rank).vocab_parallel_cross_entropy(
                        &input,
                        shard,
                        &case.options,
                        CeRequest::default(),
                        &comm,
                        with_grad,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (got, &(start, width))) in results.into_iter().zip(shards).enumerate() {
        let got = got.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        // The oracle's gradient restricted to this rank's columns.
        let mine = CeReference {
            grad: want.grad.as_ref().map(|g| {
                g.chunks(case.vocab)
                    .flat_map(|row| row[start..start + width].iter().copied())
                    .collect()
            }),
            ..want.clone()
        };
        check(
            &got,
            &mine,
            &format!("{} rank {rank} of {shards:?}", T::SUFFIX),
        );
    }
}

/// Every rank on `device`: random problems (every option, masks or ignore_index, weights, documents)
/// split anywhere, the rows that stress the numerics, in f32 and bf16.
fn vocab_parallel_on_device(device: &Device) {
    let kind = device.kind();
    let device_of = |_: usize| match kind {
        DeviceKind::Cpu => Device::cpu(),
        _ => Device::new(kind.to_string().parse().unwrap()).unwrap(),
    };
    let cases = if kind == DeviceKind::Cpu { 48 } else { 12 };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        max_shrink_iters: 30,
        ..ProptestConfig::default()
    });
    let strategy = (
        case_strategy(),
        prop::collection::vec(1usize..60_000, 0..4),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(case, cuts, with_grad)| {
            let shards = shards_at(case.vocab, &cuts);
            device_split::<f32>(&device_of, &case, &shards, with_grad);
            device_split::<half::bf16>(&device_of, &case, &shards, with_grad);
            Ok(())
        })
        .unwrap();
    for case in [extreme_rows_case(), non_finite_case(40)] {
        for cuts in [vec![4], vec![case.vocab / 2], vec![6, 9, 500]] {
            device_split::<f32>(&device_of, &case, &shards_at(case.vocab, &cuts), true);
        }
    }
}

#[test]
fn vocab_parallel_on_the_cpu() {
    vocab_parallel_on_device(&Device::cpu());
}

/// The partials and gradient kernels (`masked_ce_shard_{fwd,bwd}_*`) on the emulator.
#[cfg(feature = "emulation")]
#[test]
fn vocab_parallel_on_the_emulator() {
    vocab_parallel_on_device(&Device::emulated());
}

/// The same kernels launched on a GPU.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA device"]
fn vocab_parallel_on_cuda() {
    vocab_parallel_on_device(&Device::cuda(0).expect("a CUDA device"));
}

/// Ranks on different backends are one group (one protocol): rank 0 on the CPU, rank 1 emulated.
#[cfg(feature = "emulation")]
#[test]
fn cpu_and_emulated_ranks_form_one_group() {
    let device_of = |rank: usize| match rank {
        0 => Device::cpu(),
        _ => Device::emulated(),
    };
    let case = extreme_rows_case();
    device_split::<f32>(&device_of, &case, &shards_at(case.vocab, &[300]), true);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(6));
    runner
        .run(&(case_strategy(), 1usize..60_000), |(case, cut)| {
            device_split::<f32>(&device_of, &case, &shards_at(case.vocab, &[cut]), true);
            Ok(())
        })
        .unwrap();
}

/// Without the NCCL library the group is a typed error, never cudarc's panic (this VM has none on the
/// loader's path; where one is, a unique id is made or NCCL's own error is reported).
#[cfg(feature = "nccl")]
#[test]
fn nccl_without_its_library_is_an_error() {
    use sft_collate::backend::cuda::NcclGroup;
    match std::panic::catch_unwind(NcclGroup::unique_id) {
        Ok(Err(Error::NoDevice(why))) => assert!(why.contains("libnccl"), "{why}"),
        Ok(Ok(_)) | Ok(Err(Error::Collective(_))) => {}
        Ok(Err(other)) => panic!("unexpected error {other}"),
        Err(_) => panic!("NcclGroup::unique_id panicked"),
    }
}

/// A group of every GPU of this machine over NCCL: the exchange concatenates in rank order, and the
/// vocabulary-parallel loss over it (the vocabulary split into as many shards as GPUs) equals the
/// unsplit oracle.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs a CUDA device and libnccl"]
fn nccl_group_of_this_machines_gpus() {
    use sft_collate::backend::cuda::{default_stream, device_count, NcclGroup};
    let gpus = device_count().expect("a CUDA device");
    let streams = (0..gpus).map(|g| default_stream(g).unwrap()).collect();
    let group = NcclGroup::from_streams(streams).expect("NCCL");
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| scope.spawn(move || comm.all_gather(&[comm.rank() as u8, 7]).unwrap()))
            .collect();
        let want: Vec<u8> = (0..gpus).flat_map(|r| [r as u8, 7]).collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), want);
        }
    });
    let case = extreme_rows_case();
    let cuts: Vec<usize> = (1..gpus).map(|k| k * case.vocab / gpus).collect();
    let shards = shards_at(case.vocab, &cuts);
    let logits = &case.logits;
    let want = masked_cross_entropy(
        &case.input(logits, Labels::I64(&case.labels)),
        &case.options,
        true,
    )
    .unwrap();
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .zip(&shards)
            .enumerate()
            .map(|(gpu, (comm, &(start, width)))| {
                let case = &case;
                scope.spawn(move || {
                    let input = shard_input(case, logits, start, width);
                    let shard = VocabShard {
                        start,
                        vocab: case.vocab,
                    };
                    Device::cuda(gpu)
                        .unwrap()
                        .vocab_parallel_cross_entropy(
                            &input,
                            shard,
                            &case.options,
                            CeRequest::default(),
                            comm,
                            false,
                        )
                        .unwrap()
                })
            })
            .collect();
        for h in handles {
            check(
                &h.join().unwrap(),
                &CeReference {
                    grad: None,
                    ..want.clone()
                },
                "nccl",
            );
        }
    });
}
