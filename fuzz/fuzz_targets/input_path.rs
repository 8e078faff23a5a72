//! The input path as the dataset job runs it, on arbitrary bytes: a prompt template and a message template
//! (first two NUL-separated fields), JSONL lines after them (UTF-8 or not), read line by line, parsed into
//! rows (pairs, templates, `messages`), tokenized, truncated by a length limit, collated padded and packed,
//! bucketed and packed by every strategy. Nothing may panic: every failure is a typed error.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sft_collate::backend::cpu;
use sft_collate::input::jsonl::Lines;
use sft_collate::input::{MessageFormat, RowFormat, Template};
use sft_collate::schedule::{bucket_order, plan_packs, Overflow, PackSpec, PackStrategy};
use sft_collate::{
    tokenize_rows, CollateSpec, IdDtype, LabelFormat, LengthLimit, RaggedBatch, Tokenizer,
    Truncation,
};

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::load("cl100k_base").expect("built in"))
}

fuzz_target!(|data: &[u8]| {
    let mut fields = data.splitn(3, |&b| b == 0);
    let (Some(template), Some(message_template), Some(lines)) =
        (fields.next(), fields.next(), fields.next())
    else {
        return;
    };
    // Options from the first bytes of the input.
    let knob = |i: usize| lines.get(i).copied().unwrap_or(0) as usize;
    let template = std::str::from_utf8(template)
        .ok()
        .and_then(|t| Template::parse(t).ok())
        .filter(|_| knob(0) % 2 == 0);
    let messages = std::str::from_utf8(message_template)
        .ok()
        .and_then(|t| MessageFormat::new(Some(t), vec!["assistant".into()]).ok());
    let format = RowFormat {
        prompt_key: "prompt".into(),
        output_key: "output".into(),
        template,
        messages,
    };
    let mut rows = Vec::new();
    for line in Lines::new(lines) {
        let Ok(line) = line else { return };
        if line.is_blank() {
            continue;
        }
        if let Ok(segments) = line.text.and_then(|t| format.parse_segments(&t)) {
            rows.push(segments);
        }
    }
    let limit = LengthLimit {
        max_len: [None, Some(1), Some(7), Some(64)][knob(1) % 4],
        truncation: [
            Truncation::Error,
            Truncation::PromptLeft,
            Truncation::OutputRight,
        ][knob(2) % 3],
    };
    let Ok(ragged) = tokenize_rows(&rows, tokenizer(), limit) else {
        return;
    };
    let spec = CollateSpec {
        pad_id: Some(knob(3) as u32),
        max_len: limit.max_len,
        truncation: limit.truncation,
        pad_to_multiple_of: [None, Some(1), Some(8), Some(3)][knob(4) % 4],
        label_format: [LabelFormat::Pad, LabelFormat::IGNORE_INDEX][knob(5) % 2],
        id_dtype: [IdDtype::I32, IdDtype::I64][knob(6) % 2],
        attention_mask: knob(7) % 2 == 1,
    };
    let batch = cpu::collate(&ragged, &spec).expect("a tokenized batch collates");
    assert_eq!(batch.stats.rows, ragged.rows());
    let _ = cpu::collate_pack(&ragged, &spec);
    let lens: Vec<usize> = (0..ragged.rows()).map(|i| ragged.row_len(i)).collect();
    let order = bucket_order(&lens, knob(8) + 1, knob(9) as u64);
    assert_eq!(order.len(), lens.len());
    for strategy in [
        PackStrategy::ExactFill,
        PackStrategy::BestFitDecreasing,
        PackStrategy::FirstFitDecreasing,
        PackStrategy::Greedy,
    ] {
        let pack = PackSpec {
            max_tokens: 2 + knob(10) % 64,
            strategy,
            overflow: [Overflow::Error, Overflow::Truncate, Overflow::Split][knob(11) % 3],
        };
        let mut documents = RaggedBatch::new();
        let mut fits = true;
        for i in 0..ragged.rows() {
            match pack.fit_row(&ragged, i, spec.truncation) {
                Ok(pieces) => {
                    for segments in pieces {
                        let refs: Vec<(&[u32], bool)> =
                            segments.iter().map(|(t, f)| (t.as_slice(), *f)).collect();
                        documents.push_segments(&refs);
                    }
                }
                Err(_) => fits = false,
            }
        }
        if !fits {
            continue;
        }
        let doc_lens: Vec<usize> = (0..documents.rows())
            .map(|d| documents.row_len(d))
            .collect();
        let packs = plan_packs(&doc_lens, &pack).expect("every document fits");
        for docs in packs {
            let used: usize = docs.iter().map(|&d| doc_lens[d]).sum();
            assert!(used <= pack.max_tokens);
            cpu::collate_pack(&documents.select(&docs), &spec).expect("a pack collates");
        }
    }
});
