//! Where rows come from: a JSONL file (or standard input), or a table as the data ecosystem stores one
//! (a Parquet file as the Hugging Face Hub serves datasets, an Arrow IPC file or stream as `datasets`
//! caches and `save_to_disk` write them, Polars, DuckDB or Spark). The format is told by the file's first
//! bytes, not its name.
//!
//! A table's rows are read batch by batch, only the columns the [`RowFormat`] names (a dataset's image
//! or audio columns are never read), and each row is handed on as one JSON object per line, so every
//! row format (keys, templates, conversations), bad-row handling and sharding is the JSONL path's, and
//! a row's "line" is its row number from 1.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, Schema};

use super::RowFormat;
use crate::{Error, Result};

/// The kinds of input a [`Source`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// One JSON object per line.
    Jsonl,
    /// A Parquet file.
    Parquet,
    /// An Arrow IPC file (`ARROW1` magic; Feather v2).
    ArrowFile,
    /// An Arrow IPC stream (what `datasets` writes as `.arrow`).
    ArrowStream,
}

impl InputFormat {
    /// Told from a file's first bytes (at least 6 when the file has them).
    pub fn sniff(head: &[u8]) -> InputFormat {
        if head.starts_with(b"PAR1") {
            InputFormat::Parquet
        } else if head.starts_with(b"ARROW1") {
            InputFormat::ArrowFile
        } else if head.starts_with(&[0xff, 0xff, 0xff, 0xff]) {
            // An IPC message's continuation marker: no JSONL starts with it (0xff is never UTF-8).
            InputFormat::ArrowStream
        } else {
            InputFormat::Jsonl
        }
    }
}

/// An opened input: its rows as JSONL text, with its name and size for messages and progress.
pub struct Source {
    /// The name errors give (the path, or `-`).
    pub name: String,
    pub format: InputFormat,
    /// The input's size in bytes, when known (progress).
    pub size: Option<u64>,
    pub(super) reader: Box<dyn Read + Send>,
    /// For a table: how far into the file the rows handed on so far reach, in the file's bytes (the JSON
    /// text's own byte count would not be the file's).
    pub(super) consumed: Option<Arc<AtomicU64>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Rows handed on per table batch.
const BATCH_ROWS: usize = 1024;

impl Source {
    /// The rows as JSONL text.
    pub fn into_reader(self) -> Box<dyn Read + Send> {
        self.reader
    }

    /// JSONL from any reader.
    pub fn jsonl(name: &str, size: Option<u64>, reader: Box<dyn Read + Send>) -> Source {
        Source {
            name: name.to_string(),
            format: InputFormat::Jsonl,
            size,
            reader,
            consumed: None,
        }
    }

    /// Open `path` (`-`: standard input) for rows of `format`. A Parquet or Arrow table is read for the
    /// columns `format` uses; one that lacks them is an error naming the columns it has. An Arrow IPC
    /// stream can come through a pipe; Parquet and the Arrow IPC file format need a regular file.
    pub fn open(path: &Path, format: &RowFormat) -> Result<Source> {
        if path.as_os_str() == "-" {
            let mut stdin = std::io::stdin();
            let head = read_head(&mut stdin).map_err(|e| Error::io(path, e))?;
            let reader = Box::new(Cursor::new(head.clone()).chain(stdin));
            return Source::from_stream("-".into(), None, &head, reader, format);
        }
        let name = path.display().to_string();
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let head = read_head(&mut file).map_err(|e| Error::io(path, e))?;
        let kind = InputFormat::sniff(&head);
        if !meta.is_file() {
            // A pipe or device cannot seek back: the bytes already read go back in front.
            let reader = Box::new(Cursor::new(head.clone()).chain(file));
            return Source::from_stream(name, None, &head, reader, format);
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let size = Some(meta.len());
        let bad = |what: &str, e: &dyn std::fmt::Display| Error::Input {
            path: name.clone(),
            reason: format!("not a readable {what}: {e}"),
        };
        let consumed = Arc::new(AtomicU64::new(0));
        let reader: Box<dyn Read + Send> = match kind {
            InputFormat::Jsonl | InputFormat::ArrowStream => {
                return Source::from_stream(name, size, &head, Box::new(file), format)
            }
            InputFormat::Parquet => {
                use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
                use parquet::arrow::ProjectionMask;
                let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| bad("Parquet file", &e))?;
                let columns =
                    columns_used(builder.schema(), format).map_err(|reason| Error::Input {
                        path: name.clone(),
                        reason,
                    })?;
                let rows = builder.metadata().file_metadata().num_rows().max(1) as f64;
                let mask = ProjectionMask::roots(builder.parquet_schema(), columns);
                let batches = builder
                    .with_projection(mask)
                    .with_batch_size(BATCH_ROWS)
                    .build()
                    .map_err(|e| bad("Parquet file", &e))?;
                // Progress pro rata by rows: the file is not read front to back.
                let file_size = meta.len();
                let counter = consumed.clone();
                let mut done = 0u64;
                Box::new(JsonRows::new(batches.map(move |batch| {
                    let batch = batch?;
                    done += batch.num_rows() as u64;
                    let at = (file_size as f64 * done as f64 / rows) as u64;
                    counter.store(at.min(file_size), Ordering::Relaxed);
                    Ok(batch)
                })))
            }
            InputFormat::ArrowFile => {
                let batches = arrow_ipc::reader::FileReader::try_new(
                    Counted::new(file, consumed.clone()),
                    None,
                )
                .map_err(|e| bad("Arrow IPC file", &e))?;
                let columns =
                    columns_used(&batches.schema(), format).map_err(|reason| Error::Input {
                        path: name.clone(),
                        reason,
                    })?;
                Box::new(JsonRows::new(projected(batches, columns)))
            }
        };
        Ok(Source {
            name,
            format: kind,
            size,
            reader,
            consumed: Some(consumed),
        })
    }

    /// A source read front to back (a pipe, standard input, or a JSONL or Arrow IPC stream file), whose
    /// first bytes are `head`; `reader` reads from the start.
    fn from_stream(
        name: String,
        size: Option<u64>,
        head: &[u8],
        reader: Box<dyn Read + Send>,
        format: &RowFormat,
    ) -> Result<Source> {
        let kind = InputFormat::sniff(head);
        let error = |reason: String| Error::Input {
            path: name.clone(),
            reason,
        };
        match kind {
            InputFormat::Jsonl => Ok(Source::jsonl(&name, size, reader)),
            InputFormat::Parquet | InputFormat::ArrowFile => Err(error(format!(
                "{} is read from a regular file, not a pipe or device (its index is at its end)",
                if kind == InputFormat::Parquet {
                    "a Parquet file"
                } else {
                    "an Arrow IPC file"
                }
            ))),
            InputFormat::ArrowStream => {
                let consumed = Arc::new(AtomicU64::new(0));
                let batches = arrow_ipc::reader::StreamReader::try_new(
                    Counted::new(reader, consumed.clone()),
                    None,
                )
                .map_err(|e| error(format!("not a readable Arrow IPC stream: {e}")))?;
                let columns = columns_used(&batches.schema(), format).map_err(error)?;
                Ok(Source {
                    name,
                    format: kind,
                    size,
                    reader: Box::new(JsonRows::new(projected(batches, columns))),
                    consumed: Some(consumed),
                })
            }
        }
    }
}

/// Up to the first 8 bytes of `reader` (fewer when it ends first).
fn read_head(reader: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(8);
    reader.take(8).read_to_end(&mut head)?;
    Ok(head)
}

/// The indices of `schema`'s columns that `format` reads. When neither a conversation column nor every
/// column of a (prompt, output) pair is there, no row could be read: an error naming what is missing and
/// the columns there are.
fn columns_used(schema: &Schema, format: &RowFormat) -> std::result::Result<Vec<usize>, String> {
    let mut pair: Vec<(&str, &str)> = Vec::new();
    match &format.template {
        Some(template) => pair.extend(template.fields().map(|f| (f, "a template field"))),
        None => pair.push((&format.prompt_key, "the prompt key")),
    }
    pair.push((&format.output_key, "the output key"));
    let messages = format.messages.as_ref().map(|m| m.key.as_str());
    let has = |name: &str| schema.fields().iter().any(|f| f.name() == name);
    let missing: Vec<&(&str, &str)> = pair.iter().filter(|(name, _)| !has(name)).collect();
    if !missing.is_empty() && !messages.is_some_and(has) {
        let names: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| format!("{:?}", f.name()))
            .collect();
        let missing: Vec<String> = missing
            .iter()
            .map(|(name, role)| format!("{name:?} ({role})"))
            .collect();
        let conversations = messages
            .map(|key| format!(" and no conversation column {key:?}"))
            .unwrap_or_default();
        return Err(format!(
            "no column {}{conversations}; its columns are {}",
            missing.join(", "),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ));
    }
    let wanted: BTreeSet<&str> = pair.iter().map(|(n, _)| *n).chain(messages).collect();
    Ok(schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| wanted.contains(f.name().as_str()))
        .map(|(i, _)| i)
        .collect())
}

/// The batches with only `columns` (in the schema's order).
fn projected(
    batches: impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>>,
    columns: Vec<usize>,
) -> impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>> {
    batches.map(move |batch| batch?.project(&columns))
}

/// A reader that counts the bytes read through it into a shared counter.
struct Counted<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R> Counted<R> {
    fn new(inner: R, count: Arc<AtomicU64>) -> Self {
        count.store(0, Ordering::Relaxed);
        Counted { inner, count }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<R: Seek> Seek for Counted<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let at = self.inner.seek(pos)?;
        self.count.store(at, Ordering::Relaxed);
        Ok(at)
    }
}

/// Record batches as JSON lines, one object per row (nulls written as `null`, so that a null field is
/// "not a string", not "missing").
struct JsonRows<I> {
    batches: I,
    text: Vec<u8>,
    at: usize,
    /// Rows handed on so far.
    rows: u64,
}

impl<I> JsonRows<I> {
    fn new(batches: I) -> Self {
        JsonRows {
            batches,
            text: Vec::new(),
            at: 0,
            rows: 0,
        }
    }
}

impl<I: Iterator<Item = std::result::Result<RecordBatch, ArrowError>>> Read for JsonRows<I> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.text.len() {
            let Some(batch) = self.batches.next() else {
                return Ok(0);
            };
            let rows = self.rows;
            let unreadable = |e: ArrowError| {
                std::io::Error::other(format!(
                    "the rows after row {rows} cannot be read (a damaged or truncated file?): {e}"
                ))
            };
            let batch = batch.map_err(unreadable)?;
            self.rows += batch.num_rows() as u64;
            self.text.clear();
            self.at = 0;
            let mut writer = arrow_json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow_json::writer::LineDelimited>(&mut self.text);
            writer
                .write(&batch)
                .and_then(|()| writer.finish())
                .map_err(unreadable)?;
        }
        let n = buf.len().min(self.text.len() - self.at);
        buf[..n].copy_from_slice(&self.text[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
