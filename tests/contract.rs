//! Property tests of the collation contract. The expected tensors are built here a second, independent
//! way (the CS336 formulation: pad the sequences into a matrix, slice it, fill the mask over
//! `[prompt_len - 1, prompt_len + output_len - 1)`), and compared with `cpu::collate` for random rows,
//! including empty prompts and outputs, every truncation policy, label format and id dtype.

use proptest::prelude::*;
use sft_collate::backend::cpu;
use sft_collate::{CollateSpec, Error, IdDtype, LabelFormat, RaggedBatch, Truncation};

#[derive(Debug, Clone)]
struct Case {
    rows: Vec<(Vec<u32>, Vec<u32>)>,
    spec: CollateSpec,
}

fn token() -> impl Strategy<Value = u32> {
    prop_oneof![9 => 0u32..1000, 1 => 0u32..=i32::MAX as u32]
}

fn case() -> impl Strategy<Value = Case> {
    let row = (
        prop::collection::vec(token(), 0..10),
        prop::collection::vec(token(), 0..10),
    );
    let spec = (
        prop::option::of(1usize..9),
        prop::option::of(1usize..16),
        prop_oneof![
            Just(Truncation::Error),
            Just(Truncation::PromptLeft),
            Just(Truncation::OutputRight)
        ],
        prop_oneof![Just(LabelFormat::Pad), Just(LabelFormat::IGNORE_INDEX)],
        prop_oneof![Just(IdDtype::I32), Just(IdDtype::I64)],
        0u32..2000,
        any::<bool>(),
    )
        .prop_map(
            |(
                pad_to_multiple_of,
                max_len,
                truncation,
                label_format,
                id_dtype,
                pad,
                attention_mask,
            )| CollateSpec {
                pad_id: Some(pad),
                max_len,
                truncation,
                pad_to_multiple_of,
                label_format,
                id_dtype,
                attention_mask,
            },
        );
    (prop::collection::vec(row, 0..7), spec).prop_map(|(rows, spec)| Case { rows, spec })
}

/// Truncation, written from the policy's description.
fn truncate(p: &[u32], o: &[u32], spec: &CollateSpec) -> Option<(Vec<u32>, Vec<u32>)> {
    let (mut p, mut o) = (p.to_vec(), o.to_vec());
    let Some(max_len) = spec.max_len else {
        return Some((p, o));
    };
    let excess = (p.len() + o.len()).saturating_sub(max_len);
    if excess == 0 {
        return Some((p, o));
    }
    match spec.truncation {
        Truncation::Error => return None,
        Truncation::PromptLeft => {
            let from_prompt = excess.min(p.len());
            p.drain(..from_prompt);
            o.truncate(o.len() - (excess - from_prompt));
        }
        Truncation::OutputRight => {
            let from_output = excess.min(o.len());
            o.truncate(o.len() - from_output);
            p.drain(..excess - from_output);
        }
    }
    Some((p, o))
}

struct Expected {
    width: usize,
    input_ids: Vec<i64>,
    labels: Vec<i64>,
    mask: Vec<bool>,
    attention: Vec<bool>,
}

fn expected(rows: &[(Vec<u32>, Vec<u32>)], spec: &CollateSpec) -> Expected {
    let pad = i64::from(spec.pad_id.unwrap());
    let seqs: Vec<Vec<i64>> = rows
        .iter()
        .map(|(p, o)| p.iter().chain(o).map(|&t| i64::from(t)).collect())
        .collect();
    let l = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut width = l.saturating_sub(1);
    if let Some(m) = spec.pad_to_multiple_of {
        while width % m != 0 {
            width += 1;
        }
    }
    // The padded matrix is one column wider than the tensors, so that both slices exist.
    let padded: Vec<Vec<i64>> = seqs
        .iter()
        .map(|s| {
            let mut row = s.clone();
            row.resize(width + 1, pad);
            row
        })
        .collect();
    let mut e = Expected {
        width,
        input_ids: vec![],
        labels: vec![],
        mask: vec![],
        attention: vec![],
    };
    for ((p, o), row) in rows.iter().zip(&padded) {
        let mut mask = vec![false; width];
        let end = (p.len() + o.len()).saturating_sub(1);
        let start = p.len().max(1) - 1;
        for m in mask.iter_mut().take(end).skip(start) {
            *m = true;
        }
        e.input_ids.extend_from_slice(&row[..width]);
        for (j, &label) in row[1..].iter().enumerate() {
            e.labels.push(match spec.label_format {
                LabelFormat::IgnoreIndex(v) if !mask[j] => v,
                _ => label,
            });
        }
        e.mask.extend(mask);
        e.attention
            .extend((0..width).map(|j| j < p.len() + o.len()));
    }
    e
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn collate_matches_the_contract(case in case()) {
        let truncated: Option<Vec<_>> = case.rows.iter().map(|(p, o)| truncate(p, o, &case.spec)).collect();
        let packed = RaggedBatch::from_pairs_truncated(case.rows.iter().map(|(p, o)| (p, o)), case.spec.limit());
        let Some(truncated) = truncated else {
            let refused = matches!(packed.as_ref().map_err(Error::innermost), Err(Error::SequenceTooLong { .. }));
            prop_assert!(refused);
            return Ok(());
        };
        let packed = packed.unwrap();
        let result = cpu::collate(&packed, &case.spec);
        let too_big = case.spec.id_dtype == IdDtype::I32
            && truncated.iter().flat_map(|(p, o)| p.iter().chain(o)).any(|&t| t > i32::MAX as u32);
        if too_big {
            let refused = matches!(result, Err(Error::IdOverflow { .. }));
            prop_assert!(refused);
            return Ok(());
        }
        let batch = result.unwrap();
        let want = expected(&truncated, &case.spec);
        prop_assert_eq!(batch.shape(), (truncated.len(), want.width));
        prop_assert_eq!(batch.input_ids.to_i64(), want.input_ids);
        prop_assert_eq!(batch.labels.to_i64(), want.labels);
        prop_assert_eq!(&batch.response_mask, &want.mask);
        prop_assert_eq!(batch.input_ids.dtype(), case.spec.id_dtype);
        prop_assert_eq!(batch.attention_mask.as_ref(), case.spec.attention_mask.then_some(&want.attention));

        // Statistics agree with the tensors.
        let s = &batch.stats;
        prop_assert_eq!(s.response_tokens, want.mask.iter().filter(|&&m| m).count());
        prop_assert_eq!(s.tokens, truncated.iter().map(|(p, o)| p.len() + o.len()).sum::<usize>());
        let empty: Vec<usize> = (0..truncated.len())
            .filter(|&i| !want.mask[i * want.width..(i + 1) * want.width].contains(&true))
            .collect();
        prop_assert_eq!(&s.empty_response_rows, &empty);
        if want.width > 0 && !truncated.is_empty() {
            let real: usize = truncated.iter().map(|(p, o)| (p.len() + o.len()).saturating_sub(1)).sum();
            let frac = 1.0 - real as f64 / (truncated.len() * want.width) as f64;
            prop_assert!((s.padding_fraction - frac).abs() < 1e-12);
        }
        if let Some(max_len) = case.spec.max_len {
            prop_assert!(truncated.iter().all(|(p, o)| p.len() + o.len() <= max_len));
        }
    }
}

#[test]
fn the_visual_guide_example() {
    let packed = RaggedBatch::from_pairs([
        (vec![1, 2, 3, 4], vec![5, 6, 7]),
        (vec![1, 2], vec![3, 4, 5, 6, 7]),
        (vec![1, 2, 3], vec![4, 5]),
    ]);
    let spec = CollateSpec {
        pad_id: Some(0),
        ..Default::default()
    };
    let batch = cpu::collate(&packed, &spec).unwrap();
    assert_eq!(batch.shape(), (3, 6));
    let row = |i: usize| &batch.response_mask[i * 6..(i + 1) * 6];
    assert_eq!(row(0), [false, false, false, true, true, true]);
    assert_eq!(row(1), [false, true, true, true, true, true]);
    assert_eq!(row(2), [false, false, true, true, false, false]);
    assert_eq!(&batch.labels.to_i64()[12..], [2, 3, 4, 5, 0, 0]);
}

#[test]
fn edge_shapes() {
    let spec = CollateSpec {
        pad_id: Some(9),
        pad_to_multiple_of: Some(4),
        ..Default::default()
    };
    // Empty batch: (0, 0).
    let b = cpu::collate(&RaggedBatch::new(), &spec).unwrap();
    assert_eq!(b.shape(), (0, 0));
    assert!(b.input_ids.is_empty());
    // All sequences of length <= 1: (B, 0), and every row is reported as having no response.
    let b = cpu::collate(
        &RaggedBatch::from_pairs([(vec![1], vec![]), (vec![], vec![2])]),
        &spec,
    )
    .unwrap();
    assert_eq!(b.shape(), (2, 0));
    assert_eq!(b.stats.empty_response_rows, [0, 1]);
    assert_eq!(b.stats.padding_fraction, 0.0);
    // Empty prompt: the first output token is never a label.
    let b = cpu::collate(&RaggedBatch::from_pairs([(vec![], vec![5, 6, 7])]), &spec).unwrap();
    assert_eq!(b.shape(), (1, 4));
    assert_eq!(b.response_mask, [true, true, false, false]);
    assert_eq!(b.labels.to_i64(), [6, 7, 9, 9]);
}

#[test]
fn bad_specs_are_typed_errors() {
    let packed = RaggedBatch::from_pairs([(vec![1], vec![2])]);
    let no_pad = CollateSpec::default();
    assert!(matches!(
        cpu::collate(&packed, &no_pad),
        Err(Error::NoPadToken)
    ));
    let zero_multiple = CollateSpec {
        pad_id: Some(0),
        pad_to_multiple_of: Some(0),
        ..Default::default()
    };
    assert!(matches!(
        cpu::collate(&packed, &zero_multiple),
        Err(Error::InvalidOption {
            name: "pad_to_multiple_of",
            ..
        })
    ));
    let big_pad = CollateSpec {
        pad_id: Some(u32::MAX),
        ..Default::default()
    };
    assert!(matches!(
        cpu::collate(&packed, &big_pad),
        Err(Error::IdOverflow { .. })
    ));
    let big_ignore = CollateSpec {
        pad_id: Some(0),
        label_format: LabelFormat::IgnoreIndex(i64::MIN),
        ..Default::default()
    };
    assert!(matches!(
        cpu::collate(&packed, &big_ignore),
        Err(Error::IdOverflow { .. })
    ));
}
