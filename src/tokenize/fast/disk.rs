//! The load cache: a `tokenizer.json` prepared for the fast engine, kept on disk so that the next load of
//! the same file skips reading 10 MB of JSON and converting 150k tokens and merges. A file holds the
//! source's rest (everything but the vocabulary and merges, as JSON, checked again at each load exactly
//! as from the source), the vocabulary in the engine's form and the merges as ids.
//!
//! Keyed by the source's content (XXH3-128 of its bytes, and its length), never by its path or time, so
//! an edited file is a new entry and a stale one cannot be read; each file also carries this crate's
//! version and a checksum of everything in it. Anything that does not read back whole (another
//! version, a truncated or damaged file) is ignored and written again. Writes go to a temporary name
//! and are renamed into place, so concurrent loads see a whole file or none. A cache that cannot be
//! written (read-only home, full disk) costs nothing but the time it would have saved.
//!
//! Where: `$SFT_COLLATE_CACHE` (a directory; `off` turns the cache off), else
//! `$XDG_CACHE_HOME/sft-collate`, else `~/.cache/sft-collate`. About 4 MB per tokenizer of 150k tokens;
//! the [`KEEP`] most recently used entries are kept (older ones deleted when a new one is written).

use std::path::{Path, PathBuf};

use twox_hash::XxHash3_128;

use super::json::{self, Model};
use super::vocab::VocabBuilder;
use super::BpeSpec;

const MAGIC: &[u8; 8] = b"SFTCTOK\0";
/// Bumped when the layout below, or what a spec is made from, changes.
const FORMAT: u32 = 1;

/// What a load did with the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// No cache: turned off, or no directory for it.
    Off,
    /// Read from this file.
    Hit(PathBuf),
    /// Prepared from the source and written to this file.
    Stored(PathBuf),
    /// Prepared from the source; the cache could not be written (why).
    NotStored(String),
}

impl std::fmt::Display for CacheUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheUse::Off => write!(f, "off"),
            CacheUse::Hit(p) => write!(f, "read from {}", p.display()),
            CacheUse::Stored(p) => write!(f, "prepared and saved to {}", p.display()),
            CacheUse::NotStored(why) => write!(f, "prepared, not saved ({why})"),
        }
    }
}

/// The cache directory, when there is one.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("SFT_COLLATE_CACHE") {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
            .map(|d| d.join("sft-collate")),
    }
}

/// The spec of a `tokenizer.json` through the cache in `dir` (none: straight from the source).
pub(super) fn spec_from_json(
    json: &str,
    dir: Option<&Path>,
) -> Result<(BpeSpec, CacheUse), String> {
    let Some(dir) = dir else {
        return Ok((json::spec_from_json(json, None)?, CacheUse::Off));
    };
    let key = XxHash3_128::oneshot(json.as_bytes());
    let path = dir.join(format!("tokenizer-{key:032x}.bin"));
    if let Some((rest, model)) = std::fs::read(&path)
        .ok()
        .and_then(|bytes| decode(&bytes, key, json.len()))
    {
        // A spec the rest does not give (it always does, for a file this version wrote) is made afresh.
        if let Ok(spec) = json::spec_from_saved(&rest, model) {
            // Recently used, for pruning (best effort: a read-only entry stays as old as it was).
            let _ = std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok((spec, CacheUse::Hit(path)));
        }
    }
    let mut stored = CacheUse::NotStored("not reached".into());
    let spec = json::spec_from_json(
        json,
        Some(&mut |rest, model| {
            stored = match write(&path, &encode(key, json.len(), rest, model)) {
                Ok(()) => {
                    prune(dir, KEEP);
                    CacheUse::Stored(path.clone())
                }
                Err(e) => CacheUse::NotStored(format!("{}: {e}", path.display())),
            };
        }),
    )?;
    Ok((spec, stored))
}

/// Entries kept: the most recently used (written or read); older ones are deleted when one is written.
pub(crate) const KEEP: usize = 32;

/// The load cache's directory and what it holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadCache {
    pub dir: PathBuf,
    /// Entries (prepared tokenizers) in it.
    pub entries: usize,
    /// Their size in bytes.
    pub bytes: u64,
}

/// The load cache as the environment sets it now; `None` when off.
pub(crate) fn load_cache() -> Option<LoadCache> {
    let dir = cache_dir()?;
    let entries = entries(&dir);
    Some(LoadCache {
        entries: entries.len(),
        bytes: entries.iter().map(|e| e.2).sum(),
        dir,
    })
}

/// The entries of `dir`: when each was last used, its path, its size (none if it cannot be read).
fn entries(dir: &Path) -> Vec<(std::time::SystemTime, PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("tokenizer-") && name.ends_with(".bin")
        })
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, e.path(), meta.len()))
        })
        .collect()
}

/// Delete all but the `keep` most recently used entries of `dir` (best effort: another process may be
/// doing the same; one that loses an entry it was about to read prepares the file again).
fn prune(dir: &Path, keep: usize) {
    let mut entries = entries(dir);
    if entries.len() <= keep {
        return;
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, path, _) in entries.drain(keep..) {
        let _ = std::fs::remove_file(path);
    }
}

fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("a file in the cache directory");
    std::fs::create_dir_all(dir)?;
    // Unique per process and per call: two threads preparing the same file never share a temporary.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().expect("a file name").to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn encode(key: u128, source_len: usize, rest: &str, model: &Model) -> Vec<u8> {
    let arena = model.vocab.arena();
    let mut out = Vec::with_capacity(arena.len() + 12 * model.merges.len() + rest.len() + 256);
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(version.len() as u64).to_le_bytes());
    out.extend_from_slice(version);
    out.extend_from_slice(&key.to_le_bytes());
    for n in [source_len, model.file_vocab_len, model.file_merges_len] {
        out.extend_from_slice(&(n as u64).to_le_bytes());
    }
    out.extend_from_slice(&(rest.len() as u64).to_le_bytes());
    out.extend_from_slice(rest.as_bytes());
    out.extend_from_slice(&(arena.len() as u64).to_le_bytes());
    out.extend_from_slice(arena);
    out.extend_from_slice(&(model.other_vocab.len() as u64).to_le_bytes());
    for (token, id) in &model.other_vocab {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(token.len() as u64).to_le_bytes());
        out.extend_from_slice(token.as_bytes());
    }
    out.extend_from_slice(&(model.merges.len() as u64).to_le_bytes());
    for &(a, b, merged) in &model.merges {
        for id in [a, b, merged] {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    let checksum = XxHash3_128::oneshot(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// Bytes read in order, every length checked against what is left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<usize> {
        usize::try_from(u64::from_le_bytes(self.take(8)?.try_into().ok()?)).ok()
    }

    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.take(16)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u64()?;
        self.take(n)
    }
}

/// The rest and the model of a cache file for the source with this key and length; `None` unless it
/// is whole, this version's, and for that source.
fn decode(bytes: &[u8], key: u128, source_len: usize) -> Option<(String, Model)> {
    let body_len = bytes.len().checked_sub(16)?;
    let (body, checksum) = bytes.split_at(body_len);
    if XxHash3_128::oneshot(body) != u128::from_le_bytes(checksum.try_into().ok()?) {
        return None;
    }
    let mut r = Reader(body);
    let same = r.take(8)? == MAGIC
        && r.u32()? == FORMAT
        && r.bytes()? == env!("CARGO_PKG_VERSION").as_bytes()
        && r.u128()? == key
        && r.u64()? == source_len;
    if !same {
        return None;
    }
    let (file_vocab_len, file_merges_len) = (r.u64()?, r.u64()?);
    let rest = std::str::from_utf8(r.bytes()?).ok()?.to_string();
    let vocab = VocabBuilder::from_arena(r.bytes()?.to_vec())?
        .finish()
        .ok()?;
    let others = r.u64()?;
    let mut other_vocab = Vec::with_capacity(others.min(r.0.len()));
    for _ in 0..others {
        let id = r.u32()?;
        let token = std::str::from_utf8(r.bytes()?).ok()?.to_string();
        other_vocab.push((token, id));
    }
    let count = r.u64()?;
    let ids = r.take(count.checked_mul(12)?)?;
    let merges = ids
        .chunks_exact(12)
        .map(|m| {
            let id = |at: usize| u32::from_le_bytes(m[at..at + 4].try_into().expect("4 bytes"));
            (id(0), id(4), id(8))
        })
        .collect();
    if !r.0.is_empty() {
        return None;
    }
    Some((
        rest,
        Model {
            vocab,
            other_vocab,
            merges,
            file_vocab_len,
            file_merges_len,
        },
    ))
}
