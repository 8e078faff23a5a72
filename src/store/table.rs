//! A shard's Arrow IPC file: the schema, the writer, and the checked, zero-copy reading of its record
//! batches from a memory map.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{UInt32Type, UInt64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, ListArray, RecordBatch, UInt32Array, UInt64Array,
};
use arrow_buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_ipc::reader::{read_footer_length, FileDecoder};
use arrow_ipc::writer::FileWriter;
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::{store_error, Shard, TokenizerInfo};
use crate::input::FormatInfo;
use crate::{Error, RaggedBatch, Result};

/// Schema metadata key holding the shard's description (for readers that see only the file).
const METADATA_KEY: &str = "sft_collate_store";

fn item(data_type: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", data_type, false))
}

/// The columns of every shard.
pub(super) fn schema() -> Schema {
    Schema::new(vec![
        Field::new("input_ids", DataType::List(item(DataType::UInt32)), false),
        Field::new("prompt_len", DataType::UInt32, false),
        Field::new("trainable", DataType::List(item(DataType::Boolean)), true),
        Field::new("source_row", DataType::UInt64, false),
    ])
}

/// What a finished file holds.
pub(super) struct Counts {
    pub rows: usize,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub max_row_len: usize,
}

pub(super) struct Writer {
    writer: FileWriter<BufWriter<File>>,
    path: PathBuf,
    schema: SchemaRef,
    counts: Counts,
}

fn arrow_err(path: &Path, e: impl std::fmt::Display) -> Error {
    store_error(path, e.to_string())
}

impl Writer {
    pub fn create(
        path: &Path,
        shard: &Shard,
        tokenizer: &TokenizerInfo,
        text: &FormatInfo,
    ) -> Result<Self> {
        let description = serde_json::json!({
            "format": super::FORMAT, "shard": shard, "tokenizer": tokenizer, "text": text,
        });
        let schema = Arc::new(
            schema().with_metadata([(METADATA_KEY.to_string(), description.to_string())].into()),
        );
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let writer = FileWriter::try_new(BufWriter::with_capacity(1 << 20, file), &schema)
            .map_err(|e| arrow_err(path, e))?;
        Ok(Writer {
            writer,
            path: path.to_path_buf(),
            schema,
            counts: Counts {
                rows: 0,
                tokens: 0,
                trained_tokens: 0,
                max_row_len: 0,
            },
        })
    }

    /// Append the rows of `ragged` (untruncated), `pairs[r]` saying which are (prompt, output) pairs
    /// (stored without flags), `source[r]` their input lines. Rows go in record batches of at most
    /// 2^31 - 1 tokens (list offsets are i32, what every Arrow reader takes).
    pub fn write(&mut self, ragged: &RaggedBatch, pairs: &[bool], source: &[u64]) -> Result<()> {
        let mut start = 0;
        while start < ragged.rows() {
            let base = ragged.row_offsets()[start];
            let mut end = start;
            while end < ragged.rows() && ragged.row_offsets()[end + 1] - base <= i32::MAX as u64 {
                end += 1;
            }
            if end == start {
                return Err(store_error(
                    &self.path,
                    format!(
                        "row from input line {} has over 2^31 tokens",
                        source[start] + 1
                    ),
                ));
            }
            let batch = self.record_batch(ragged, pairs, source, start..end)?;
            self.writer
                .write(&batch)
                .map_err(|e| arrow_err(&self.path, e))?;
            start = end;
        }
        Ok(())
    }

    fn record_batch(
        &mut self,
        ragged: &RaggedBatch,
        pairs: &[bool],
        source: &[u64],
        rows: std::ops::Range<usize>,
    ) -> Result<RecordBatch> {
        let offsets = ragged.row_offsets();
        let base = offsets[rows.start];
        let tokens = &ragged.tokens()[base as usize..offsets[rows.end] as usize];
        let row_offsets: Vec<i32> = offsets[rows.start..=rows.end]
            .iter()
            .map(|&o| (o - base) as i32)
            .collect();
        let input_ids = ListArray::new(
            item(DataType::UInt32),
            OffsetBuffer::new(ScalarBuffer::from(row_offsets)),
            Arc::new(UInt32Array::from(tokens.to_vec())),
            None,
        );
        let prompt_len = UInt32Array::from(ragged.prompt_lens()[rows.clone()].to_vec());
        // Flags only for rows that are not pairs; a pair's list is null (and empty).
        let mut flag_offsets = vec![0i32];
        let mut flags: Vec<bool> = Vec::new();
        let mut valid = Vec::with_capacity(rows.len());
        for r in rows.clone() {
            if !pairs[r] {
                let trained = ragged.trainable_in_row(r);
                flags.extend((0..ragged.row_len(r)).map(trained));
            }
            valid.push(!pairs[r]);
            flag_offsets.push(flags.len() as i32);
        }
        let trainable = ListArray::new(
            item(DataType::Boolean),
            OffsetBuffer::new(ScalarBuffer::from(flag_offsets)),
            Arc::new(BooleanArray::from(flags)),
            Some(NullBuffer::from(valid)),
        );
        let source_row = UInt64Array::from(source[rows.clone()].to_vec());
        for r in rows.clone() {
            let len = ragged.row_len(r);
            let trained = ragged.trainable_in_row(r);
            // A token is a label when it is trained and not the row's first.
            self.counts.trained_tokens += (1..len).filter(|&k| trained(k)).count() as u64;
            self.counts.max_row_len = self.counts.max_row_len.max(len);
        }
        self.counts.rows += rows.len();
        self.counts.tokens += tokens.len() as u64;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(input_ids),
            Arc::new(prompt_len),
            Arc::new(trainable),
            Arc::new(source_row),
        ];
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| arrow_err(&self.path, e))
    }

    pub fn finish(mut self) -> Result<Counts> {
        self.writer.finish().map_err(|e| arrow_err(&self.path, e))?;
        let inner = self
            .writer
            .into_inner()
            .map_err(|e| arrow_err(&self.path, e))?;
        let file = inner
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.counts)
    }
}

/// One record batch's columns, checked and typed, over the mapped file.
pub(super) struct Columns {
    pub offsets: OffsetBuffer<i32>,
    pub tokens: ScalarBuffer<u32>,
    pub prompt_len: ScalarBuffer<u32>,
    /// Per row: `None` for a pair, else the flags.
    pub trainable: ListArray,
    pub source_row: ScalarBuffer<u64>,
}

impl Columns {
    pub fn rows(&self) -> usize {
        self.prompt_len.len()
    }

    pub fn row(&self, r: usize) -> &[u32] {
        let (s, e) = (self.offsets[r] as usize, self.offsets[r + 1] as usize);
        &self.tokens[s..e]
    }

    /// The row's flags, when it is not a pair.
    pub fn flags(&self, r: usize) -> Option<Vec<bool>> {
        if self.trainable.is_null(r) {
            return None;
        }
        let list = self.trainable.value(r);
        let flags = list.as_boolean();
        Some((0..flags.len()).map(|k| flags.value(k)).collect())
    }
}

/// Map `path` and decode its record batches (zero-copy where aligned, every array validated), checking
/// the schema and each row's consistency, so that a damaged or foreign file is an error, never a wrong
/// read.
pub(super) fn read_file(path: &Path) -> Result<Vec<Columns>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
    if len < 10 + 8 {
        return Err(store_error(path, "too short to be an Arrow IPC file"));
    }
    // SAFETY: store files are written once under a temporary name and renamed into place, never
    // modified after; the mapping lives as long as the buffers made from it (the Buffer owns it).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let ptr = NonNull::new(map.as_ptr() as *mut u8).expect("a mapping is never null");
    // SAFETY: `ptr` is valid for `len` bytes for as long as `map`, which the buffer keeps alive.
    let buffer = unsafe { Buffer::from_custom_allocation(ptr, len, Arc::new(map)) };
    let bad = |reason: String| store_error(path, reason);
    if &buffer[..6] != b"ARROW1" {
        return Err(bad("not an Arrow IPC file (no ARROW1 magic)".into()));
    }
    let trailer = len - 10;
    let footer_len = read_footer_length(buffer[trailer..].try_into().expect("10 bytes"))
        .map_err(|e| bad(e.to_string()))?;
    if footer_len > trailer {
        return Err(bad("footer longer than the file".into()));
    }
    let footer = arrow_ipc::root_as_footer(&buffer[trailer - footer_len..trailer])
        .map_err(|e| bad(format!("footer: {e}")))?;
    let fb_schema = footer
        .schema()
        .ok_or_else(|| bad("no schema in the footer".into()))?;
    // A damaged type id in the schema is `unimplemented!()` in Arrow's converter: this file's error too.
    let file_schema = std::panic::catch_unwind(|| arrow_ipc::convert::fb_to_schema(fb_schema))
        .map_err(|_| bad("a schema that does not decode (the file is damaged)".into()))?;
    let expected = schema();
    if file_schema.fields() != expected.fields() {
        return Err(bad(format!(
            "columns {:?}, not the store's {:?}",
            file_schema
                .fields()
                .iter()
                .map(|f| (f.name(), f.data_type()))
                .collect::<Vec<_>>(),
            expected
                .fields()
                .iter()
                .map(|f| (f.name(), f.data_type()))
                .collect::<Vec<_>>()
        )));
    }
    let decoder = FileDecoder::new(Arc::new(file_schema), footer.version());
    let mut out = Vec::new();
    for block in footer.recordBatches().into_iter().flatten() {
        let start =
            usize::try_from(block.offset()).map_err(|_| bad("negative block offset".into()))?;
        let block_len = block.bodyLength() as usize + block.metaDataLength() as usize;
        if start.checked_add(block_len).is_none_or(|end| end > trailer) {
            return Err(bad("a record batch past the end of the file".into()));
        }
        let data = buffer.slice_with_length(start, block_len);
        // Arrow's decoder validates what it builds, but some damaged lengths make it panic before
        // that: a panic while decoding is this file's error, like any other.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let batch = decoder
                .read_record_batch(block, &data)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "an empty record batch block".to_string())?;
            columns(&batch)
        }))
        .unwrap_or_else(|_| {
            Err("a record batch that does not decode (the file is damaged)".into())
        });
        out.push(decoded.map_err(bad)?);
    }
    Ok(out)
}

fn columns(batch: &RecordBatch) -> std::result::Result<Columns, String> {
    let no_nulls = |name: &str, a: &dyn Array| {
        if a.null_count() > 0 {
            Err(format!("column {name} has nulls"))
        } else {
            Ok(())
        }
    };
    let input_ids = batch.column(0).as_list::<i32>();
    no_nulls("input_ids", input_ids)?;
    let values = input_ids.values().as_primitive::<UInt32Type>();
    no_nulls("input_ids values", values)?;
    let prompt_len = batch.column(1).as_primitive::<UInt32Type>();
    no_nulls("prompt_len", prompt_len)?;
    let trainable = batch.column(2).as_list::<i32>().clone();
    let source_row = batch.column(3).as_primitive::<UInt64Type>();
    no_nulls("source_row", source_row)?;
    // The lists start at the values' start (the writer never slices), so offsets index `tokens`.
    let offsets = input_ids.offsets().clone();
    let first = offsets.first().copied().unwrap_or(0) as usize;
    let tokens = values.values().clone();
    let columns = Columns {
        offsets,
        tokens,
        prompt_len: prompt_len.values().clone(),
        trainable,
        source_row: source_row.values().clone(),
    };
    if first != 0 {
        return Err("input_ids lists do not start at their values' start".into());
    }
    for r in 0..columns.rows() {
        let len = columns.row(r).len();
        if columns.prompt_len[r] as usize > len {
            return Err(format!(
                "row from input line {}: prompt_len {} > its {len} tokens",
                columns.source_row[r] + 1,
                columns.prompt_len[r]
            ));
        }
        if !columns.trainable.is_null(r) && columns.trainable.value_length(r) as usize != len {
            return Err(format!(
                "row from input line {}: {} trainable flags for {len} tokens",
                columns.source_row[r] + 1,
                columns.trainable.value_length(r)
            ));
        }
    }
    Ok(columns)
}
