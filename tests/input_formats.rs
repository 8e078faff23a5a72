//! Every input format beside JSONL: Parquet (every codec the data tools write), Arrow IPC files and
//! streams, JSON arrays, whole-file gzip and zstd, through a pipe and from standard input. The same rows
//! in any of them must give the same batch files, byte for byte, as the JSONL they came from (GSM8K with
//! the Qwen2 tokenizer; pairs and conversations in one table); bad rows, columns a table lacks and
//! files that are damaged or cannot be read as given fail naming them, and write nothing.

mod common;

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int64Array, LargeStringArray, RecordBatch, StringArray};
use arrow_ipc::writer::{FileWriter, IpcWriteOptions, StreamWriter};
use arrow_ipc::CompressionType;
use parquet::arrow::ArrowWriter;
use parquet::basic::{BrotliLevel, Compression, GzipLevel, ZstdLevel};
use parquet::file::properties::WriterProperties;
use sft_collate::dataset::Manifest;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sft-collate"))
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Run, and require success.
fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run sft-collate");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run, and require failure; returns stderr.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run sft-collate");
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A JSONL file as one table, its schema inferred as `arrow-json` infers it (conversations become a
/// list of structs, pairs beside them nulls there).
fn table_of(jsonl: &Path) -> RecordBatch {
    let file = || BufReader::new(std::fs::File::open(jsonl).unwrap());
    let (schema, _) = arrow_json::reader::infer_json_schema(file(), None).unwrap();
    let schema = Arc::new(schema);
    let batches: Vec<RecordBatch> = arrow_json::ReaderBuilder::new(schema.clone())
        .build(file())
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    arrow_select_concat(&schema, &batches)
}

fn arrow_select_concat(schema: &arrow_schema::SchemaRef, batches: &[RecordBatch]) -> RecordBatch {
    // One batch per table keeps the writers simple; row groups and batches are still several, below.
    let columns: Vec<ArrayRef> = (0..schema.fields().len())
        .map(|c| {
            let parts: Vec<&dyn arrow_array::Array> =
                batches.iter().map(|b| b.column(c).as_ref()).collect();
            arrow_select::concat::concat(&parts).unwrap()
        })
        .collect();
    RecordBatch::try_new(schema.clone(), columns).unwrap()
}

fn write_parquet(batch: &RecordBatch, path: &Path, compression: Compression) {
    let props = WriterProperties::builder()
        .set_compression(compression)
        // Several row groups and pages, as large files have.
        .set_max_row_group_row_count(Some(1000))
        .build();
    let mut writer = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
}

/// Slices of at most 777 rows: a file of several record batches.
fn slices(batch: &RecordBatch) -> impl Iterator<Item = RecordBatch> + '_ {
    (0..batch.num_rows())
        .step_by(777)
        .map(|at| batch.slice(at, 777.min(batch.num_rows() - at)))
}

fn write_ipc_file(batch: &RecordBatch, path: &Path, compression: Option<CompressionType>) {
    let options = IpcWriteOptions::default()
        .try_with_compression(compression)
        .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = FileWriter::try_new_with_options(file, &batch.schema(), options).unwrap();
    for part in slices(batch) {
        writer.write(&part).unwrap();
    }
    writer.finish().unwrap();
}

fn ipc_stream(batch: &RecordBatch) -> Vec<u8> {
    write_ipc_stream(batch, IpcWriteOptions::default())
}

fn ipc_stream_compressed(batch: &RecordBatch, compression: CompressionType) -> Vec<u8> {
    let options = IpcWriteOptions::default()
        .try_with_compression(Some(compression))
        .unwrap();
    write_ipc_stream(batch, options)
}

fn write_ipc_stream(batch: &RecordBatch, options: IpcWriteOptions) -> Vec<u8> {
    let mut writer =
        StreamWriter::try_new_with_options(Vec::new(), &batch.schema(), options).unwrap();
    for part in slices(batch) {
        writer.write(&part).unwrap();
    }
    writer.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Run `cmd` with the file at `input` written to its standard input.
fn on_stdin(cmd: &mut Command, input: PathBuf) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A writer of its own: the run may refuse the input before reading all of it.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&std::fs::read(input).unwrap());
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// `collate` of `input` into `output` with `args`.
fn collate(input: &Path, output: &Path, args: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args(["collate", "--quiet", "--device", "cpu"])
        .args(args)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output);
    cmd
}

/// Every batch file of two datasets, byte for byte (the manifests name their inputs, so differ).
fn assert_same_batches(want: &Path, got: &Path, what: &str) {
    let names = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "manifest.json")
            .collect();
        names.sort();
        names
    };
    let files = names(want);
    assert!(!files.is_empty());
    assert_eq!(files, names(got), "{what}: other files");
    for name in files {
        assert!(
            std::fs::read(want.join(&name)).unwrap() == std::fs::read(got.join(&name)).unwrap(),
            "{what}: {name} differs"
        );
    }
    let (a, b) = (Manifest::read(want).unwrap(), Manifest::read(got).unwrap());
    assert_eq!((a.rows, a.tokens), (b.rows, b.tokens), "{what}");
}

#[test]
fn gsm8k_as_every_table_gives_the_same_batches_as_its_jsonl() {
    let Some(shared) =
        common::shared_dir("gsm8k_as_every_table_gives_the_same_batches_as_its_jsonl")
    else {
        return;
    };
    let fixtures = shared.join("fixtures");
    let jsonl = fixtures.join("gsm8k/train.jsonl");
    let tokenizer = fixtures.join("qwen2/tokenizer.json");
    let template = fixtures.join("gsm8k/r1_zero.prompt");
    let args = [
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--template",
        template.to_str().unwrap(),
        "--output-key",
        "answer",
    ];
    let dir = tempfile::tempdir().unwrap();
    let want = dir.path().join("from-jsonl");
    ok(&mut collate(&jsonl, &want, &args));
    let table = table_of(&jsonl);
    assert_eq!(table.num_rows(), 7473);

    let mut inputs: Vec<(String, PathBuf)> = Vec::new();
    for (name, codec) in [
        ("plain", Compression::UNCOMPRESSED),
        ("snappy", Compression::SNAPPY),
        ("zstd", Compression::ZSTD(ZstdLevel::default())),
        ("gzip", Compression::GZIP(GzipLevel::default())),
        ("lz4", Compression::LZ4_RAW),
        ("brotli", Compression::BROTLI(BrotliLevel::default())),
    ] {
        let path = dir.path().join(format!("train-{name}.parquet"));
        write_parquet(&table, &path, codec);
        inputs.push((format!("Parquet ({name})"), path));
    }
    for (name, codec) in [
        ("plain", None),
        ("lz4", Some(CompressionType::LZ4_FRAME)),
        ("zstd", Some(CompressionType::ZSTD)),
    ] {
        let path = dir.path().join(format!("train-{name}.arrow"));
        write_ipc_file(&table, &path, codec);
        inputs.push((format!("Arrow IPC file ({name})"), path));
    }
    let stream = dir.path().join("train-stream.arrow");
    std::fs::write(&stream, ipc_stream(&table)).unwrap();
    inputs.push(("Arrow IPC stream".into(), stream.clone()));
    // JSON arrays (pretty as `json.dump(rows, f, indent=2)` writes them, and compact) and whole-file
    // compression of the text formats.
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pretty = serde_json::to_vec_pretty(&rows).unwrap();
    for (what, name, bytes) in [
        ("JSON array (pretty)", "train.json", pretty.clone()),
        (
            "JSON array (compact)",
            "train-compact.json",
            serde_json::to_vec(&rows).unwrap(),
        ),
        (
            "gzip JSONL",
            "train.jsonl.gz",
            gzip(&std::fs::read(&jsonl).unwrap()),
        ),
        (
            "zstd JSONL",
            "train.jsonl.zst",
            zstd::encode_all(&std::fs::read(&jsonl).unwrap()[..], 3).unwrap(),
        ),
        ("gzip JSON array", "train.json.gz", gzip(&pretty)),
        (
            "gzip Arrow IPC stream",
            "train.arrow.gz",
            gzip(&std::fs::read(&stream).unwrap()),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        inputs.push((what.into(), path));
    }

    for (i, (what, input)) in inputs.iter().enumerate() {
        let got = dir.path().join(format!("out-{i}"));
        ok(&mut collate(input, &got, &args));
        assert_same_batches(&want, &got, what);
    }

    // A stream through standard input.
    let got = dir.path().join("out-stdin");
    let mut child = collate(Path::new("-"), &got, &args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(&stream).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_batches(&want, &got, "Arrow IPC stream on standard input");

    // Tokenized once into a store, sharded, from the table: the same batches again.
    let store = dir.path().join("store");
    for shard in ["0/3", "1/3", "2/3"] {
        ok(bin()
            .args(["tokenize", "--quiet", "--shard", shard])
            .args(args)
            .arg("--input")
            .arg(&inputs[2].1)
            .arg("--output")
            .arg(&store));
    }
    let got = dir.path().join("out-store");
    ok(bin()
        .args(["collate", "--quiet", "--device", "cpu", "--from"])
        .arg(&store)
        .arg("--output")
        .arg(&got));
    assert_same_batches(&want, &got, "a store tokenized from Parquet");
}

#[test]
fn conversations_and_pairs_in_one_table() {
    let jsonl = repo("examples/chat.jsonl");
    let template = repo("examples/qwen-chat.template");
    let args = [
        "--batch-size",
        "2",
        "--message-template",
        template.to_str().unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let want = dir.path().join("from-jsonl");
    ok(&mut collate(&jsonl, &want, &args));
    let table = table_of(&jsonl);
    // The conversation column is a list of structs, null on the pair rows.
    let messages = table.column_by_name("messages").unwrap();
    assert!(matches!(
        messages.data_type(),
        arrow_schema::DataType::List(field) if matches!(field.data_type(), arrow_schema::DataType::Struct(_))
    ));
    assert!(messages.null_count() > 0);
    let parquet = dir.path().join("chat.parquet");
    write_parquet(&table, &parquet, Compression::SNAPPY);
    let got = dir.path().join("from-parquet");
    ok(&mut collate(&parquet, &got, &args));
    assert_same_batches(&want, &got, "conversations from Parquet");
    // `show` reads a table's row too.
    let row = |input: &Path| {
        let out = ok(bin()
            .args(["show", "--row", "1", "--message-template"])
            .arg(&template)
            .arg("--input")
            .arg(input));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(row(&jsonl), row(&parquet));
}

/// A small table with the awkward things real datasets hold: a null, a number where text belongs, an
/// image column, a large-string column.
fn awkward_table() -> RecordBatch {
    let prompt: ArrayRef = Arc::new(StringArray::from(vec![
        Some("first question"),
        None,
        Some("third question"),
    ]));
    let output: ArrayRef = Arc::new(LargeStringArray::from(vec!["one", "two", "three"]));
    let image: ArrayRef = Arc::new(BinaryArray::from(vec![&[0u8, 159, 146][..], &[], &[255]]));
    let id: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
    RecordBatch::try_from_iter([
        ("prompt", prompt),
        ("output", output),
        ("image", image),
        ("id", id),
    ])
    .unwrap()
}

#[test]
fn a_tables_bad_rows_and_missing_columns_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("awkward.parquet");
    write_parquet(&awkward_table(), &input, Compression::SNAPPY);
    let out = dir.path().join("out");

    // Row 2 (from 1) has a null prompt; the image column is never read.
    let err = fails(&mut collate(&input, &out, &[]));
    assert!(
        err.contains("awkward.parquet:2: field \"prompt\" is not a string (it is null)"),
        "{err}"
    );
    assert!(!out.join("manifest.json").exists());
    ok(&mut collate(&input, &out, &["--skip-bad-lines"]));
    let manifest = Manifest::read(&out).unwrap();
    assert_eq!((manifest.rows, manifest.skipped_lines), (2, 1));
    assert_eq!(manifest.bad_lines[0].line, 2);

    // A number where the template wants text.
    let template = dir.path().join("t.txt");
    std::fs::write(&template, "Q{id}: {prompt}").unwrap();
    let err = fails(&mut collate(
        &input,
        &dir.path().join("out-2"),
        &["--template", template.to_str().unwrap()],
    ));
    assert!(
        err.contains("awkward.parquet:1: field \"id\" is not a string (it is a number)"),
        "{err}"
    );

    // Keys the table does not have: its columns are listed.
    let err = fails(&mut collate(
        &input,
        &dir.path().join("out-3"),
        &["--prompt-key", "question", "--output-key", "answer"],
    ));
    assert!(
        err.contains(
            "no column \"question\" (the prompt key), \"answer\" (the output key) and no \
             conversation column \"messages\"; its columns are \"prompt\", \"output\", \"image\", \"id\""
        ),
        "{err}"
    );
    for name in ["out-2", "out-3"] {
        assert!(!dir.path().join(name).join("manifest.json").exists());
    }
}

#[test]
fn damaged_tables_and_pipes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let table = table_of(&repo("examples/sample.jsonl"));
    let parquet = dir.path().join("t.parquet");
    write_parquet(&table, &parquet, Compression::SNAPPY);
    let bytes = std::fs::read(&parquet).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("out");
    let err = fails(&mut collate(&cut, &out, &[]));
    assert!(
        err.contains("cut.parquet: not a readable Parquet file"),
        "{err}"
    );

    let ipc = dir.path().join("t.arrow");
    write_ipc_file(&table, &ipc, None);
    let bytes = std::fs::read(&ipc).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&mut collate(&cut, &out, &[]));
    assert!(
        err.contains("cut.parquet: not a readable Arrow IPC file"),
        "{err}"
    );
    // Cut in its index only.
    std::fs::write(&cut, &bytes[..bytes.len() - 20]).unwrap();
    let err = fails(&mut collate(&cut, &out, &[]));
    assert!(
        err.contains("cut.parquet: not a readable Arrow IPC file"),
        "{err}"
    );

    // A stream cut inside a batch: the rows handed on before it are not a dataset.
    let stream = ipc_stream(&table);
    let cut_stream = dir.path().join("cut-stream.arrow");
    std::fs::write(&cut_stream, &stream[..stream.len() - 40]).unwrap();
    let err = fails(&mut collate(&cut_stream, &out, &[]));
    assert!(
        err.contains("cut-stream.arrow: the rows after row 0 cannot be read"),
        "{err}"
    );
    assert!(!out.join("manifest.json").exists());

    // Parquet is read from its end: a pipe or a compressed file is refused, naming why.
    let result = on_stdin(&mut collate(Path::new("-"), &out, &[]), parquet.clone());
    assert!(!result.status.success());
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        err.contains("-: a Parquet file is read from a regular file, not a pipe"),
        "{err}"
    );
    let gz = dir.path().join("t.parquet.gz");
    std::fs::write(&gz, gzip(&std::fs::read(&parquet).unwrap())).unwrap();
    let err = fails(&mut collate(&gz, &out, &[]));
    assert!(
        err.contains("t.parquet.gz: a Parquet file is read from a regular file"),
        "{err}"
    );
    // A cut gzip stream.
    let text = gzip(&std::fs::read(repo("examples/sample.jsonl")).unwrap());
    std::fs::write(&gz, &text[..text.len() / 2]).unwrap();
    let err = fails(&mut collate(&gz, &out, &[]));
    assert!(
        err.contains("t.parquet.gz: the gzip data is damaged or cut short"),
        "{err}"
    );
    assert!(!out.join("manifest.json").exists());
}

#[test]
fn a_json_arrays_bad_elements_are_named_by_their_number() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rows.json");
    let out = dir.path().join("out");
    std::fs::write(
        &input,
        "\u{feff}[\n  {\"prompt\": \"a\", \"output\": \"b\"},\n  {\"prompt\": 1, \"output\": \"b\"},\n           {\"prompt\": \"c\", \"output\": \"d\"}\n]\n",
    )
    .unwrap();
    let err = fails(&mut collate(&input, &out, &[]));
    assert!(
        err.contains("rows.json:2: field \"prompt\" is not a string (it is a number)"),
        "{err}"
    );
    ok(&mut collate(&input, &out, &["--skip-bad-lines"]));
    let manifest = Manifest::read(&out).unwrap();
    assert_eq!((manifest.rows, manifest.skipped_lines), (2, 1));
    assert_eq!(manifest.bad_lines[0].line, 2);

    // Malformed JSON is named where it is; an empty array holds no rows.
    std::fs::write(
        &input,
        "[{\"prompt\": \"a\", \"output\": \"b\"} {\"prompt\": \"c\"}]",
    )
    .unwrap();
    let err = fails(&mut collate(&input, &dir.path().join("out-2"), &[]));
    assert!(
        err.contains("rows.json: malformed JSON array: expected `,` or `]` at line 1 column"),
        "{err}"
    );
    std::fs::write(&input, " [ ] ").unwrap();
    let err = fails(&mut collate(&input, &dir.path().join("out-3"), &[]));
    assert!(err.contains("0 rows"), "{err}");
    for name in ["out-2", "out-3"] {
        assert!(!dir.path().join(name).join("manifest.json").exists());
    }
}

#[test]
fn progress_is_counted_in_the_files_own_bytes() {
    use sft_collate::input::{read_rows, RowFormat, Source};
    let dir = tempfile::tempdir().unwrap();
    let jsonl = repo("examples/sample.jsonl");
    let text = std::fs::read(&jsonl).unwrap();
    let table = table_of(&jsonl);
    let rows: Vec<serde_json::Value> = String::from_utf8(text.clone())
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("a.jsonl", text.clone()),
        ("a.jsonl.gz", gzip(&text)),
        ("a.json", serde_json::to_vec_pretty(&rows).unwrap()),
        ("a.arrow", ipc_stream(&table)),
    ];
    let parquet = dir.path().join("a.parquet");
    write_parquet(&table, &parquet, Compression::SNAPPY);
    let mut paths: Vec<PathBuf> = vec![parquet];
    for (name, bytes) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        paths.push(path);
    }
    for path in paths {
        let source = Source::open(&path, &RowFormat::default()).unwrap();
        let size = source.size.unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let mut seen = Vec::new();
        read_rows(source, &RowFormat::default(), false, 1, |chunk| {
            seen.push(chunk.bytes_read);
            true
        })
        .unwrap();
        assert_eq!(seen.len(), rows.len(), "{}", path.display());
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "{}: {seen:?}",
            path.display()
        );
        // The end of the rows is the end of the file (a stream's trailer may follow the last batch).
        let last = *seen.last().unwrap();
        assert!(
            last <= size && last * 10 >= size * 9,
            "{}: {last} of {size}",
            path.display()
        );
    }
}

#[test]
fn a_sharegpt_json_array_gives_the_same_batches_as_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    let template = repo("examples/qwen-chat.template");
    // examples/chat.jsonl's conversations, once as `messages` JSONL, once as ShareGPT writes them.
    let conversations: Vec<serde_json::Value> =
        std::fs::read_to_string(repo("examples/chat.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|row| row.get("messages").is_some())
            .collect();
    assert!(conversations.len() >= 2);
    let messages = dir.path().join("messages.jsonl");
    let lines: String = conversations.iter().map(|c| format!("{c}\n")).collect();
    std::fs::write(&messages, lines).unwrap();
    let rename = |role: &str| match role {
        "user" => "human".to_string(),
        "assistant" => "gpt".to_string(),
        other => other.to_string(),
    };
    let sharegpt: Vec<serde_json::Value> = conversations
        .iter()
        .map(|c| {
            let turns: Vec<serde_json::Value> = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| serde_json::json!({"from": rename(m["role"].as_str().unwrap()), "value": m["content"]}))
                .collect();
            serde_json::json!({ "conversations": turns })
        })
        .collect();
    let sharegpt_path = dir.path().join("sharegpt.json");
    std::fs::write(
        &sharegpt_path,
        serde_json::to_vec_pretty(&sharegpt).unwrap(),
    )
    .unwrap();

    let args = ["--message-template", template.to_str().unwrap()];
    let want = dir.path().join("want");
    ok(&mut collate(&messages, &want, &args));
    let sharegpt_keys = [
        "--messages-key",
        "conversations",
        "--role-key",
        "from",
        "--content-key",
        "value",
    ];
    let got = dir.path().join("got");
    let mut cmd = collate(&sharegpt_path, &got, &args);
    cmd.args(sharegpt_keys)
        .args(["--role-names", "human=user,gpt=assistant"]);
    ok(&mut cmd);
    assert_same_batches(&want, &got, "ShareGPT");
    let manifest = Manifest::read(&got).unwrap();
    assert_eq!(manifest.options.format.role_key, "from");
    assert_eq!(
        manifest.options.format.role_names,
        [
            ("human".into(), "user".into()),
            ("gpt".into(), "assistant".into())
        ]
    );
    // Without the renames no message is an assistant's, so nothing is trained (the rows are counted as
    // such, not refused): the roles are what the data spells.
    let plain = dir.path().join("plain");
    ok(collate(&sharegpt_path, &plain, &args).args(sharegpt_keys));
    let manifest = Manifest::read(&plain).unwrap();
    assert_eq!(manifest.response_tokens, 0);
    assert_eq!(manifest.empty_response_rows, manifest.rows);
}

#[test]
fn damaged_tables_are_errors_never_panics() {
    use sft_collate::input::{read_rows, RowFormat, Source};
    let dir = tempfile::tempdir().unwrap();
    let table = table_of(&repo("examples/chat.jsonl"));
    let parquet = dir.path().join("t.parquet");
    write_parquet(&table, &parquet, Compression::SNAPPY);
    let ipc = dir.path().join("t.arrow");
    write_ipc_file(&table, &ipc, None);
    let zstd_parquet = dir.path().join("z.parquet");
    write_parquet(
        &table,
        &zstd_parquet,
        Compression::ZSTD(ZstdLevel::default()),
    );
    let lz4_ipc = dir.path().join("lz4.arrow");
    write_ipc_file(&table, &lz4_ipc, Some(CompressionType::LZ4_FRAME));
    let files = [
        std::fs::read(&parquet).unwrap(),
        std::fs::read(&zstd_parquet).unwrap(),
        std::fs::read(&ipc).unwrap(),
        std::fs::read(&lz4_ipc).unwrap(),
        ipc_stream(&table),
        ipc_stream_compressed(&table, CompressionType::ZSTD),
        gzip(&std::fs::read(repo("examples/chat.jsonl")).unwrap()),
    ];
    let damaged = dir.path().join("damaged");
    let mut errors = 0;
    for original in &files {
        // Every byte flipped in turn (past the magic, which would only make it another format).
        for at in 6..original.len() {
            let mut bytes = original.clone();
            bytes[at] ^= 0x5a;
            std::fs::write(&damaged, &bytes).unwrap();
            let format = RowFormat::default();
            let result = Source::open(&damaged, &format)
                .and_then(|source| read_rows(source, &format, true, 64, |_| true));
            errors += result.is_err() as usize;
        }
    }
    // Most damage is found; what is not changed only some text (a row's bytes), and read as rows.
    assert!(errors > 0);
}

#[test]
fn a_directory_of_shards_is_one_input() {
    let Some(shared) = common::shared_dir("a_directory_of_shards_is_one_input") else {
        return;
    };
    let fixtures = shared.join("fixtures");
    let jsonl = fixtures.join("gsm8k/train.jsonl");
    let args = [
        "--template",
        fixtures.join("gsm8k/r1_zero.prompt").to_str().unwrap(),
        "--output-key",
        "answer",
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let want = dir.path().join("want");
    ok(&mut collate(&jsonl, &want, &args));

    // Three shards in three formats, as a dataset directory holds them beside its metadata; the JSONL
    // shard without a final line break.
    let table = table_of(&jsonl);
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let (a, b) = (2000, 5000);
    write_parquet(
        &table.slice(0, a),
        &shards.join("data-00000-of-00003.parquet"),
        Compression::SNAPPY,
    );
    std::fs::write(
        shards.join("data-00001-of-00003.arrow"),
        ipc_stream(&table.slice(a, b - a)),
    )
    .unwrap();
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let rest: Vec<&str> = text.lines().skip(b).collect();
    std::fs::write(shards.join("data-00002-of-00003.jsonl"), rest.join("\n")).unwrap();
    std::fs::write(shards.join("dataset_info.json"), "{\"citation\": \"\"}").unwrap();
    std::fs::write(shards.join("state.json"), "{}").unwrap();
    let got = dir.path().join("got");
    ok(&mut collate(&shards, &got, &args));
    assert_same_batches(&want, &got, "a directory of shards");

    // A bad row is numbered across the files; a directory without data files is named.
    let bad: String = (0..3)
        .map(|i| format!("{{\"question\": \"q{i}\"}}\n"))
        .collect();
    std::fs::write(shards.join("data-00002-of-00003.jsonl"), bad).unwrap();
    let err = fails(&mut collate(&shards, &dir.path().join("x"), &args));
    assert!(
        err.contains(&format!("shards:{}: missing key \"answer\"", b + 1)),
        "{err}"
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("dataset_info.json"), "{}").unwrap();
    let err = fails(&mut collate(&empty, &dir.path().join("y"), &args));
    assert!(
        err.contains("empty: a directory with no data files"),
        "{err}"
    );
}
