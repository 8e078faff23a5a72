//! Where rows come from: a JSONL file (or standard input), a JSON array of rows (Alpaca's
//! `alpaca_data.json`), or a table as the data ecosystem stores one (a Parquet file as the Hugging Face
//! Hub serves datasets, an Arrow IPC file or stream as `datasets` caches and `save_to_disk` write them,
//! Polars, DuckDB or Spark); JSONL, JSON and Arrow streams also gzip- or zstd-compressed as a whole. The
//! format is told by the file's first bytes, not its name.
//!
//! A JSON array's elements are handed on one per line, so element `n` (from 1) is line `n`.
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

use super::jsonl::MAX_LINE_BYTES;
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
    /// One JSON array of objects (Alpaca's `alpaca_data.json`, ShareGPT dumps, `json.dump(rows)`).
    JsonArray,
}

impl InputFormat {
    /// Told from a file's first bytes (up to 64, fewer when the file has fewer), decompressed.
    pub fn sniff(head: &[u8]) -> InputFormat {
        let text = head.strip_prefix(BOM).unwrap_or(head);
        if text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            InputFormat::JsonArray
        } else if head.starts_with(b"PAR1") {
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

/// A UTF-8 byte order mark.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// How a file is compressed as a whole (`train.jsonl.gz`, `train.jsonl.zst`), told by its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// A decoder whose errors say that the compressed data is damaged or cut short (the decoders' own
/// words, "incomplete frame", do not say which file format is meant).
struct Damaged {
    inner: Box<dyn Read + Send>,
    compression: Compression,
}

impl Read for Damaged {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            std::io::Error::other(format!(
                "the {} data is damaged or cut short ({e})",
                self.compression
            ))
        })
    }
}

impl Compression {
    pub fn sniff(head: &[u8]) -> Option<Compression> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else {
            None
        }
    }
}

/// An opened input: its rows as JSONL text, with its name and size for messages and progress.
pub struct Source {
    /// The name errors give (the path, or `-`).
    pub name: String,
    pub format: InputFormat,
    /// How the file is compressed as a whole, if it is.
    pub compression: Option<Compression>,
    /// The input's size in bytes, when known (progress).
    pub size: Option<u64>,
    pub(super) reader: Box<dyn Read + Send>,
    /// For a table, a JSON array or a compressed file: how far into the file the rows handed on so far
    /// reach, in the file's bytes (the JSON lines' own byte count would not be the file's).
    pub(super) consumed: Option<Arc<AtomicU64>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("compression", &self.compression)
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

    /// A source whose progress is `consumed`, the count of the file's bytes behind the rows handed on.
    fn counted(
        name: String,
        format: InputFormat,
        size: Option<u64>,
        reader: Box<dyn Read + Send>,
        consumed: Arc<AtomicU64>,
    ) -> Source {
        Source {
            name,
            format,
            compression: None,
            size,
            reader,
            consumed: Some(consumed),
        }
    }

    /// JSONL from any reader.
    pub fn jsonl(name: &str, size: Option<u64>, reader: Box<dyn Read + Send>) -> Source {
        Source {
            name: name.to_string(),
            format: InputFormat::Jsonl,
            compression: None,
            size,
            reader,
            consumed: None,
        }
    }

    /// Open `path` (`-`: standard input) for rows of `format`, its format and compression told by its
    /// first bytes. A Parquet or Arrow table is read for the columns `format` uses; one that lacks them
    /// is an error naming the columns it has. Parquet and the Arrow IPC file format need a regular,
    /// uncompressed file; the other formats can also come through a pipe.
    pub fn open(path: &Path, format: &RowFormat) -> Result<Source> {
        if path.is_dir() {
            return Source::open_dir(path, format);
        }
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
        let size = meta.is_file().then_some(meta.len());
        if !meta.is_file() || Compression::sniff(&head).is_some() {
            // A pipe or device cannot seek back: the bytes already read go back in front.
            let reader = Box::new(Cursor::new(head.clone()).chain(file));
            return Source::from_stream(name, size, &head, reader, format);
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let input_error = |reason: String| Error::Input {
            path: name.clone(),
            reason,
        };
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            input_error(format!("not a readable {what}: {e}"))
        };
        let consumed = Arc::new(AtomicU64::new(0));
        let reader: Box<dyn Read + Send> = match kind {
            InputFormat::Jsonl | InputFormat::ArrowStream | InputFormat::JsonArray => {
                return Source::from_stream(name, size, &head, Box::new(file), format)
            }
            InputFormat::ArrowFile => {
                check_ipc_index(&mut file, meta.len()).map_err(|e| bad("Arrow IPC file", &e))?;
                let counted = Counted::new(file, consumed.clone());
                let batches = unpanicked(|| arrow_ipc::reader::FileReader::try_new(counted, None))
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|e| bad("Arrow IPC file", &e))?;
                let columns = columns_used(&batches.schema(), format).map_err(input_error)?;
                Box::new(JsonRows::new(projected(batches, columns)))
            }
            InputFormat::Parquet => {
                use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
                use parquet::arrow::ProjectionMask;
                let builder = unpanicked(|| ParquetRecordBatchReaderBuilder::try_new(file))
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|e| bad("Parquet file", &e))?;
                let columns = columns_used(builder.schema(), format).map_err(input_error)?;
                let rows = builder.metadata().file_metadata().num_rows().max(1) as f64;
                let mask = ProjectionMask::roots(builder.parquet_schema(), columns);
                let batches = unpanicked(|| {
                    builder
                        .with_projection(mask)
                        .with_batch_size(BATCH_ROWS)
                        .build()
                })
                .and_then(|r| r.map_err(|e| e.to_string()))
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
        };
        Ok(Source::counted(name, kind, size, reader, consumed))
    }

    /// A directory of data files (what `datasets`' `save_to_disk` writes, a Hub dataset's `data/`
    /// folder of Parquet shards): its files named as data (`.parquet`, `.arrow`, `.feather`, `.ipc`,
    /// `.jsonl`, `.ndjson`, those two also `.gz`/`.zst`), in name order, as one input whose rows are
    /// numbered on from file to file. Other files (`dataset_info.json`, `state.json`) are not rows.
    fn open_dir(dir: &Path, format: &RowFormat) -> Result<Source> {
        const DATA: [&str; 10] = [
            ".parquet",
            ".arrow",
            ".feather",
            ".ipc",
            ".jsonl",
            ".ndjson",
            ".jsonl.gz",
            ".jsonl.zst",
            ".ndjson.gz",
            ".ndjson.zst",
        ];
        let name = dir.display().to_string();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let data = DATA.iter().any(|ext| file_name.ends_with(ext));
            if data && !file_name.starts_with('.') && entry.path().is_file() {
                files.push(entry.path());
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::Input {
                path: name,
                reason: format!("a directory with no data files (named {})", DATA.join(", ")),
            });
        }
        // Each file is opened (and its columns checked) now, so that a bad one fails before any row is
        // read, and again when its turn comes (a directory may hold more files than may be open).
        let mut size = Some(0u64);
        let mut first = None;
        for file in &files {
            let source = Source::open(file, format)?;
            size = size.zip(source.size).map(|(a, b)| a + b);
            first.get_or_insert((source.format, source.compression));
        }
        let (kind, compression) = first.expect("at least one file");
        let consumed = Arc::new(AtomicU64::new(0));
        Ok(Source {
            name,
            format: kind,
            compression,
            size,
            reader: Box::new(Files {
                files: files.into(),
                format: format.clone(),
                done: 0,
                current: None,
                consumed: consumed.clone(),
            }),
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
        let error = |reason: String| Error::Input {
            path: name.clone(),
            reason,
        };
        if let Some(compression) = Compression::sniff(head) {
            // Progress in the compressed file's bytes; the rows come from the decompressed text.
            let consumed = Arc::new(AtomicU64::new(0));
            let counted = Counted::new(reader, consumed.clone());
            let decoder: Box<dyn Read + Send> = match compression {
                Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
                Compression::Zstd => Box::new(
                    zstd::stream::read::Decoder::new(counted)
                        .map_err(|e| error(format!("not readable as zstd: {e}")))?,
                ),
            };
            let mut decoded = Damaged {
                inner: decoder,
                compression,
            };
            let head = read_head(&mut decoded).map_err(|e| error(e.to_string()))?;
            let decoded = Box::new(Cursor::new(head.clone()).chain(decoded));
            // The decompressed size is not known (the file's bounds no length inside it).
            let inner = Source::from_stream(name.clone(), None, &head, decoded, format)?;
            if inner.compression.is_some() {
                return Err(error("compressed twice".into()));
            }
            return Ok(Source {
                compression: Some(compression),
                size,
                consumed: Some(consumed),
                ..inner
            });
        }
        let kind = InputFormat::sniff(head);
        match kind {
            InputFormat::Jsonl => Ok(Source::jsonl(&name, size, reader)),
            InputFormat::Parquet | InputFormat::ArrowFile => Err(error(format!(
                "{} is read from a regular file, not a pipe, device or compressed file (its index is \
                 at its end)",
                if kind == InputFormat::Parquet {
                    "a Parquet file"
                } else {
                    "an Arrow IPC file"
                }
            ))),
            InputFormat::ArrowStream => {
                let consumed = Arc::new(AtomicU64::new(0));
                let checked = CheckedIpc::new(Counted::new(reader, consumed.clone()), size);
                let batches =
                    unpanicked(|| arrow_ipc::reader::StreamReader::try_new(checked, None))
                        .and_then(|r| r.map_err(|e| e.to_string()))
                        .map_err(|e| error(format!("not a readable Arrow IPC stream: {e}")))?;
                let columns = columns_used(&batches.schema(), format).map_err(error)?;
                let reader = Box::new(JsonRows::new(projected(batches, columns)));
                Ok(Source::counted(name, kind, size, reader, consumed))
            }
            InputFormat::JsonArray => {
                let consumed = Arc::new(AtomicU64::new(0));
                let mut reader = Counted::new(reader, consumed.clone());
                if head.starts_with(BOM) {
                    // serde_json reads no byte order mark.
                    reader
                        .read_exact(&mut [0; BOM.len()])
                        .map_err(|e| error(e.to_string()))?;
                }
                let reader = Box::new(ArrayLines::spawn(reader));
                Ok(Source::counted(name, kind, size, reader, consumed))
            }
        }
    }
}

/// An Arrow IPC file's index checked against the file before Arrow's reader trusts it: Arrow reads each
/// block the index lists into a buffer of the block's declared length, so a damaged length would ask for
/// hundreds of gigabytes and abort the process. Every block must lie between the magic and the index.
fn check_ipc_index(file: &mut File, len: u64) -> std::result::Result<(), String> {
    const TRAILER: u64 = 10; // The index's length (i32) and the closing magic.
    if len < 8 + TRAILER {
        return Err("too short".into());
    }
    let mut trailer = [0; TRAILER as usize];
    file.seek(SeekFrom::Start(len - TRAILER))
        .and_then(|_| file.read_exact(&mut trailer))
        .map_err(|e| e.to_string())?;
    let index_len = arrow_ipc::reader::read_footer_length(trailer)
        .map_err(|e| format!("{e} (cut short?)"))? as u64;
    let index_at = (len - TRAILER)
        .checked_sub(index_len)
        .filter(|&at| at >= 8)
        .ok_or("an index longer than the file (damaged or cut short)")?;
    let mut index = vec![0; index_len as usize];
    file.seek(SeekFrom::Start(index_at))
        .and_then(|_| file.read_exact(&mut index))
        .map_err(|e| e.to_string())?;
    let footer = arrow_ipc::root_as_footer(&index).map_err(|e| format!("its index: {e}"))?;
    let blocks = footer.recordBatches().into_iter().flatten();
    for block in blocks.chain(footer.dictionaries().into_iter().flatten()) {
        // In bounds first: the block is read next.
        let end = u64::try_from(block.offset())
            .ok()
            .zip(u64::try_from(block.metaDataLength()).ok())
            .zip(u64::try_from(block.bodyLength()).ok())
            .and_then(|((at, meta), body)| at.checked_add(meta)?.checked_add(body));
        if end.is_none_or(|end| end > index_at) || block.offset() < 8 {
            return Err(format!(
                "its index lists a block at {} of {} + {} bytes, outside the file's {index_at} bytes \
                 of data (damaged)",
                block.offset(),
                block.metaDataLength(),
                block.bodyLength()
            ));
        }
        check_block_buffers(file, block).map_err(|e| e.to_string())?;
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    Ok(())
}

/// The compressed buffers' declared uncompressed lengths of one block of an IPC file (in bounds of the
/// file: checked by the caller), checked. Arrow's reader parses the message from the whole block and
/// takes the body after the declared metadata length: when the metadata alone parses, that is the same
/// message, and only each compressed buffer's first 8 bytes are read; when it does not (a damaged
/// metadata length), the whole block is read and parsed as Arrow will.
fn check_block_buffers(file: &mut File, block: &arrow_ipc::Block) -> std::io::Result<()> {
    let (at, meta_len) = (block.offset() as u64, block.metaDataLength() as usize);
    let mut bytes = vec![0; meta_len];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut bytes)?;
    if message_of(&bytes).is_none() {
        bytes.resize(meta_len + block.bodyLength() as usize, 0);
        file.read_exact(&mut bytes[meta_len..])?;
    }
    let Some(message) = message_of(&bytes) else {
        return Ok(()); // Arrow's reader refuses it itself.
    };
    for offset in compressed_buffers(&message) {
        if offset + 8 > block.bodyLength() as u64 {
            continue; // Past the body: Arrow's reader refuses it itself.
        }
        let mut length = [0; 8];
        file.seek(SeekFrom::Start(at + meta_len as u64 + offset))?;
        file.read_exact(&mut length)?;
        check_uncompressed_length(length)?;
    }
    Ok(())
}

/// The message of an IPC block's bytes, after its prefix (the continuation marker and the length, or
/// the length alone), as Arrow's reader parses it.
fn message_of(bytes: &[u8]) -> Option<arrow_ipc::Message<'_>> {
    let skip = if bytes.get(..4) == Some(&[0xff; 4]) {
        8
    } else {
        4
    };
    arrow_ipc::root_as_message(bytes.get(skip..)?).ok()
}

/// Where a record batch (or dictionary batch) message's compressed buffers begin in its body: each
/// opens with its uncompressed length as an i64, which Arrow's decoder allocates unchecked.
fn compressed_buffers(message: &arrow_ipc::Message) -> Vec<u64> {
    let batch = message
        .header_as_record_batch()
        .or_else(|| message.header_as_dictionary_batch().and_then(|d| d.data()));
    let Some(batch) = batch.filter(|b| b.compression().is_some()) else {
        return Vec::new();
    };
    let mut offsets: Vec<u64> = batch
        .buffers()
        .into_iter()
        .flatten()
        .filter(|b| b.length() >= 8 && b.offset() >= 0)
        .map(|b| b.offset() as u64)
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    offsets
}

/// A compressed buffer's declared uncompressed length (-1: stored uncompressed) must fit in this
/// machine's memory: more is damage, and would abort the process when Arrow allocates it.
fn check_uncompressed_length(bytes: [u8; 8]) -> std::io::Result<()> {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let limit = *LIMIT.get_or_init(|| crate::io::memory_total().unwrap_or(1 << 40));
    let length = i64::from_le_bytes(bytes);
    if length == -1 || (0..=limit as i64).contains(&length) {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "a compressed buffer declares {length} bytes uncompressed, more than this machine's {} GiB \
         of memory (the file is damaged)",
        limit >> 30
    )))
}

/// Up to the first 64 bytes of `reader` (fewer when it ends first).
fn read_head(reader: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(64);
    reader.take(64).read_to_end(&mut head)?;
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

/// `f`'s value, or (when it panics) why: Arrow's and Parquet's decoders validate what they build, but
/// some damaged bytes make them panic first (an `unimplemented!()` type id, a length past a buffer). A
/// damaged input is the user's error to be told, not a crash.
fn unpanicked<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("the file is damaged (its decoder failed: {message})")
    })
}

/// The batches with only `columns` (in the schema's order).
fn projected(
    batches: impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>>,
    columns: Vec<usize>,
) -> impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>> {
    batches.map(move |batch| batch?.project(&columns))
}

/// The sources of a directory's files read one after another, each one's rows ending in a line break
/// (a JSONL file's last line may have none), with progress over all of them.
struct Files {
    files: std::collections::VecDeque<std::path::PathBuf>,
    format: RowFormat,
    /// Bytes of the files already read.
    done: u64,
    /// The file being read: its reader, its own progress, its size, and whether its last byte was a
    /// line break.
    current: Option<(Box<dyn Read + Send>, FileProgress, u64, bool)>,
    consumed: Arc<AtomicU64>,
}

/// How far into one file of a directory the reading is.
enum FileProgress {
    /// A table's, JSON array's or compressed file's own count.
    Counter(Arc<AtomicU64>),
    /// A JSONL file's bytes read so far.
    Bytes(u64),
}

impl Read for Files {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some((reader, progress, size, ended_line)) = &mut self.current else {
                let Some(path) = self.files.pop_front() else {
                    return Ok(0);
                };
                let next = Source::open(&path, &self.format)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let progress = match next.consumed {
                    Some(counter) => FileProgress::Counter(counter),
                    None => FileProgress::Bytes(0),
                };
                self.current = Some((next.reader, progress, next.size.unwrap_or(0), true));
                continue;
            };
            if buf.is_empty() {
                return Ok(0);
            }
            let n = reader.read(buf)?;
            if n == 0 {
                let missing_break = !*ended_line;
                self.done += *size;
                self.current = None;
                self.consumed.store(self.done, Ordering::Relaxed);
                if missing_break {
                    buf[0] = b'\n';
                    return Ok(1);
                }
                continue;
            }
            *ended_line = buf[n - 1] == b'\n';
            let within = match progress {
                FileProgress::Counter(counter) => counter.load(Ordering::Relaxed),
                FileProgress::Bytes(bytes) => {
                    *bytes += n as u64;
                    *bytes
                }
            };
            self.consumed
                .store(self.done + within.min(*size), Ordering::Relaxed);
            return Ok(n);
        }
    }
}

/// A reader that counts the bytes read through it into a shared counter.
struct Counted<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R> Counted<R> {
    fn new(inner: R, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<R: Seek> Seek for Counted<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let at = self.inner.seek(pos)?;
        self.count.store(at, Ordering::Relaxed);
        Ok(at)
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
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
            let rows = self.rows;
            let unreadable = |e: String| {
                std::io::Error::other(format!(
                    "the rows after row {rows} cannot be read (a damaged or truncated file?): {e}"
                ))
            };
            let batches = &mut self.batches;
            let Some(batch) = unpanicked(|| batches.next()).map_err(unreadable)? else {
                return Ok(0);
            };
            let batch = batch.map_err(|e| unreadable(e.to_string()))?;
            self.rows += batch.num_rows() as u64;
            self.text.clear();
            self.at = 0;
            let text = &mut self.text;
            unpanicked(|| {
                let mut writer = arrow_json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow_json::writer::LineDelimited>(text);
                writer.write(&batch).and_then(|()| writer.finish())
            })
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(unreadable)?;
        }
        let n = buf.len().min(self.text.len() - self.at);
        buf[..n].copy_from_slice(&self.text[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A JSON array's elements as JSON lines, one per element (a compact serialization has no raw line
/// breaks), so that element `n` (from 1) is line `n`. serde reads an array by handing each element to a
/// visitor, so a thread of its own reads it and hands the lines over; memory stays at a few elements.
struct ArrayLines {
    lines: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    text: Vec<u8>,
    at: usize,
}

impl ArrayLines {
    fn spawn(reader: impl Read + Send + 'static) -> ArrayLines {
        let (tx, rx) = std::sync::mpsc::sync_channel(256);
        std::thread::spawn(move || {
            let since = Arc::new(AtomicU64::new(0));
            let limited = ElementLimit {
                inner: reader,
                since: since.clone(),
            };
            let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(limited));
            let elements = Elements { tx: &tx, since };
            let read =
                serde::Deserializer::deserialize_seq(&mut de, elements).and_then(|()| de.end());
            if let Err(e) = read {
                let reason = match e.io_error_kind() {
                    Some(_) => e.to_string(),
                    None => format!("malformed JSON array: {e}"),
                };
                let _ = tx.send(Err(std::io::Error::other(reason)));
            }
        });
        ArrayLines {
            lines: rx,
            text: Vec::new(),
            at: 0,
        }
    }
}

impl Read for ArrayLines {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.text.len() {
            match self.lines.recv() {
                Ok(line) => {
                    self.text = line?;
                    self.at = 0;
                }
                Err(_) => return Ok(0), // The array ended.
            }
        }
        let n = buf.len().min(self.text.len() - self.at);
        buf[..n].copy_from_slice(&self.text[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The visitor that hands each element of the array on as a line.
struct Elements<'a> {
    tx: &'a std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>,
    since: Arc<AtomicU64>,
}

impl<'de> serde::de::Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of rows")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<(), A::Error> {
        while let Some(element) = seq.next_element::<serde_json::Value>()? {
            self.since.store(0, Ordering::Relaxed);
            let mut line = serde_json::to_vec(&element).expect("a JSON value serializes");
            line.push(b'\n');
            if self.tx.send(Ok(line)).is_err() {
                // The reader stopped early (it had the rows it wanted): nothing more is read.
                return Err(serde::de::Error::custom("the reader stopped"));
            }
        }
        Ok(())
    }
}

/// A reader that fails once one element runs past [`MAX_LINE_BYTES`] (`[` followed by an endless string
/// must not fill memory), counting from the end of the last element.
struct ElementLimit<R> {
    inner: R,
    since: Arc<AtomicU64>,
}

impl<R: Read> Read for ElementLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let since = self.since.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if since > MAX_LINE_BYTES as u64 {
            return Err(std::io::Error::other(format!(
                "an element of the JSON array runs past {} MiB",
                MAX_LINE_BYTES >> 20
            )));
        }
        Ok(n)
    }
}

/// The IPC stream format's framing, checked as the bytes pass on to Arrow's reader: Arrow allocates a
/// message's metadata and body by the lengths the stream declares, so one damaged length would ask for
/// hundreds of gigabytes and abort the process. A length past what the file still holds (or, with no
/// known size, past [`MAX_IPC_MESSAGE`]) fails the read that delivers it, before Arrow allocates.
struct CheckedIpc<R> {
    inner: R,
    /// Bytes the input still holds, when known.
    remaining: Option<u64>,
    state: Frame,
}

/// The most a message of a stream of unknown size may declare (4 GiB).
const MAX_IPC_MESSAGE: u64 = 4 << 30;

enum Frame {
    /// The length prefix, (`0xFFFFFFFF` and) a little-endian i32.
    Prefix { bytes: [u8; 8], got: usize },
    /// The flatbuffer metadata, whose body length is read from it.
    Meta { bytes: Vec<u8>, need: usize },
    Body {
        left: u64,
        /// Where in the body the compressed buffers' 8-byte uncompressed lengths lie (ascending), and
        /// the bytes of the next one seen so far.
        lengths: std::collections::VecDeque<u64>,
        at: u64,
        partial: Vec<u8>,
    },
    /// The end-of-stream marker, or a frame Arrow's reader will refuse itself: nothing more to check.
    Done,
}

impl<R> CheckedIpc<R> {
    fn new(inner: R, remaining: Option<u64>) -> Self {
        CheckedIpc {
            inner,
            remaining,
            state: Frame::Prefix {
                bytes: [0; 8],
                got: 0,
            },
        }
    }

    /// Check a declared length against what may follow it.
    fn check(&self, what: &str, len: u64) -> std::io::Result<()> {
        let limit = self.remaining.unwrap_or(MAX_IPC_MESSAGE);
        if len > limit {
            return Err(std::io::Error::other(format!(
                "a {what} of {len} bytes, past {} (the file is damaged or cut short)",
                match self.remaining {
                    Some(n) => format!("the {n} bytes left in the file"),
                    None => format!("the {} GiB allowed in a stream", MAX_IPC_MESSAGE >> 30),
                }
            )));
        }
        Ok(())
    }

    /// Advance the framing over `data`, which just passed, counting it off `remaining` as it goes (so a
    /// length is checked against the bytes after it).
    fn advance(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            match &mut self.state {
                Frame::Done => return Ok(()),
                Frame::Prefix { bytes, got } => {
                    let want = if *got >= 4 && bytes[..4] == [0xff; 4] {
                        8
                    } else {
                        4
                    };
                    let n = (want - *got).min(data.len());
                    bytes[*got..*got + n].copy_from_slice(&data[..n]);
                    *got += n;
                    data = &data[n..];
                    self.remaining = self.remaining.map(|r| r.saturating_sub(n as u64));
                    if *got == 4 && bytes[..4] == [0xff; 4] {
                        continue; // The length follows the continuation marker.
                    }
                    if *got < want {
                        continue;
                    }
                    let len = i32::from_le_bytes(bytes[want - 4..want].try_into().expect("4"));
                    self.state = match len {
                        0 => Frame::Done, // End of stream.
                        len if len < 0 => Frame::Done,
                        len => {
                            self.check("message header", len as u64)?;
                            Frame::Meta {
                                bytes: Vec::with_capacity((len as usize).min(1 << 16)),
                                need: len as usize,
                            }
                        }
                    };
                }
                Frame::Meta { bytes, need } => {
                    let n = (*need - bytes.len()).min(data.len());
                    bytes.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    self.remaining = self.remaining.map(|r| r.saturating_sub(n as u64));
                    if bytes.len() < *need {
                        continue;
                    }
                    let body = arrow_ipc::root_as_message(bytes)
                        .map(|m| (m.bodyLength(), compressed_buffers(&m)));
                    self.state = match body {
                        Ok((len, lengths)) if len >= 0 => {
                            self.check("message body", len as u64)?;
                            Frame::Body {
                                left: len as u64,
                                lengths: lengths.into(),
                                at: 0,
                                partial: Vec::with_capacity(8),
                            }
                        }
                        _ => Frame::Done,
                    };
                }
                Frame::Body {
                    left,
                    lengths,
                    at,
                    partial,
                } => {
                    let n = (*left).min(data.len() as u64);
                    // The compressed buffers' declared lengths that lie in these bytes.
                    let end = *at + n;
                    while let Some(&start) = lengths.front() {
                        let from = start + partial.len() as u64;
                        if from >= end {
                            break;
                        }
                        let take = (start + 8).min(end) - from;
                        let i = (from - *at) as usize;
                        partial.extend_from_slice(&data[i..i + take as usize]);
                        if partial.len() == 8 {
                            check_uncompressed_length(partial[..].try_into().expect("8"))?;
                            partial.clear();
                            lengths.pop_front();
                        }
                    }
                    *at = end;
                    *left -= n;
                    data = &data[n as usize..];
                    self.remaining = self.remaining.map(|r| r.saturating_sub(n));
                    if *left == 0 {
                        self.state = Frame::Prefix {
                            bytes: [0; 8],
                            got: 0,
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for CheckedIpc<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.advance(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_their_first_bytes() {
        for (head, format) in [
            (&b"{\"prompt\": 1}"[..], InputFormat::Jsonl),
            (b"", InputFormat::Jsonl),
            (b"PAR1\x15\x04", InputFormat::Parquet),
            (b"ARROW1\0\0", InputFormat::ArrowFile),
            (b"\xff\xff\xff\xff\x10\0", InputFormat::ArrowStream),
            (b"[{", InputFormat::JsonArray),
            (b"\xef\xbb\xbf\n  [", InputFormat::JsonArray),
            (b"  \n\t[", InputFormat::JsonArray),
            (b"\xef\xbb\xbf{", InputFormat::Jsonl),
        ] {
            assert_eq!(InputFormat::sniff(head), format, "{head:?}");
        }
        assert_eq!(Compression::sniff(b"\x1f\x8b\x08"), Some(Compression::Gzip));
        assert_eq!(
            Compression::sniff(b"\x28\xb5\x2f\xfd"),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::sniff(b"{\"a\""), None);
    }
}
