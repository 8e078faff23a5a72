//! A self-check of a device against the CPU oracle on fixed cases (edge cases and pseudo-random batches
//! over every option, and one cross-entropy problem): what `sft-collate doctor` runs on each device it
//! finds, so a user learns in a second whether the kernels are right on their machine.

use super::{cpu, Device};
use crate::collate::{CollateSpec, IdDtype, LabelFormat};
use crate::loss::{CeInput, CeOptions, CeRequest, Labels};
use crate::{RaggedBatch, Result};

/// What the self-check found: a line per check, and whether all passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub lines: Vec<String>,
    pub failures: usize,
}

/// Collate the fixed cases on `device` and compare bit for bit with the oracle; run one cross-entropy
/// problem with its gradient and compare within 1e-5 relative.
pub fn self_check(device: &Device) -> CheckReport {
    let name = device.kind();
    let mut report = CheckReport {
        lines: Vec::new(),
        failures: 0,
    };
    let fail = |report: &mut CheckReport, line: String| {
        report.lines.push(line);
        report.failures += 1;
    };
    let cases = collate_cases();
    let mut checked = 0;
    let mut failed = None;
    for (i, (batch, spec)) in cases.iter().enumerate() {
        let want = cpu::collate(batch, spec).expect("a valid case");
        match device.collate(batch, spec).and_then(|b| b.to_host()) {
            Ok(got) if got == want => checked += 1,
            Ok(_) => failed = Some(format!("differs from the CPU path on case {i}")),
            Err(e) => failed = Some(e.to_string()),
        }
        if failed.is_some() {
            break;
        }
    }
    match failed {
        None => report.lines.push(format!(
            "{name} collate self-check: {checked} batches identical to the CPU path"
        )),
        Some(why) => fail(
            &mut report,
            format!("{name} collate self-check: FAILED ({why})"),
        ),
    }
    match cross_entropy_case(device) {
        Ok(()) => report.lines.push(format!(
            "{name} cross-entropy self-check: loss, log-probs and gradient within 1e-5 of the f64 oracle"
        )),
        Err(why) => fail(
            &mut report,
            format!("{name} cross-entropy self-check: FAILED ({why})"),
        ),
    }
    report
}

fn cross_entropy_case(device: &Device) -> std::result::Result<(), String> {
    let (rows, vocab) = (6, 1237);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919) % 2003) as f32 / 100.0 - 10.0)
        .collect();
    let labels: Vec<i64> = (0..rows as i64).map(|r| r * 191 % vocab as i64).collect();
    let mask = vec![true, false, true, true, false, true];
    let input = CeInput::new(&logits, vocab, Labels::I64(&labels), &mask);
    let options = CeOptions::default();
    let want = cpu::loss::masked_cross_entropy(&input, &options, true).expect("a valid case");
    let got = device
        .cross_entropy(&input, &options, CeRequest::default(), true)
        .and_then(|o| o.to_host())
        .map_err(|e| e.to_string())?;
    let close = |g: f32, w: f64| (f64::from(g) - w).abs() <= 1e-5 * w.abs() + 1e-7;
    let grad_ok = got.grad.as_ref().is_some_and(|g| {
        g.iter()
            .zip(want.grad.as_ref().expect("asked for"))
            .all(|(&g, &w)| close(g, w))
    });
    let log_probs_ok = got
        .log_probs
        .iter()
        .zip(&want.log_probs)
        .all(|(&g, &w)| close(g, w));
    if close(got.loss, want.loss) && log_probs_ok && grad_ok {
        Ok(())
    } else {
        Err(format!("loss {} vs {}", got.loss, want.loss))
    }
}

/// Edge cases and a few pseudo-random batches over every option.
fn collate_cases() -> Vec<(RaggedBatch, CollateSpec)> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let mut cases = Vec::new();
    let edges = [
        RaggedBatch::new(),
        RaggedBatch::from_pairs([(vec![1], vec![])]),
        RaggedBatch::from_pairs([(vec![], vec![2, 3, 4]), (vec![5, 6], vec![])]),
    ];
    for batch in edges {
        let spec = CollateSpec {
            pad_id: Some(0),
            ..Default::default()
        };
        cases.push((batch, spec));
    }
    for i in 0..12 {
        let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..next(9))
            .map(|_| {
                let p = (0..next(40)).map(|_| next(150_000) as u32).collect();
                let o = (0..next(1500)).map(|_| next(150_000) as u32).collect();
                (p, o)
            })
            .collect();
        let spec = CollateSpec {
            pad_id: Some(next(150_000) as u32),
            pad_to_multiple_of: [None, Some(8), Some(64), Some(3)][i % 4],
            label_format: if i % 2 == 0 {
                LabelFormat::Pad
            } else {
                LabelFormat::IGNORE_INDEX
            },
            id_dtype: if i % 3 == 0 {
                IdDtype::I64
            } else {
                IdDtype::I32
            },
            attention_mask: i % 5 == 0,
            ..Default::default()
        };
        cases.push((RaggedBatch::from_pairs(rows), spec));
    }
    cases
}

/// The devices this build and machine can check besides the CPU: the emulator when built in, and GPU 0
/// when usable (or why not).
pub fn present_devices() -> Vec<Result<Device>> {
    [
        #[cfg(feature = "emulation")]
        Ok(Device::emulated()),
        #[cfg(feature = "cuda")]
        Device::cuda(0),
    ]
    .into_iter()
    .collect()
}
