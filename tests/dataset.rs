//! The dataset job under hostile conditions, run as users run it (the binary): killed at every stage and
//! inside the commit, two runs on one directory, and inputs and options that must fail cleanly. The
//! invariant: at every instant the output directory holds exactly one complete dataset (the old one or
//! the new one), never a mix, never nothing, and a failed run changes nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use safetensors::SafeTensors;
use sft_collate::dataset::{LayoutInfo, Manifest};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sft-collate"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run sft-collate")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `rows` (prompt, output) lines.
fn write_input(path: &Path, rows: usize, tag: &str) {
    let text: String = (0..rows)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": format!("{tag} question {i}"), "output": format!("answer {i}")})
            )
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

fn collate(input: &Path, output: &Path, batch_size: usize) -> Command {
    let mut cmd = bin();
    cmd.args(["collate", "--quiet", "--device", "cpu", "--batch-size"])
        .arg(batch_size.to_string())
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output);
    cmd
}

/// The dataset in `dir`, checked complete: its manifest, exactly the files it lists (and nothing else),
/// each a readable safetensors file of the listed shape. Returns the manifest.
fn complete_dataset(dir: &Path) -> Manifest {
    let manifest = Manifest::read(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
    want.push("manifest.json".into());
    want.sort();
    assert_eq!(
        names,
        want,
        "{}: files besides the manifest's",
        dir.display()
    );
    let packed = matches!(manifest.layout, LayoutInfo::Packed { .. });
    for file in &manifest.files {
        let bytes = std::fs::read(dir.join(&file.name)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        // A pack is one row of all its documents.
        let rows = if packed { 1 } else { file.rows };
        assert_eq!(st.tensor("input_ids").unwrap().shape(), [rows, file.width]);
    }
    manifest
}

/// What the parent directory holds besides the dataset: the lock file, and leftovers of dead runs.
fn siblings(parent: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("sft-collate"))
        .collect();
    names.sort();
    names
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    old_input: PathBuf,
    new_input: PathBuf,
    output: PathBuf,
}

/// An output directory holding the "old" dataset (30 rows), and a "new" input (200 rows).
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (old_input, new_input) = (root.join("old.jsonl"), root.join("new.jsonl"));
    write_input(&old_input, 30, "old");
    write_input(&new_input, 200, "new");
    let output = root.join("out");
    assert!(run(&mut collate(&old_input, &output, 8)).status.success());
    assert_eq!(complete_dataset(&output).rows, 30);
    Setup {
        _dir: dir,
        root,
        old_input,
        new_input,
        output,
    }
}

#[test]
fn a_crash_at_any_stage_leaves_the_old_dataset_or_the_new_one() {
    let s = setup();
    for (point, survivor) in [
        ("staged-1", 30),
        ("staged-150", 30),
        ("before-commit", 30),
        ("after-exchange", 200),
    ] {
        let out = run(collate(&s.new_input, &s.output, 1)
            .arg("--overwrite")
            .env("SFT_COLLATE_TEST_CRASH_AT", point));
        assert!(!out.status.success(), "{point}: the run should have died");
        // Exactly one complete dataset, the old or the new one; never a mix.
        assert_eq!(complete_dataset(&s.output).rows, survivor, "{point}");
        // The next run removes what the dead one left, says so, and succeeds.
        let left = siblings(&s.root);
        assert!(
            left.len() > 1,
            "{point}: the dead run left its staging: {left:?}"
        );
        let out = run(bin()
            .args([
                "collate",
                "--device",
                "cpu",
                "--batch-size",
                "8",
                "--overwrite",
            ])
            .arg("--input")
            .arg(&s.old_input)
            .arg("--output")
            .arg(&s.output));
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("left by a run that did not finish"),
            "{}",
            stderr(&out)
        );
        assert_eq!(siblings(&s.root), [".out.sft-collate.lock"]);
        assert_eq!(complete_dataset(&s.output).rows, 30);
    }
}

#[test]
fn kill_9_at_random_moments_never_breaks_the_dataset() {
    let s = setup();
    // 200 one-row batches; the kills are spread over a full run's duration (measured first), so they
    // land everywhere: loading the tokenizer, reading, writing files, committing, removing the old dataset.
    let started = std::time::Instant::now();
    assert!(run(collate(&s.new_input, &s.output, 1).arg("--overwrite"))
        .status
        .success());
    let full = started.elapsed();
    assert!(run(collate(&s.old_input, &s.output, 8).arg("--overwrite"))
        .status
        .success());
    let mut outcomes = [0usize; 2];
    let kills = 24u32;
    for i in 0..kills {
        let mut child = collate(&s.new_input, &s.output, 1)
            .arg("--overwrite")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full * (i + 1) / kills);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let rows = complete_dataset(&s.output).rows;
        assert!(rows == 30 || rows == 200, "kill {i}: {rows} rows");
        outcomes[usize::from(rows == 200)] += 1;
        // Back to the old dataset for the next round (this also cleans up after the killed run).
        let out = run(collate(&s.old_input, &s.output, 8).arg("--overwrite"));
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(siblings(&s.root), [".out.sft-collate.lock"]);
    }
    eprintln!(
        "killed runs: {} left the old dataset, {} the new one",
        outcomes[0], outcomes[1]
    );
}

#[test]
fn two_runs_on_one_directory_do_not_both_succeed() {
    let s = setup();
    let big = s.root.join("big.jsonl");
    write_input(&big, 20_000, "big");
    // Wait until the first run holds the lock (its staging directory appears).
    let holding = || {
        let started = std::time::Instant::now();
        while siblings(&s.root).len() < 2 && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let mut first = collate(&big, &s.output, 1)
        .arg("--overwrite")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    holding();
    let second = run(collate(&s.new_input, &s.output, 1).arg("--overwrite"));
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("another sft-collate run is writing it"),
        "{}",
        stderr(&second)
    );
    assert!(stderr(&second).contains("--wait"), "{}", stderr(&second));
    assert!(first.wait().unwrap().success());
    assert_eq!(complete_dataset(&s.output).rows, 20_000);
    // With --wait the second one runs after the first.
    let mut first = collate(&big, &s.output, 1)
        .arg("--overwrite")
        .spawn()
        .unwrap();
    holding();
    let second = run(collate(&s.new_input, &s.output, 1).args(["--overwrite", "--wait"]));
    assert!(first.wait().unwrap().success());
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(complete_dataset(&s.output).rows, 200);
}

#[test]
fn a_run_that_produces_nothing_replaces_nothing() {
    let s = setup();
    // Every line bad (a key no row has), skipping bad lines: an error, and the old dataset stays.
    let out = run(collate(&s.new_input, &s.output, 8).args([
        "--overwrite",
        "--skip-bad-lines",
        "--output-key",
        "answers",
    ]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("0 rows: all 200 lines were bad"),
        "{}",
        stderr(&out)
    );
    assert_eq!(complete_dataset(&s.output).rows, 30);
    // An empty input: an error unless --allow-empty.
    let empty = s.root.join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let out = run(collate(&empty, &s.output, 8).arg("--overwrite"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("0 rows (the input is empty; --allow-empty"));
    assert_eq!(complete_dataset(&s.output).rows, 30);
    let out = run(collate(&empty, &s.output, 8).args(["--overwrite", "--allow-empty"]));
    assert!(out.status.success());
    assert_eq!(complete_dataset(&s.output).rows, 0);
}

#[test]
fn options_are_checked_against_what_they_imply_before_anything_is_allocated() {
    let s = setup();
    let fresh = s.root.join("fresh");
    for (args, message) in [
        (vec!["--pad-to-multiple-of", "1000000000"], "positions = "),
        (
            vec!["--pad-id", "999999"],
            "--pad-id 999999 is outside the tokenizer's vocabulary",
        ),
        (
            vec!["--pack", "64", "--attention-mask"],
            "--attention-mask packs have no attention mask",
        ),
        (vec!["--max-len", "0"], "--max-len must be at least 1"),
    ] {
        let out = run(collate(&s.new_input, &fresh, 8).args(&args));
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
        assert!(
            !fresh.exists(),
            "{args:?}: a failed run created the output directory"
        );
    }
    // Huge batch sizes are fine: the batch is as large as the input, not as the number.
    for size in ["18446744073709551615", "4294967296"] {
        let out = run(bin()
            .args([
                "collate",
                "--quiet",
                "--device",
                "cpu",
                "--batch-size",
                size,
            ])
            .arg("--input")
            .arg(&s.new_input)
            .arg("--output")
            .arg(&fresh));
        assert!(out.status.success(), "{size}: {}", stderr(&out));
        let manifest = complete_dataset(&fresh);
        assert_eq!((manifest.rows, manifest.batches), (200, 1));
        std::fs::remove_dir_all(&fresh).unwrap();
    }
    // --pack honours --max-len.
    let out = run(collate(&s.new_input, &fresh, 8).args([
        "--pack",
        "64",
        "--max-len",
        "5",
        "--truncate",
        "output-right",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = complete_dataset(&fresh);
    assert_eq!(manifest.tokens, 200 * 5);
    assert_eq!(manifest.options.spec.max_len, Some(5));
}

#[test]
fn bad_input_is_named_by_file_and_line_and_can_be_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut bytes = b"\xEF\xBB\xBF{\"prompt\": \"a\", \"output\": \"b\"}\n".to_vec();
    bytes.extend_from_slice(b"{\"prompt\": \"\xFF\xFE\", \"output\": \"c\"}\n");
    bytes.extend_from_slice(b"{\"prompt\": \"d\", \"output\": \"e\"}\n");
    std::fs::write(&input, bytes).unwrap();
    let output = dir.path().join("out");
    let out = run(&mut collate(&input, &output, 8));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in.jsonl:2: not valid UTF-8"),
        "{}",
        stderr(&out)
    );
    let out = run(collate(&input, &output, 8).arg("--skip-bad-lines"));
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = complete_dataset(&output);
    // The byte order mark of line 1 is not part of the JSON; line 2 is counted and named.
    assert_eq!((manifest.rows, manifest.skipped_lines), (2, 1));
    assert_eq!(manifest.bad_lines[0].line, 2);
    // An output path that is a file.
    let out = run(&mut collate(&input, &input, 8));
    assert!(
        stderr(&out).contains("is not a directory"),
        "{}",
        stderr(&out)
    );
    // A directory of the user's own files is not overwritten.
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
    let out = run(collate(&input, &mine, 8).args(["--overwrite", "--skip-bad-lines"]));
    assert!(
        stderr(&out).contains("not a dataset (notes.txt)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("notes.txt")).unwrap(),
        "keep me"
    );
}

#[test]
fn a_batch_made_almost_all_of_padding_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut lines: Vec<String> = (0..63)
        .map(|i| serde_json::json!({"prompt": "hi", "output": format!("short {i}")}).to_string())
        .collect();
    lines.push(serde_json::json!({"prompt": "x", "output": "word ".repeat(300_000)}).to_string());
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = run(bin()
        .args(["collate", "--device", "cpu", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("out")));
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("% padding in ") && stderr(&out).contains("length bucketing"),
        "{}",
        stderr(&out)
    );
}
