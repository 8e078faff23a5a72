//! Export a token store to what large-scale trainers read: Megatron-Bridge's packed-sequence Parquet
//! (`GPTSFTPackedParquetDataset`).
//!
//! Each Parquet row is one pack: `input_ids` (`list<int32>`: its documents' tokens one after another),
//! `seq_start_id` (`list<int32>`: where each document starts) and `loss_mask` (`list<int8>`, one per token).
//! Megatron-Bridge cuts every document `d = input_ids[s..e]` into inputs `d[..-1]`, labels `d[1..]` and
//! the mask `loss_mask[s..e-1]`, so the stored mask is already shifted onto the labels: `loss_mask[s+k]`
//! is 1 when token `k + 1` of the document is trained (an output token), and the document's last entry is
//! 0 (never read). That is the `prompt_len - 1` rule of this crate: the label at position `k` is trained
//! when `k >= prompt_len - 1`, and a conversation's flags carry over token for token. A pack holds
//! documents whose `len - 1` (the positions the model sees) sum to at most `pack_size`, as
//! Megatron-Bridge's own packer counts them; documents are cut to `pack_size + 1` tokens first (by the
//! chosen truncation), and documents of fewer than two tokens (nothing to predict) are left out and
//! counted.
//!
//! Where conventions differ: Megatron-Bridge's own preparation appends EOS (and a BOS, per tokenizer) to
//! every example; this export writes the store's tokens as they are (add EOS in the text or template if
//! the model should learn to stop). `pack_metadata.json` beside the files is the list Megatron-Bridge
//! reads as `pack_metadata_file_path` (for `pad_cu_seqlens`).
//!
//! The output directory is written like a dataset: locked, staged, and swapped in complete
//! ([`crate::dataset::commit`]), so a killed run leaves the old export or the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Int32Builder, Int8Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};

use crate::dataset::commit::OutputDir;
use crate::dataset::Progress;
use crate::schedule::{plan_packs, Overflow, PackSpec, PackStrategy};
use crate::store::Store;
use crate::{Error, LengthLimit, Result, Truncation};

/// The metadata file Megatron-Bridge reads as `pack_metadata_file_path`.
pub const PACK_METADATA_FILE: &str = "pack_metadata.json";

/// Whether `name` is a file an export writes (so `overwrite` may replace a directory of them).
pub fn is_export_file(name: &str) -> bool {
    name == PACK_METADATA_FILE || (name.starts_with("part-") && name.ends_with(".idx.parquet"))
}

/// How to export.
#[derive(Clone, Debug)]
pub struct MegatronExport {
    pub store: PathBuf,
    pub output: PathBuf,
    /// Positions per pack as Megatron-Bridge counts them (`Σ (len - 1)`): its `packed_sequence_size`.
    pub pack_size: usize,
    /// How a document longer than `pack_size + 1` tokens is cut (`Error` refuses it, naming its line).
    pub truncation: Truncation,
    /// Rows packed together (the exact-fill packer works within it).
    pub window: usize,
    /// Packs per Parquet file (`part-NNNNN.idx.parquet`); row groups of 500 packs, as Megatron-Bridge
    /// writes them.
    pub packs_per_file: usize,
    /// Replace an export already in the output directory.
    pub overwrite: bool,
}

impl MegatronExport {
    pub fn new(store: impl Into<PathBuf>, output: impl Into<PathBuf>, pack_size: usize) -> Self {
        MegatronExport {
            store: store.into(),
            output: output.into(),
            pack_size,
            truncation: Truncation::Error,
            window: 4096,
            packs_per_file: 100_000,
            overwrite: false,
        }
    }
}

/// What an export wrote: Megatron-Bridge's packing metadata, and the counts.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ExportSummary {
    pub files: Vec<String>,
    pub packs: usize,
    pub documents: usize,
    /// Store rows of fewer than two tokens, left out.
    pub skipped_short: usize,
    /// Positions in all packs (`Σ (len - 1)`).
    pub positions: u64,
    /// Trained labels in all packs.
    pub trained: u64,
    /// The longest document's `len - 1`.
    pub dataset_max_seqlen: usize,
    pub max_samples_per_bin: usize,
    pub min_packed_seqlen: usize,
    /// Positions used, as a percentage of `packs × pack_size`.
    pub packing_efficiency: f64,
}

const ROW_GROUP: usize = 500;

fn schema() -> Arc<Schema> {
    let list = |item: DataType| DataType::List(Arc::new(Field::new("item", item, true)));
    Arc::new(Schema::new(vec![
        Field::new("input_ids", list(DataType::Int32), false),
        Field::new("loss_mask", list(DataType::Int8), false),
        Field::new("seq_start_id", list(DataType::Int32), false),
    ]))
}

/// The packs of one Parquet file, column by column.
struct Columns {
    input_ids: ListBuilder<Int32Builder>,
    loss_mask: ListBuilder<Int8Builder>,
    seq_start_id: ListBuilder<Int32Builder>,
    packs: usize,
}

impl Columns {
    fn new() -> Self {
        Columns {
            input_ids: ListBuilder::new(Int32Builder::new()),
            loss_mask: ListBuilder::new(Int8Builder::new()),
            seq_start_id: ListBuilder::new(Int32Builder::new()),
            packs: 0,
        }
    }

    fn finish(&mut self) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.input_ids.finish()),
            Arc::new(self.loss_mask.finish()),
            Arc::new(self.seq_start_id.finish()),
        ];
        self.packs = 0;
        RecordBatch::try_new(schema(), columns)
            .map_err(|e| Error::InvalidBatch(format!("building the Parquet columns: {e}")))
    }
}

fn parquet_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(path, std::io::Error::other(format!("writing Parquet: {e}")))
}

/// An open `part-NNNNN.idx.parquet`, written a row group at a time (memory stays one row group).
struct Part {
    name: String,
    path: PathBuf,
    writer: parquet::arrow::ArrowWriter<std::fs::File>,
    packs: usize,
}

impl Part {
    fn create(dir: &Path, index: usize) -> Result<Part> {
        let name = format!("part-{index:05}.idx.parquet");
        let path = dir.join(&name);
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP))
            .build();
        let writer = parquet::arrow::ArrowWriter::try_new(file, schema(), Some(props))
            .map_err(|e| parquet_err(&path, e))?;
        Ok(Part {
            name,
            path,
            writer,
            packs: 0,
        })
    }

    /// Write the packs gathered in `columns` (and empty them).
    fn write(&mut self, columns: &mut Columns) -> Result<()> {
        if columns.packs == 0 {
            return Ok(());
        }
        self.packs += columns.packs;
        let batch = columns.finish()?;
        self.writer
            .write(&batch)
            .map_err(|e| parquet_err(&self.path, e))
    }

    /// Finish the file (footer, synced); its name.
    fn close(self) -> Result<String> {
        let file = self
            .writer
            .into_inner()
            .map_err(|e| parquet_err(&self.path, e))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.name)
    }
}

fn id32(token: u32) -> Result<i32> {
    i32::try_from(token).map_err(|_| Error::IdOverflow {
        id: token.into(),
        dtype: "int32 (Megatron-Bridge's input_ids)",
    })
}

/// Export the store at `config.store` as Megatron-Bridge packed-sequence Parquet into `config.output`.
pub fn export_megatron(config: &MegatronExport, progress: &dyn Progress) -> Result<ExportSummary> {
    let bad = |name: &'static str, reason: String| Err(Error::InvalidOption { name, reason });
    // Offsets are int32 in the files: a pack's tokens (at most twice its positions) must fit.
    if config.pack_size == 0 || config.pack_size > i32::MAX as usize / 2 {
        return bad(
            "pack_size",
            format!("{} is not in 1..={}", config.pack_size, i32::MAX / 2),
        );
    }
    if config.window == 0 || config.packs_per_file == 0 {
        return bad("window", "windows and files need at least one row".into());
    }
    let store = Store::open(&config.store)?;
    let (mut out, removed) = OutputDir::open_with(
        &config.output,
        config.overwrite,
        false,
        "an export",
        is_export_file,
    )?;
    for path in removed {
        progress.note(&format!("removed {} (left by a dead run)", path.display()));
    }
    let staging = out.staging()?;
    // Every document fits: `len - 1 <= pack_size`.
    let limit = LengthLimit {
        max_len: Some(config.pack_size + 1),
        truncation: config.truncation,
    };
    let spec = PackSpec {
        max_tokens: config.pack_size,
        strategy: PackStrategy::ExactFill,
        overflow: Overflow::Error,
    };
    let mut summary = ExportSummary {
        files: Vec::new(),
        packs: 0,
        documents: 0,
        skipped_short: 0,
        positions: 0,
        trained: 0,
        dataset_max_seqlen: 0,
        max_samples_per_bin: 0,
        min_packed_seqlen: usize::MAX,
        packing_efficiency: 0.0,
    };
    let mut columns = Columns::new();
    let mut part: Option<Part> = None;
    let all: Vec<usize> = (0..store.len()).collect();
    for chunk in all.chunks(config.window) {
        // A row too long is named by its input line, and the limit is the pack size.
        let pack_limit = |e: Error| match e {
            Error::SequenceTooLong {
                len,
                prompt_len,
                output_len,
                ..
            } => Error::SequenceTooLong {
                len,
                prompt_len,
                output_len,
                max_len: config.pack_size,
                limit: "pack_size",
            },
            other => other,
        };
        let ragged = store.ragged(chunk, &limit).map_err(|e| {
            let e = match e {
                Error::At { at, source } => Error::At {
                    at,
                    source: Box::new(pack_limit(*source)),
                },
                other => pack_limit(other),
            };
            store.name_line(e, |k| chunk.get(k).copied())
        })?;
        let docs: Vec<usize> = (0..ragged.rows())
            .filter(|&i| ragged.row_len(i) >= 2)
            .collect();
        summary.skipped_short += ragged.rows() - docs.len();
        let costs: Vec<usize> = docs.iter().map(|&i| ragged.row_len(i) - 1).collect();
        for pack in plan_packs(&costs, &spec)? {
            let mut start = 0i32;
            let mut positions = 0usize;
            for &d in &pack {
                let row = docs[d];
                let tokens = ragged.row(row);
                let trainable = ragged.trainable_in_row(row);
                columns.seq_start_id.values().append_value(start);
                for (k, &token) in tokens.iter().enumerate() {
                    columns.input_ids.values().append_value(id32(token)?);
                    let trained = k + 1 < tokens.len() && trainable(k + 1);
                    summary.trained += trained as u64;
                    columns.loss_mask.values().append_value(trained as i8);
                }
                start += tokens.len() as i32;
                positions += tokens.len() - 1;
                summary.dataset_max_seqlen = summary.dataset_max_seqlen.max(tokens.len() - 1);
            }
            columns.input_ids.append(true);
            columns.loss_mask.append(true);
            columns.seq_start_id.append(true);
            columns.packs += 1;
            summary.packs += 1;
            summary.documents += pack.len();
            summary.positions += positions as u64;
            summary.max_samples_per_bin = summary.max_samples_per_bin.max(pack.len());
            summary.min_packed_seqlen = summary.min_packed_seqlen.min(positions);
            let in_part = part.as_ref().map_or(0, |p| p.packs) + columns.packs;
            if columns.packs == ROW_GROUP || in_part == config.packs_per_file {
                let mut open = match part.take() {
                    Some(p) => p,
                    None => Part::create(staging.path(), summary.files.len())?,
                };
                open.write(&mut columns)?;
                if open.packs == config.packs_per_file {
                    summary.files.push(open.close()?);
                } else {
                    part = Some(open);
                }
            }
        }
        progress.advance(0, summary.packs);
    }
    if summary.packs == 0 {
        return Err(Error::Empty(format!(
            "{} holds no row of two tokens or more: nothing to export",
            store.dir().display()
        )));
    }
    if columns.packs > 0 || part.is_some() {
        let mut open = match part.take() {
            Some(p) => p,
            None => Part::create(staging.path(), summary.files.len())?,
        };
        open.write(&mut columns)?;
        summary.files.push(open.close()?);
    }
    summary.packing_efficiency =
        summary.positions as f64 / (summary.packs * config.pack_size) as f64 * 100.0;
    // Megatron-Bridge's metadata: a list of one dict, keys as its packer writes them.
    let metadata = serde_json::json!([{
        "dataset_max_seqlen": summary.dataset_max_seqlen,
        "max_samples_per_bin": summary.max_samples_per_bin,
        "packing_factor": (summary.documents as f64 / summary.packs as f64 * 100.0).round() / 100.0,
        "packing_efficiency": (summary.packing_efficiency * 100.0).round() / 100.0,
        "pack_size": config.pack_size,
        "min_packed_seqlen": summary.min_packed_seqlen,
    }]);
    let path = staging.path().join(PACK_METADATA_FILE);
    crate::io::write_atomically(&path, &serde_json::to_vec_pretty(&metadata).expect("JSON"))?;
    out.commit(staging)?;
    Ok(summary)
}
