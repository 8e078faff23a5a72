//! Bounded memory stays bounded: the dataset job's peak resident memory does not grow with its input.
//! The same rows are written 20 times over (about 30 MB) and 200 times over (about 300 MB), and the
//! two runs' peak RSS (the kernel's count for the child process) are compared. One test in its own
//! binary, so that no other test's child processes are counted.

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// The peak resident set of the largest child process waited for so far, in bytes.
fn children_max_rss() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0);
    usage.ru_maxrss as u64 * 1024
}

fn generate(path: &Path, copies: usize) -> u64 {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let words = [
        "the",
        "answer",
        "is",
        "seventeen",
        "because",
        "each",
        "of",
        "the",
        "boxes",
        "holds",
        "three",
        "apples",
        "and",
        "there",
        "are",
        "five",
        "12,345",
        "tokens/s",
        "naïve",
        "東京",
    ];
    for copy in 0..copies {
        for row in 0..1000usize {
            let len = 50 + (row * 37 + copy) % 400;
            let text: Vec<&str> = (0..len)
                .map(|i| words[(i * 7 + row) % words.len()])
                .collect();
            let (prompt, output) = text.split_at(len / 3);
            let line = serde_json::json!({"prompt": prompt.join(" "), "output": output.join(" ")});
            writeln!(file, "{line}").unwrap();
        }
    }
    file.flush().unwrap();
    std::fs::metadata(path).unwrap().len()
}

fn peak_rss_of_a_run(input: &Path, output: &Path) -> u64 {
    let status = Command::new(env!("CARGO_BIN_EXE_sft-collate"))
        .args([
            "collate",
            "--quiet",
            "--device",
            "cpu",
            "--tokenizer",
            "cl100k_base",
        ])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_dir_all(output).unwrap();
    children_max_rss()
}

#[test]
fn peak_memory_does_not_grow_with_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let (small, large) = (
        dir.path().join("small.jsonl"),
        dir.path().join("large.jsonl"),
    );
    let small_bytes = generate(&small, 20);
    let large_bytes = generate(&large, 200);
    // Runs are counted as the largest so far: the small one first.
    let small_rss = peak_rss_of_a_run(&small, &dir.path().join("out-small"));
    let large_rss = peak_rss_of_a_run(&large, &dir.path().join("out-large"));
    eprintln!(
        "peak RSS: {:.0} MB for {:.0} MB of input, {:.0} MB for {:.0} MB",
        small_rss as f64 / 1e6,
        small_bytes as f64 / 1e6,
        large_rss as f64 / 1e6,
        large_bytes as f64 / 1e6
    );
    // Ten times the input, at most 50% (and 100 MB) more memory: a few chunks in flight, not the input.
    assert!(
        large_rss < small_rss + (small_rss / 2).max(100 << 20),
        "{large_rss} bytes for {large_bytes} bytes of input vs {small_rss} for {small_bytes}"
    );
    assert!(
        large_rss < large_bytes,
        "the whole input would fit in {large_rss} bytes"
    );
}
