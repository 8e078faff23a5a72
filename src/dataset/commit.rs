//! Committing a dataset directory so that it is never lost or mixed: at every instant the output path holds
//! exactly one complete dataset, the old one or the new one.
//!
//! - **Lock.** `<parent>/.<name>.sft-collate.lock`, an advisory `flock` held for the whole run: a second
//!   run on the same output fails at once (or waits, on request). The lock file stays (removing a lock
//!   file races with its next user); it holds the last owner's process id.
//! - **Staging.** The new dataset is written into `<parent>/.<name>.sft-collate-<pid>.staging`, a sibling
//!   of the output on the same file system; the output path is not touched (not even created) before the
//!   commit.
//! - **Commit.** One `renameat2(RENAME_EXCHANGE)` swaps the complete new directory with the old one (or a
//!   plain rename puts it in place when there is none); the old dataset, now under the staging name, is
//!   removed after. A run killed at any point leaves the old dataset or the new one at the output path,
//!   never a mix, never nothing. A reader holding the old manifest may find its files removed after the
//!   swap, but never a file of the other dataset under an old name.
//! - **Clean-up.** Whatever a dead run left (its staging directory, or an old dataset it swapped out and
//!   did not remove) is removed by the next run on the same output, which holds the lock and so knows that
//!   no other run is using them, and is reported.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::manifest::MANIFEST_FILE;
use crate::{Error, Result};

/// For the crash-consistency tests: when `SFT_COLLATE_TEST_CRASH_AT` names this point, the process
/// aborts here (no destructor runs, as under `kill -9`). Points: `staged-N` (N files written to the
/// staging directory), `before-commit`, `after-exchange`.
pub(crate) fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("SFT_COLLATE_TEST_CRASH_AT").ok());
    if at.as_deref() == Some(point) {
        std::process::abort();
    }
}

/// The name of a batch file this crate writes.
pub fn is_batch_file(name: &str) -> bool {
    name.starts_with("batch-") && name.ends_with(".safetensors")
}

/// The output directory of a run, locked.
pub(crate) struct OutputDir {
    output: PathBuf,
    parent: PathBuf,
    name: String,
    _lock: File,
    /// Ancestors this run created (removed again if it fails), deepest last.
    created: Vec<PathBuf>,
}

impl OutputDir {
    /// Check `output`, create its missing ancestors, take the lock (waiting for it when `wait`), and
    /// remove what dead runs left behind (returned, to be reported). A directory that exists must be
    /// empty, or a dataset this crate wrote and `overwrite` set.
    pub(crate) fn open(output: &Path, overwrite: bool, wait: bool) -> Result<(Self, Vec<PathBuf>)> {
        Self::open_with(output, overwrite, wait, "a dataset", |n| {
            n == MANIFEST_FILE || is_batch_file(n)
        })
    }

    /// The same for another kind of output (`what`, e.g. "an export"), whose files `ours` recognises.
    pub(crate) fn open_with(
        output: &Path,
        overwrite: bool,
        wait: bool,
        what: &'static str,
        ours: fn(&str) -> bool,
    ) -> Result<(Self, Vec<PathBuf>)> {
        let name = output
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| *n != "." && *n != "..")
            .ok_or_else(|| Error::InvalidOption {
                name: "output",
                reason: format!("{} does not end in a directory name", output.display()),
            })?
            .to_string();
        let parent = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if output.exists() && !output.is_dir() {
            return Err(Error::InvalidOption {
                name: "output",
                reason: format!("{} exists and is not a directory", output.display()),
            });
        }
        let created = create_ancestors(&parent)?;
        let mut dir = OutputDir {
            output: output.to_path_buf(),
            parent,
            name,
            _lock: File::open("/dev/null").map_err(|e| Error::io("/dev/null", e))?,
            created,
        };
        dir._lock = dir.lock(wait)?;
        let removed = dir.remove_leftovers()?;
        dir.check_existing(overwrite, what, ours)?;
        Ok((dir, removed))
    }

    fn lock_path(&self) -> PathBuf {
        self.parent.join(format!(".{}.sft-collate.lock", self.name))
    }

    fn lock(&self, wait: bool) -> Result<File> {
        let path = self.lock_path();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                // Named after the output the user gave, with the lock file as the reason's detail.
                let reason = format!(
                    "cannot create the lock file {} beside it: {e}",
                    path.display()
                );
                Error::io(&self.output, std::io::Error::new(e.kind(), reason))
            })?;
        let mode = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), mode) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(Error::OutputBusy {
                    path: self.output.clone(),
                    owner: owner.trim().parse().ok(),
                });
            }
            return Err(Error::io(&path, err));
        }
        let _ = file.set_len(0);
        let _ = write!(file, "{}", std::process::id());
        Ok(file)
    }

    /// Staging directories of dead runs (and datasets they swapped out), and the staging directories older
    /// versions made inside the output directory. Only called with the lock held.
    fn remove_leftovers(&self) -> Result<Vec<PathBuf>> {
        let prefix = format!(".{}.sft-collate-", self.name);
        let mut removed = Vec::new();
        let mut candidates: Vec<PathBuf> = list(&self.parent)?
            .into_iter()
            .filter(|n| n.starts_with(&prefix) && n.ends_with(".staging"))
            .map(|n| self.parent.join(n))
            .collect();
        if self.output.is_dir() {
            candidates.extend(
                list(&self.output)?
                    .into_iter()
                    .filter(|n| n.starts_with(".sft-collate-staging-"))
                    .map(|n| self.output.join(n)),
            );
        }
        for path in candidates {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        }
        Ok(removed)
    }

    fn check_existing(&self, overwrite: bool, what: &str, ours: fn(&str) -> bool) -> Result<()> {
        if !self.output.is_dir() {
            return Ok(());
        }
        let names = list(&self.output)?;
        if names.is_empty() {
            return Ok(());
        }
        let foreign: Vec<&String> = names.iter().filter(|n| !ours(n)).collect();
        if !foreign.is_empty() {
            let shown: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
            return Err(Error::InvalidOption {
                name: "output",
                reason: format!(
                    "{} holds files that are not {what} ({}{}): choose an empty or new directory",
                    self.output.display(),
                    shown.join(", "),
                    if foreign.len() > 5 { ", ..." } else { "" }
                ),
            });
        }
        if !overwrite {
            return Err(Error::InvalidOption {
                name: "output",
                reason: format!(
                    "{} already holds {what} (pass overwrite to replace it)",
                    self.output.display()
                ),
            });
        }
        Ok(())
    }

    /// A new, empty staging directory for this run.
    pub(crate) fn staging(&self) -> Result<Staging> {
        let path = self.parent.join(format!(
            ".{}.sft-collate-{}.staging",
            self.name,
            std::process::id()
        ));
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Staging { path: Some(path) })
    }

    /// Put the complete dataset in `staging` at the output path in one step, then remove the old one.
    pub(crate) fn commit(&mut self, mut staging: Staging) -> Result<()> {
        let from = staging
            .path
            .take()
            .expect("a staging directory commits once");
        crash_point("before-commit");
        let result = if self.output.exists() {
            exchange(&from, &self.output)
        } else {
            std::fs::rename(&from, &self.output).map_err(|e| Error::io(&self.output, e))
        };
        match result {
            Ok(()) => {
                crash_point("after-exchange");
                // `from` now holds the old dataset (or nothing, after a plain rename).
                if from.exists() {
                    std::fs::remove_dir_all(&from).map_err(|e| Error::io(&from, e))?;
                }
                self.created.clear();
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&from);
                Err(e)
            }
        }
    }
}

impl Drop for OutputDir {
    /// A run that did not commit leaves no directory it created (nor the lock file in it).
    fn drop(&mut self) {
        if !self.created.is_empty() {
            let _ = std::fs::remove_file(self.lock_path());
        }
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A staging directory, removed on drop unless committed.
pub(crate) struct Staging {
    path: Option<PathBuf>,
}

impl Staging {
    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().expect("not committed yet")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

fn list(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Create the missing directories of `dir`; returns those created, outermost first.
fn create_ancestors(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(p.to_path_buf());
        at = p.parent();
    }
    missing.reverse();
    for p in &missing {
        std::fs::create_dir(p).map_err(|e| Error::io(p, e))?;
    }
    Ok(missing)
}

/// Swap two directories atomically (Linux `renameat2(RENAME_EXCHANGE)`). Where the file system cannot,
/// two renames, with a moment in between when `b` is absent.
fn exchange(a: &Path, b: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c =
            |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|e| Error::io(p, e.into()));
        let (ca, cb) = (c(a)?, c(b)?);
        // SAFETY: both arguments are valid NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(Error::io(b, err));
        }
    }
    let aside = a.with_extension("old.staging");
    std::fs::rename(b, &aside).map_err(|e| Error::io(b, e))?;
    std::fs::rename(a, b).map_err(|e| Error::io(b, e))?;
    std::fs::rename(&aside, a).map_err(|e| Error::io(a, e))
}
