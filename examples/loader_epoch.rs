//! One epoch of the loader over a token store on the CPU: steps/s, tokens/s and the process's peak
//! resident memory, to show that memory does not grow with the store (it is memory-mapped; only the
//! steps in flight are held).
//!
//! ```sh
//! cargo run --release --example loader_epoch -- STORE [rows:64 | pack:4096] [max-steps]
//! ```

use std::time::Instant;

use sft_collate::loader::{Batching, Loader, LoaderBatch, LoaderConfig};
use sft_collate::schedule::{Overflow, PackSpec, PackStrategy};
use sft_collate::store::Store;
use sft_collate::{Device, Placed};

/// A field of /proc/self/status in MiB (Linux): `VmHWM` (peak resident), `RssAnon` (resident memory of
/// the process's own, now), `RssFile` (resident pages of mapped files, i.e. the store's page cache,
/// which the kernel reclaims under pressure).
fn status_mib(field: &str) -> f64 {
    let read = || -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    read().unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        return Err("usage: loader_epoch STORE [rows:N | pack:TOKENS] [max-steps]".into());
    };
    let batching = match args
        .get(1)
        .map(String::as_str)
        .unwrap_or("rows:64")
        .split_once(':')
    {
        Some(("rows", n)) => Batching::Rows(n.parse()?),
        Some(("pack", n)) => Batching::Packs {
            pack: PackSpec {
                max_tokens: n.parse()?,
                strategy: PackStrategy::ExactFill,
                overflow: Overflow::Split,
            },
            window: 4096,
        },
        _ => return Err("batching is rows:N or pack:TOKENS".into()),
    };
    let max_steps: usize = match args.get(2) {
        Some(n) => n.parse()?,
        None => usize::MAX,
    };
    let opened = Instant::now();
    let store = std::sync::Arc::new(Store::open(dir)?);
    eprintln!(
        "store: {} rows, {} tokens, opened in {:.2} s (anonymous RSS {:.0} MiB, mapped {:.0} MiB)",
        store.len(),
        store.tokens(),
        opened.elapsed().as_secs_f64(),
        status_mib("RssAnon:"),
        status_mib("RssFile:"),
    );
    let mut loader = Loader::new(store, LoaderConfig::new(batching), Device::cpu())?;
    let planned = Instant::now();
    let steps = loader.steps_per_epoch()?.min(max_steps);
    eprintln!(
        "epoch plan: {steps} steps in {:.2} s",
        planned.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let mut tokens = 0usize;
    let mut peak_anon = status_mib("RssAnon:");
    for s in 0..steps {
        if s % 256 == 0 {
            peak_anon = peak_anon.max(status_mib("RssAnon:"));
        }
        let step = loader.next_step()?;
        tokens += match step.batch {
            LoaderBatch::Padded(Placed::Host(b)) => b.stats.tokens,
            LoaderBatch::Packed(Placed::Host(p)) => p.stats.tokens,
            _ => unreachable!("the CPU device"),
        };
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{steps} steps, {tokens} tokens in {seconds:.2} s: {:.0} steps/s, {:.1} M tokens/s; \
         anonymous RSS at most {:.0} MiB (sampled), peak RSS {:.0} MiB of which mapped store pages {:.0} MiB",
        steps as f64 / seconds,
        tokens as f64 / seconds / 1e6,
        peak_anon,
        status_mib("VmHWM:"),
        status_mib("RssFile:"),
    );
    Ok(())
}
