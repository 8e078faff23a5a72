//! The `sft-collate` binary, run as a user would.

use std::path::Path;
use std::process::{Command, Output};

use safetensors::SafeTensors;
use sft_collate::{tokenize_prompt_and_output, CollateSpec, IdDtype, LabelFormat, Tokenizer};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sft-collate"))
}

fn sample() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/sample.jsonl"
    ))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run sft-collate");
    eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn collate_writes_batches_equal_to_the_library() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = run(bin()
        .args([
            "collate",
            "--quiet",
            "--batch-size",
            "5",
            "--labels",
            "ignore-index",
        ])
        .args(["--id-dtype", "i64", "--pad-to-multiple-of", "8", "--input"])
        .arg(sample())
        .arg("--output")
        .arg(out_dir.path()));
    assert!(out.status.success());
    assert_eq!(
        dir_names(out_dir.path()),
        [
            "batch-00000.safetensors",
            "batch-00001.safetensors",
            "batch-00002.safetensors",
            "manifest.json"
        ]
    );

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.path().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["rows"], 12);
    assert_eq!(manifest["batches"], 3);
    assert_eq!(manifest["empty_response_rows"], 1);
    assert_eq!(manifest["tokenizer"], "o200k_base");
    assert_eq!(manifest["tokenizer_engine"], "fast (o200k split)");
    let cache = &manifest["tokenizer_cache"];
    assert!(cache["hits"].as_u64().unwrap() + cache["misses"].as_u64().unwrap() > 0);

    // Every batch equals what the library gives for the same rows.
    let text = std::fs::read_to_string(sample()).unwrap();
    let rows: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["prompt"].as_str().unwrap().into(),
                v["output"].as_str().unwrap().into(),
            )
        })
        .collect();
    let tokenizer = Tokenizer::load("o200k_base").unwrap();
    let spec = CollateSpec {
        pad_to_multiple_of: Some(8),
        label_format: LabelFormat::IGNORE_INDEX,
        id_dtype: IdDtype::I64,
        ..Default::default()
    };
    for (b, chunk) in rows.chunks(5).enumerate() {
        let (prompts, outputs): (Vec<_>, Vec<_>) = chunk.iter().cloned().unzip();
        let want = tokenize_prompt_and_output(&prompts, &outputs, &tokenizer, &spec).unwrap();
        let bytes =
            std::fs::read(out_dir.path().join(format!("batch-{b:05}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (r, w) = want.shape();
        for (name, data) in [
            ("input_ids", want.input_ids.as_bytes()),
            ("labels", want.labels.as_bytes()),
        ] {
            let t = st.tensor(name).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::I64);
            assert_eq!(t.shape(), [r, w]);
            assert_eq!(t.data(), data, "{name} of batch {b}");
        }
        let mask = st.tensor("response_mask").unwrap();
        assert_eq!(mask.dtype(), safetensors::Dtype::BOOL);
        let want_mask: Vec<u8> = want.response_mask.iter().map(|&m| m as u8).collect();
        assert_eq!(mask.data(), want_mask.as_slice());
        assert_eq!(w % 8, 0);
    }
}

#[test]
fn a_bad_line_fails_naming_it_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let good = r#"{"prompt": "a", "output": "b"}"#;
    let mut lines = vec![good; 150];
    lines[130] = r#"{"prompt": "a", "output": 7}"#;
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out_dir = dir.path().join("out");
    let out = run(bin()
        .args(["collate", "--quiet", "--batch-size", "16", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out_dir));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in.jsonl:131"), "{stderr}");
    assert!(stderr.contains("not a string"), "{stderr}");
    // Earlier batches were written to staging and then removed: the output directory was never made, and
    // nothing is left beside it.
    assert!(!out_dir.exists());
    assert_eq!(dir_names(dir.path()), [".out.sft-collate.lock", "in.jsonl"]);

    // With --skip-bad-lines the run succeeds and counts the line.
    let out = run(bin()
        .args(["collate", "--quiet", "--skip-bad-lines", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out_dir));
    assert!(out.status.success());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["rows"], 149);
    assert_eq!(manifest["skipped_lines"], 1);
    assert_eq!(manifest["bad_lines"][0]["line"], 131);

    // A second run into the same directory is refused without --overwrite, and nothing is touched.
    let before = dir_names(&out_dir);
    let out = run(bin()
        .args(["collate", "--quiet", "--input"])
        .arg(sample())
        .arg("--output")
        .arg(&out_dir));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overwrite"));
    assert_eq!(dir_names(&out_dir), before);
    let out = run(bin()
        .args(["collate", "--quiet", "--overwrite", "--input"])
        .arg(sample())
        .arg("--output")
        .arg(&out_dir));
    assert!(out.status.success());
    assert_eq!(dir_names(&out_dir).len(), 1 + 1); // 12 rows in one batch of 64, and the manifest.
}

#[test]
fn the_engine_is_chosen_and_named() {
    // Forcing tokenizers gives the same files, and the manifest says so.
    let fast_dir = tempfile::tempdir().unwrap();
    let slow_dir = tempfile::tempdir().unwrap();
    for (dir, engine) in [(&fast_dir, "fast"), (&slow_dir, "tokenizers")] {
        let out = run(bin()
            .args([
                "collate",
                "--quiet",
                "--tokenizer",
                "cl100k_base",
                "--tokenizer-engine",
                engine,
            ])
            .arg("--input")
            .arg(sample())
            .arg("--output")
            .arg(dir.path()));
        assert!(out.status.success());
    }
    let read = |dir: &Path, name: &str| std::fs::read(dir.join(name)).unwrap();
    assert_eq!(
        read(fast_dir.path(), "batch-00000.safetensors"),
        read(slow_dir.path(), "batch-00000.safetensors")
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(slow_dir.path(), "manifest.json")).unwrap();
    assert_eq!(manifest["tokenizer_engine"], "tokenizers (asked for)");
    assert!(manifest["tokenizer_cache"].is_null());

    let out = run(bin().args(["doctor", "--tokenizer", "cl100k_base"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("tokenizer engine: fast (cl100k split)"),
        "{stdout}"
    );

    // Where the load cache is and what it holds; off when asked.
    let cache = tempfile::tempdir().unwrap();
    std::fs::write(cache.path().join("tokenizer-0.bin"), [0u8; 2000]).unwrap();
    let out = run(bin()
        .args(["doctor"])
        .env("SFT_COLLATE_CACHE", cache.path()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = format!("load cache: {} (1 entries, 0.0 MB;", cache.path().display());
    assert!(stdout.contains(&line), "{stdout}");
    let out = run(bin().args(["doctor"]).env("SFT_COLLATE_CACHE", "off"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("load cache: off\n"));
}

#[test]
fn too_long_sequences_fail_or_truncate() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(bin()
        .args(["collate", "--quiet", "--max-len", "8", "--input"])
        .arg(sample())
        .arg("--output")
        .arg(dir.path()));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // In the user's terms: the file and line, the flag.
    assert!(stderr.contains("sample.jsonl:1: "), "{stderr}");
    assert!(
        stderr.contains("exceed --max-len 8 (--truncate"),
        "{stderr}"
    );
    let out = run(bin()
        .args([
            "collate",
            "--quiet",
            "--max-len",
            "8",
            "--truncate",
            "prompt-left",
            "--input",
        ])
        .arg(sample())
        .arg("--output")
        .arg(dir.path()));
    assert!(out.status.success());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["files"][0]["width"], 7);
}

#[test]
fn show_draws_the_position_table() {
    let out = run(bin().args([
        "show",
        "--prompt",
        "What is 2+2?",
        "--output",
        "The answer is 4",
        "--color",
        "never",
    ]));
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let tokenizer = Tokenizer::load("o200k_base").unwrap();
    let prompt_len = tokenizer.encode("What is 2+2?").unwrap().len();
    let output_len = tokenizer.encode("The answer is 4").unwrap().len();
    let rows: Vec<&str> = stdout.lines().skip(2).collect();
    assert_eq!(rows.len(), prompt_len + output_len - 1);
    for (j, row) in rows.iter().enumerate() {
        // The first trained position is prompt_len - 1: its input is the last prompt token.
        let trained = j + 1 >= prompt_len;
        assert_eq!(row.contains("T  (trained)"), trained, "{row}");
    }
    assert!(rows[prompt_len - 1].ends_with("prompt→output"));

    let out = run(bin().args(["show", "--prompt", "x"]));
    assert!(!out.status.success(), "--output is required with --prompt");

    // A row to show from a file: asked for, and one the file has.
    let out = run(bin().arg("show").arg("--input").arg(sample()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("error: --row is needed with --input"),
        "{stderr}"
    );
    let out = run(bin()
        .arg("show")
        .arg("--input")
        .arg(sample())
        .args(["--row", "100000"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    let want = format!(
        "error: --row 100000: {} has no such row (rows count from 0)",
        sample().display()
    );
    assert!(stderr.contains(&want), "{stderr}");
}

#[test]
fn help_reads_well() {
    let out = run(bin().args(["collate", "--help"]));
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--pad-to-multiple-of",
        "--skip-bad-lines",
        "--template",
        "--truncate",
        "--labels",
    ] {
        assert!(help.contains(flag), "{flag} missing from help");
    }
}

/// A negative number given to a numeric flag is refused as that flag's bad value (clap would otherwise
/// take `-1` for an unknown flag and print only the usage), and nothing is written.
#[test]
fn negative_numbers_are_refused_as_the_flags_values() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out");
    for (flag, value) in [
        ("--pad-id", "-1"),
        ("--max-len", "-5"),
        ("--batch-size", "-64"),
    ] {
        let out = run(bin()
            .args(["collate", "--device", "cpu", "--input"])
            .arg(sample())
            .arg("--output")
            .arg(&output)
            .args([flag, value]));
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag}")),
            "{flag} {value}: {stderr}"
        );
        assert!(!output.exists(), "{flag} {value} wrote an output");
    }
}

/// `loss` given a file that is not safetensors names the file and the flag, and writes nothing.
#[test]
fn loss_names_an_input_that_is_not_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.safetensors");
    let out = run(bin()
        .args(["loss", "--device", "cpu", "--input"])
        .arg(sample())
        .arg("--output")
        .arg(&output));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!("--input {}: not safetensors", sample().display());
    assert!(stderr.contains(&want), "{stderr}");
    assert!(!output.exists());
}

/// Files that never end, given where a file belongs, fail at once with the flag named (not read until
/// memory runs out): a device for a whole-file flag is refused before it is read, and JSONL input
/// without line breaks fails at its first line's length limit.
#[test]
fn endless_inputs_are_refused_not_read_until_memory_runs_out() {
    let zero = Path::new("/dev/zero");
    if !zero.exists() {
        eprintln!("SKIPPED: no /dev/zero on this system");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let line_limit =
        "/dev/zero:1: longer than 256 MiB (is the input JSONL, one JSON object per line?)";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["collate", "--input", "/dev/zero"], line_limit),
        (vec!["tokenize", "--input", "/dev/zero"], line_limit),
        (
            vec!["show", "--input", "/dev/zero", "--row", "0"],
            line_limit,
        ),
        (
            vec!["collate", "--tokenizer", "/dev/zero"],
            "tokenizer /dev/zero: a device, not a file",
        ),
        (
            vec!["collate", "--template", "/dev/zero"],
            "--template /dev/zero: a device, not a file",
        ),
        (
            vec!["loss", "--input", "/dev/zero"],
            "/dev/zero: a device, not a file",
        ),
    ];
    for (args, want) in cases {
        let mut cmd = bin();
        cmd.args(&args);
        if matches!(args[0], "collate" | "loss") {
            cmd.args(["--device", "cpu"]);
        }
        if !args.contains(&"--input") {
            cmd.arg("--input").arg(sample());
        }
        if args[0] != "show" {
            cmd.arg("--output").arg(&out_dir);
        }
        let out = run(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        // (`tokenize` keeps its store's directory, empty: other shards may be writing into it.)
        let left = out_dir
            .exists()
            .then(|| std::fs::read_dir(&out_dir).unwrap().count());
        assert!(matches!(left, None | Some(0)), "{args:?} left an output");
    }
}

/// `bench loss` with an empty shape is refused by name (it divided by the vocabulary size).
#[test]
fn bench_refuses_an_empty_shape() {
    for flag in ["--rows", "--vocab"] {
        let out = run(bin().args(["bench", "loss", "--device", "cpu", flag, "0"]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("error: {flag} must be at least 1")),
            "{stderr}"
        );
    }
}

/// An output whose lock file cannot be made beside it (a directory no one can create files in, even
/// root: `/proc`) is named as the user gave it, the lock file as the reason's detail.
#[test]
fn an_output_that_cannot_be_locked_is_named() {
    let out = run(bin()
        .args(["collate", "--device", "cpu", "--input"])
        .arg(sample())
        .args(["--output", "/proc/sft-collate-out"]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = "/proc/sft-collate-out: cannot create the lock file /proc/.sft-collate-out.sft-collate.lock beside it";
    assert!(stderr.contains(want), "{stderr}");
}

#[test]
fn loss_reads_safetensors_and_writes_what_the_library_computes() {
    use safetensors::tensor::{Dtype, TensorView};
    use sft_collate::backend::cpu::loss::masked_cross_entropy;
    use sft_collate::loss::{CeInput, CeOptions, Labels, Normalization};

    let dir = tempfile::tempdir().unwrap();
    let (batch, seq, vocab) = (2usize, 3usize, 11usize);
    let logits: Vec<half::bf16> = (0..batch * seq * vocab)
        .map(|i| half::bf16::from_f32(((i * 13) % 17) as f32 * 0.5 - 4.0))
        .collect();
    let labels: Vec<i32> = vec![1, 2, 3, 10, 0, 5];
    let mask: Vec<u8> = vec![0, 1, 1, 1, 0, 1];
    // The loss command's input file: these logits and mask, and the given labels.
    let input_path = dir.path().join("in.safetensors");
    let write_input = |labels: &[i32]| {
        let tensors = vec![
            (
                "logits",
                TensorView::new(
                    Dtype::BF16,
                    vec![batch, seq, vocab],
                    bytemuck::cast_slice(&logits),
                )
                .unwrap(),
            ),
            (
                "labels",
                TensorView::new(Dtype::I32, vec![batch, seq], bytemuck::cast_slice(labels))
                    .unwrap(),
            ),
            (
                "response_mask",
                TensorView::new(Dtype::BOOL, vec![batch, seq], &mask).unwrap(),
            ),
        ];
        std::fs::write(&input_path, safetensors::serialize(tensors, None).unwrap()).unwrap();
    };
    write_input(&labels);

    let bool_mask: Vec<bool> = mask.iter().map(|&m| m == 1).collect();
    let input = CeInput::new(&logits, vocab, Labels::I32(&labels), &bool_mask);
    let options = CeOptions {
        normalization: Normalization::Cs336 {
            normalize_constant: 2.0,
            batch_size: batch,
            gradient_accumulation_steps: 1,
        },
        upstream: 1.0,
        ..CeOptions::default()
    };
    let want = masked_cross_entropy(&input, &options, true).unwrap();

    let mut devices = vec!["cpu"];
    if cfg!(feature = "emulation") {
        devices.push("emulated");
    }
    for device in devices {
        let output_path = dir.path().join(format!("out-{device}.safetensors"));
        let out = run(bin()
            .args([
                "loss",
                "--device",
                device,
                "--grad",
                "--normalization",
                "cs336",
                "--normalize-constant",
                "2",
            ])
            .arg("--input")
            .arg(&input_path)
            .arg("--output")
            .arg(&output_path));
        assert!(out.status.success(), "{device}");
        let bytes = std::fs::read(&output_path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let scalar = |name: &str| {
            f64::from(bytemuck::pod_read_unaligned::<f32>(
                st.tensor(name).unwrap().data(),
            ))
        };
        assert!(
            (scalar("loss") - want.loss).abs() <= 1e-5 * want.loss.abs(),
            "{device}: loss"
        );
        assert_eq!(
            bytemuck::pod_read_unaligned::<i64>(st.tensor("count").unwrap().data()),
            4
        );
        let log_probs: Vec<f32> =
            bytemuck::pod_collect_to_vec(st.tensor("log_probs").unwrap().data());
        assert_eq!(st.tensor("log_probs").unwrap().shape(), [batch, seq]);
        for (g, w) in log_probs.iter().zip(&want.log_probs) {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-5 * w.abs() + 1e-6,
                "{device}: {g} vs {w}"
            );
        }
        let grad = st.tensor("grad_logits").unwrap();
        assert_eq!(
            (grad.dtype(), grad.shape()),
            (Dtype::BF16, &[batch, seq, vocab][..])
        );
    }

    // A label outside the vocabulary on a masked row: a clear error, no output file.
    write_input(&[1, 99, 3, 10, 0, 5]);
    let output_path = dir.path().join("bad.safetensors");
    let out = run(bin()
        .args(["loss", "--device", "cpu", "--input"])
        .arg(&input_path)
        .arg("--output")
        .arg(&output_path));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("label 99"));
    assert!(!output_path.exists());
}

#[test]
fn loss_options_without_a_mask_match_the_library() {
    use safetensors::tensor::{Dtype, TensorView};
    use sft_collate::backend::cpu::loss::masked_cross_entropy;
    use sft_collate::loss::{CeInput, CeOptions, Labels, Normalization};

    let dir = tempfile::tempdir().unwrap();
    let (batch, seq, vocab) = (3usize, 4usize, 9usize);
    let logits: Vec<f32> = (0..batch * seq * vocab)
        .map(|i| ((i * 29) % 31) as f32 * 0.3 - 4.0)
        .collect();
    // -100 where a collator writes its ignore index (the prompt); row 2 has one trained token.
    let labels: Vec<i64> = vec![-100, 3, 4, 8, -100, -100, 0, 1, -100, -100, -100, 7];
    let input_path = dir.path().join("in.safetensors");
    let tensors = vec![
        (
            "logits",
            TensorView::new(
                Dtype::F32,
                vec![batch, seq, vocab],
                bytemuck::cast_slice(&logits),
            )
            .unwrap(),
        ),
        (
            "labels",
            TensorView::new(Dtype::I64, vec![batch, seq], bytemuck::cast_slice(&labels)).unwrap(),
        ),
    ];
    std::fs::write(&input_path, safetensors::serialize(tensors, None).unwrap()).unwrap();
    // A [B, T] batch: each row is a document for the per-sequence mean.
    let cu = [0, 4, 8, 12];
    let input = CeInput {
        cu_seqlens: Some(&cu),
        ..CeInput::unmasked(&logits[..], vocab, Labels::I64(&labels))
    };
    let options = CeOptions {
        normalization: Normalization::SequenceMean,
        ignore_index: Some(-100),
        z_loss: 1e-3,
        label_smoothing: 0.1,
        softcap: Some(5.0),
        upstream: 1.0,
    };
    let want = masked_cross_entropy(&input, &options, true).unwrap();
    let flags = [
        "--reduction",
        "sequence-mean",
        "--ignore-index",
        "-100",
        "--z-loss",
        "1e-3",
        "--label-smoothing",
        "0.1",
        "--softcap",
        "5",
        "--grad",
    ];
    let mut devices = vec!["cpu"];
    if cfg!(feature = "emulation") {
        devices.push("emulated");
    }
    for device in devices {
        let output_path = dir.path().join(format!("out-{device}.safetensors"));
        let out = run(bin()
            .args(["loss", "--device", device])
            .args(flags)
            .arg("--input")
            .arg(&input_path)
            .arg("--output")
            .arg(&output_path));
        assert!(
            out.status.success(),
            "{device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&output_path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let f32_of = |name: &str| {
            f64::from(bytemuck::pod_read_unaligned::<f32>(
                st.tensor(name).unwrap().data(),
            ))
        };
        let i64_of =
            |name: &str| bytemuck::pod_read_unaligned::<i64>(st.tensor(name).unwrap().data());
        for (name, want) in [
            ("loss", want.loss),
            ("z_sum", want.z_sum),
            ("sum", want.sum),
        ] {
            assert!(
                (f32_of(name) - want).abs() <= 1e-5 * want.abs(),
                "{device}: {name} {} vs {want}",
                f32_of(name)
            );
        }
        assert_eq!(
            (i64_of("count"), i64_of("documents"), i64_of("correct")),
            (6, 3, want.correct as i64),
            "{device}"
        );
        let argmax: Vec<i64> = bytemuck::pod_collect_to_vec(st.tensor("argmax").unwrap().data());
        let want_argmax: Vec<i64> = want.argmax.iter().map(|&a| i64::from(a)).collect();
        assert_eq!(argmax, want_argmax, "{device}");
        let row_loss: Vec<f32> =
            bytemuck::pod_collect_to_vec(st.tensor("row_loss").unwrap().data());
        for (g, w) in row_loss.iter().zip(&want.row_loss) {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-5 * w.abs() + 1e-7,
                "{device}"
            );
        }
    }
    // No mask and no ignore index: the error says what to add.
    let out = run(bin()
        .args(["loss", "--device", "cpu", "--input"])
        .arg(&input_path)
        .arg("--output")
        .arg(dir.path().join("never.safetensors")));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ignore-index"));
    // Options outside their domain are refused by name.
    for (flag, value) in [
        ("--label-smoothing", "1.5"),
        ("--softcap", "-1"),
        ("--z-loss", "inf"),
    ] {
        let out = run(bin()
            .args([
                "loss",
                "--device",
                "cpu",
                "--ignore-index",
                "-100",
                flag,
                value,
                "--input",
            ])
            .arg(&input_path)
            .arg("--output")
            .arg(dir.path().join("never.safetensors")));
        assert!(!out.status.success(), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&flag[2..].replace('-', "_")) || stderr.contains(flag),
            "{stderr}"
        );
    }
    assert!(!dir.path().join("never.safetensors").exists());
}

#[test]
fn tokenize_once_then_collate_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    for shard in ["0/2", "1/2"] {
        let out = run(bin()
            .args(["tokenize", "--quiet", "--shard", shard, "--input"])
            .arg(sample())
            .arg("--output")
            .arg(&store));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (from_text, from_store) = (dir.path().join("text"), dir.path().join("from-store"));
    let out = run(bin()
        .args([
            "collate",
            "--quiet",
            "--device",
            "cpu",
            "--batch-size",
            "3",
            "--input",
        ])
        .arg(sample())
        .arg("--output")
        .arg(&from_text));
    assert!(out.status.success());
    let out = run(bin()
        .args([
            "collate",
            "--quiet",
            "--device",
            "cpu",
            "--batch-size",
            "3",
            "--from",
        ])
        .arg(&store)
        .arg("--output")
        .arg(&from_store));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = dir_names(&from_text);
    assert_eq!(names, dir_names(&from_store));
    for name in names.iter().filter(|n| n.ends_with(".safetensors")) {
        assert_eq!(
            std::fs::read(from_text.join(name)).unwrap(),
            std::fs::read(from_store.join(name)).unwrap(),
            "{name}"
        );
    }
    // The store's tokenizer is the store's: a tokenizer flag beside --from is refused, as is a shard
    // that is not I/N, and an incomplete store names the missing shard.
    let out = run(bin()
        .args(["collate", "--tokenizer", "cl100k_base", "--from"])
        .arg(&store)
        .arg("--output")
        .arg(dir.path().join("never")));
    assert!(!out.status.success());
    let out = run(bin()
        .args(["tokenize", "--shard", "2/2", "--input"])
        .arg(sample())
        .arg("--output")
        .arg(&store));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--shard"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(store.join("shard-00001-of-00002.json")).unwrap();
    let out = run(bin()
        .args(["collate", "--from"])
        .arg(&store)
        .arg("--output")
        .arg(dir.path().join("never")));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shards [1] of 2 are missing"));
    assert!(!dir.path().join("never").exists());
}

#[test]
fn pack_and_bucket_cover_every_row_once() {
    let read_manifest = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
    };
    let covered = |manifest: &serde_json::Value| -> Vec<u64> {
        let mut rows: Vec<u64> = manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|f| {
                f["input_rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_u64().unwrap())
            })
            .collect();
        rows.sort_unstable();
        rows
    };

    let packed_dir = tempfile::tempdir().unwrap();
    let out = run(bin()
        .args([
            "collate",
            "--quiet",
            "--pack",
            "48",
            "--id-dtype",
            "i64",
            "--input",
        ])
        .arg(sample())
        .arg("--output")
        .arg(packed_dir.path()));
    assert!(out.status.success());
    let manifest = read_manifest(packed_dir.path());
    assert_eq!(manifest["layout"]["kind"], "packed");
    assert_eq!(covered(&manifest), (0..12).collect::<Vec<u64>>());
    for file in manifest["files"].as_array().unwrap() {
        let bytes = std::fs::read(packed_dir.path().join(file["name"].as_str().unwrap())).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("input_ids").unwrap().shape()[1];
        assert!(t <= 48);
        for name in ["labels", "response_mask", "position_ids"] {
            assert_eq!(st.tensor(name).unwrap().shape(), [1, t], "{name}");
        }
        let cu: Vec<i32> = bytemuck::pod_collect_to_vec(st.tensor("cu_seqlens").unwrap().data());
        assert_eq!((cu[0], *cu.last().unwrap() as usize), (0, t));
        assert_eq!(cu.len(), file["input_rows"].as_array().unwrap().len() + 1);
        let positions: Vec<i64> =
            bytemuck::pod_collect_to_vec(st.tensor("position_ids").unwrap().data());
        for w in cu.windows(2) {
            assert_eq!(
                positions[w[0] as usize], 0,
                "positions restart at each document"
            );
        }
    }

    let plain_dir = tempfile::tempdir().unwrap();
    let bucket_dir = tempfile::tempdir().unwrap();
    for (dir, extra) in [
        (&plain_dir, vec![]),
        (&bucket_dir, vec!["--bucket", "12", "--seed", "3"]),
    ] {
        let out = run(bin()
            .args(["collate", "--quiet", "--batch-size", "4"])
            .args(extra)
            .arg("--input")
            .arg(sample())
            .arg("--output")
            .arg(dir.path()));
        assert!(out.status.success());
    }
    let (plain, bucketed) = (
        read_manifest(plain_dir.path()),
        read_manifest(bucket_dir.path()),
    );
    assert_eq!(covered(&bucketed), (0..12).collect::<Vec<u64>>());
    assert!(
        bucketed["padding_fraction"].as_f64().unwrap()
            <= plain["padding_fraction"].as_f64().unwrap()
    );
    assert_eq!(bucketed["layout"]["bucket_window"], 12);
}

#[test]
fn conversations_train_only_the_assistant_turns() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("chat.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello friend"}, {"role": "user", "content": " Bye"}, {"role": "assistant", "content": " Farewell"}]}"#,
            "\n",
            r#"{"prompt": "Q", "output": " A"}"#,
            "\n"
        ),
    )
    .unwrap();
    let template = dir.path().join("chat.template");
    std::fs::write(&template, "[{role}] {content} [end]\n").unwrap();
    let out_dir = dir.path().join("out");
    let out = run(bin()
        .args(["collate", "--quiet", "--input"])
        .arg(&input)
        .arg("--message-template")
        .arg(&template)
        .arg("--output")
        .arg(&out_dir));
    assert!(out.status.success());
    let bytes = std::fs::read(out_dir.join("batch-00000.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let labels: Vec<i32> = bytemuck::pod_collect_to_vec(st.tensor("labels").unwrap().data());
    let mask = st.tensor("response_mask").unwrap().data().to_vec();
    let width = st.tensor("labels").unwrap().shape()[1];
    let tokenizer = Tokenizer::load("o200k_base").unwrap();
    let trained = |row: usize| -> Vec<u32> {
        (0..width)
            .filter(|&j| mask[row * width + j] == 1)
            .map(|j| labels[row * width + j] as u32)
            .collect()
    };
    // Each message piece is tokenized on its own: the trained labels are exactly the assistant contents
    // with their template suffix.
    let mut want = tokenizer.encode(" Hello friend [end]\n").unwrap();
    want.extend(tokenizer.encode(" Farewell [end]\n").unwrap());
    assert_eq!(trained(0), want);
    assert_eq!(trained(1), tokenizer.encode(" A").unwrap());
}

#[test]
fn export_a_store_for_megatron_bridge() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = run(bin()
        .args(["tokenize", "--quiet", "--input"])
        .arg(sample())
        .arg("--output")
        .arg(&store));
    assert!(out.status.success());
    let megatron = dir.path().join("megatron");
    let export = |extra: &[&str]| {
        run(bin()
            .arg("export")
            .arg("--from")
            .arg(&store)
            .arg("--output")
            .arg(&megatron)
            .args(extra))
    };
    let out = export(&["--pack-size", "64"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("packs of"));
    assert_eq!(
        dir_names(&megatron),
        ["pack_metadata.json", "part-00000.idx.parquet"]
    );
    // Again without --overwrite: refused in the flag's words, the export kept.
    let out = export(&["--pack-size", "64"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overwrite"));
    // A pack size of 0, a pack too small for a row without --truncate: errors naming the flag / line.
    for size in ["0", "4294967296"] {
        let out = export(&["--pack-size", size, "--overwrite"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--pack-size"));
    }
    let out = export(&["--pack-size", "2", "--overwrite"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains(":1:"), "{err}");
    assert!(err.contains("over --pack-size 2"), "{err}");
    assert!(err.contains("--truncate"), "{err}");
    assert_eq!(
        dir_names(&megatron),
        ["pack_metadata.json", "part-00000.idx.parquet"]
    );
}
