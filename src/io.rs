//! Writing files so that a reader never sees half of one, and telling a caller how a long job goes.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Write `bytes` to `path` through a temporary file in the same directory and a
/// rename, so that readers see either the old file or the complete new one, never a prefix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::io(path, std::io::Error::other("not a file path")))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// The whole of a file a flag names (a tokenizer, a template, a tensor file). A device is refused
/// before it is read: `/dev/zero` or `/dev/urandom` given by mistake would otherwise be read until memory
/// runs out. Pipes and sockets are read (`<(curl ...)`, `/dev/stdin` from a pipe).
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let kind = std::fs::metadata(path)?.file_type();
        if kind.is_char_device() || kind.is_block_device() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a device, not a file",
            ));
        }
    }
    std::fs::read(path)
}

/// What the job tells its caller as it goes (a progress bar, a log).
pub trait Progress: Sync {
    /// Input consumed so far, in bytes (when known: not for standard input).
    fn input_size(&self, _bytes: Option<u64>) {}
    /// Input bytes consumed and rows written so far.
    fn advance(&self, _bytes_read: u64, _rows_written: usize) {}
    /// Something the user should know (a clean-up, a wasteful batch).
    fn note(&self, _message: &str) {}
}

/// A [`Progress`] that reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// This machine's memory in bytes (`MemTotal` of `/proc/meminfo`), when it can be read.
pub fn memory_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}
