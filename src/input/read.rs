//! JSONL read in chunks of rows: what the dataset job and the token store both read text through. Bad
//! lines stop the read, or are skipped and counted.

use std::io::BufReader;
use std::sync::atomic::Ordering;

use super::jsonl::Lines;
use super::{RowFormat, Segment, Source};
use crate::{Error, Result};

/// At most this many bad lines are recorded with their reasons (all are counted).
pub const MAX_RECORDED_BAD_LINES: usize = 100;

/// A skipped line and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

/// Rows read, not yet tokenized.
#[derive(Debug, Default)]
pub struct RowChunk {
    /// Each row's segments: a (prompt, output) pair or a conversation's messages.
    pub rows: Vec<Vec<Segment>>,
    /// Each row's line number (from 1).
    pub lines: Vec<usize>,
    /// Input bytes consumed once this chunk was complete.
    pub bytes_read: u64,
}

/// What a read skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadReport {
    pub skipped: usize,
    pub recorded: Vec<BadLine>,
}

/// Read `input`'s rows of `format`, handing chunks of `chunk_rows` rows to `sink` (which returns false to
/// stop the read early). A bad line is an error naming the input and the line, unless `skip_bad_lines`;
/// blank lines hold no row.
pub fn read_rows(
    input: Source,
    format: &RowFormat,
    skip_bad_lines: bool,
    chunk_rows: usize,
    mut sink: impl FnMut(RowChunk) -> bool,
) -> Result<ReadReport> {
    // Rows are not preallocated past this (a huge batch size must not allocate up front).
    const MAX_PREALLOCATED_ROWS: usize = 4096;
    let chunk_rows = chunk_rows.max(1);
    let mut report = ReadReport::default();
    let new_chunk = || RowChunk {
        rows: Vec::with_capacity(chunk_rows.min(MAX_PREALLOCATED_ROWS)),
        lines: Vec::with_capacity(chunk_rows.min(MAX_PREALLOCATED_ROWS)),
        bytes_read: 0,
    };
    let mut chunk = new_chunk();
    let mut bytes_read = 0;
    let Source {
        name,
        reader,
        consumed,
        ..
    } = input;
    let input_name = name.as_str();
    for line in Lines::new(BufReader::with_capacity(1 << 20, reader)) {
        let line = line.map_err(|e| Error::io(input_name, e))?;
        // A table's progress is in the file's bytes, not in those of the JSON text its rows became.
        bytes_read = consumed
            .as_ref()
            .map_or(line.bytes_read, |c| c.load(Ordering::Relaxed));
        if line.is_blank() {
            continue; // Blank lines (a trailing newline, say) hold no row.
        }
        let parsed = line
            .text
            .and_then(|text| format.parse_segments(&text))
            .map_err(|reason| Error::BadInput {
                path: input_name.to_string(),
                line: line.number,
                reason,
            });
        match parsed {
            Ok(segments) => {
                chunk.rows.push(segments);
                chunk.lines.push(line.number);
            }
            Err(Error::BadInput { line, reason, .. }) if skip_bad_lines => {
                report.skipped += 1;
                if report.recorded.len() < MAX_RECORDED_BAD_LINES {
                    report.recorded.push(BadLine { line, reason });
                }
            }
            Err(e) => return Err(e),
        }
        if chunk.rows.len() == chunk_rows {
            chunk.bytes_read = bytes_read;
            if !sink(std::mem::replace(&mut chunk, new_chunk())) {
                return Ok(report);
            }
        }
    }
    if !chunk.rows.is_empty() {
        chunk.bytes_read = bytes_read;
        sink(chunk);
    }
    Ok(report)
}
