//! The output folder of `preprocess`, and everything the command may touch around it. The rule: it
//! creates, replaces and deletes only what it owns, and refuses before touching anything otherwise.
//!
//! - It owns, inside a dataset folder, `manifest.json`, `names.json` and the `shard-NNNNN.bin` files
//!   (regular files of those names). `--overwrite` replaces a folder holding only those (or an empty folder); a folder
//!   holding anything else is refused with the foreign entries listed, and left untouched.
//! - Beside the output it owns `.NAME.tmp-PID` (the folder a run builds in) and `.NAME.old-PID` (the
//!   previous dataset while it is swapped out), both of its own pid, and `.NAME.lock` (see [`lock`]).
//!   The leftovers of killed runs, those of pids that are no longer running, are cleaned up by the
//!   next run on the same output; a moved-aside dataset whose output is gone is moved back.
//! - Removing one of its folders removes only the files it owns in it, then the folder if that left it
//!   empty: a file someone else put there is never deleted (the folder stays, with a warning).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use swav_core::lock::{FolderLock, LockError};

use crate::error::{DataError, Result};

/// Whether `name` is a file that `preprocess` writes into a dataset folder.
fn is_owned_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    if name == "manifest.json" || name == super::NAMES_FILE {
        return true;
    }
    // `shard-{:05}.bin`: at least five digits (more beyond 99999 shards).
    name.strip_prefix("shard-")
        .and_then(|n| n.strip_suffix(".bin"))
        .is_some_and(|digits| digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The entries of a folder that `preprocess` does not own (sorted names; sub-folders, links and
/// special files count as foreign even under an owned name).
fn foreign_entries(dir: &Path) -> Result<Vec<String>> {
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !(is_file && is_owned_name(&entry.file_name())) {
            foreign.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    foreign.sort();
    Ok(foreign)
}

/// At most ten names, then how many more.
fn list(names: &[String]) -> String {
    let mut s = names.iter().take(10).map(String::as_str).collect::<Vec<_>>().join(", ");
    if names.len() > 10 {
        s.push_str(&format!(" and {} more", names.len() - 10));
    }
    s
}

/// The folder beside the output where its temporaries and lock live.
pub(super) fn parent_of(output: &Path) -> PathBuf {
    match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn output_name(output: &Path) -> &OsStr {
    output.file_name().expect("check_output refuses outputs without a name")
}

/// `.NAME.KIND-PID` beside the output.
fn sibling(output: &Path, kind: &str, pid: u32) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(output_name(output));
    name.push(format!(".{kind}-{pid}"));
    parent_of(output).join(name)
}

/// Checks that the output may be written: absent, or (with `overwrite`) an empty folder or a folder
/// holding only a dataset's files. Touches nothing.
pub(super) fn check_output(output: &Path, overwrite: bool) -> Result<()> {
    let bad = |problem: String| Err(DataError::Output { path: output.to_owned(), problem });
    let meta = match std::fs::symlink_metadata(output) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DataError::io(output, e)),
    };
    if !overwrite {
        return bad("already exists; pass --overwrite to replace it (the old dataset is replaced only once the new one is complete)".into());
    }
    if meta.is_symlink() {
        let target = std::fs::read_link(output).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
        return bad(format!(
            "is a symbolic link (to {target}); refusing to replace it: give the folder it points to as --output"
        ));
    }
    if !meta.is_dir() {
        return bad(
            "exists and is not a folder; refusing to replace it: choose another --output or remove it yourself".into(),
        );
    }
    let foreign = foreign_entries(output)?;
    if !foreign.is_empty() {
        return bad(format!(
            "is not a swav-data dataset: it holds files that preprocess does not write ({}); --overwrite replaces only a dataset's manifest.json, names.json and shard-NNNNN.bin files: move the others away or choose another --output",
            list(&foreign)
        ));
    }
    let has_manifest = output.join("manifest.json").is_file();
    let is_empty = std::fs::read_dir(output).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !(has_manifest || is_empty) {
        return bad("holds shard files but no manifest.json, so it is not a complete swav-data dataset; refusing to replace it: remove it yourself or choose another --output".into());
    }
    Ok(())
}

/// Takes the exclusive lock of an output, so that two runs never write it at once.
///
/// The lock cannot live in the output (it is renamed away when the new dataset is swapped in) nor in
/// the build folder (its name holds the pid, so every run has another). It is a `swav_core` folder lock
/// on `.NAME.lock`, a hidden folder beside the output: per output, so that runs writing other outputs of
/// the same folder do not wait for each other, and not the parent folder's own lock, which a caller
/// (the pipeline) may hold for its whole run. The folder stays after the run (removing a lock file
/// while another process may be opening it would let two processes hold it); a lock of a process that
/// has exited is recovered automatically.
pub(super) fn lock(output: &Path) -> Result<FolderLock> {
    let mut name = std::ffi::OsString::from(".");
    name.push(output_name(output));
    name.push(".lock");
    let dir = parent_of(output).join(name);
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    FolderLock::acquire(&dir).map_err(|e| match e {
        LockError::Held { pid, .. } => DataError::Output {
            path: output.to_owned(),
            problem: format!(
                "another preprocess run (pid {pid}) is writing this output; wait for it to finish or stop it (the lock of a process that has exited is recovered automatically)"
            ),
        },
        LockError::Io { path, source } => DataError::io(path, source),
    })
}

/// Whether process `pid` is running (or may be: anything but a clear "no such process" counts as yes,
/// so that a doubt never deletes a live run's files).
#[cfg(unix)]
fn process_is_running(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 sends nothing; the call only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(not(unix))]
fn process_is_running(_pid: u32) -> bool {
    true
}

/// The pid of a leftover named exactly `.NAME.KIND-PID` for this output (PID in its canonical decimal
/// form), if `name` is one.
fn leftover_pid(output: &Path, name: &OsStr, kind: &str) -> Option<u32> {
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(output_name(output).as_encoded_bytes());
    prefix.extend_from_slice(format!(".{kind}-").as_bytes());
    let digits = name.as_encoded_bytes().strip_prefix(prefix.as_slice())?;
    let text = std::str::from_utf8(digits).ok()?;
    let pid: u32 = text.parse().ok()?;
    (pid.to_string() == text).then_some(pid)
}

/// Removes the files `preprocess` owns in `dir`, then `dir` if that emptied it. Returns the entries
/// left (foreign ones), empty when the folder is gone.
pub(super) fn remove_owned_dir(dir: &Path) -> Result<Vec<String>> {
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && is_owned_name(&entry.file_name()) {
            std::fs::remove_file(entry.path()).map_err(|e| DataError::io(entry.path(), e))?;
        }
    }
    let left = foreign_entries(dir)?;
    if left.is_empty() {
        std::fs::remove_dir(dir).map_err(|e| DataError::io(dir, e))?;
    }
    Ok(left)
}

/// Cleans up after killed runs on this output (call it holding the output's lock): folders named
/// exactly `.NAME.tmp-PID` or `.NAME.old-PID` whose process is not running lose the files a run writes,
/// and go if that empties them. When the output itself is missing, a moved-aside dataset is moved back
/// first (a run killed between moving the old dataset aside and moving the new one in). Says on the
/// console what it did.
pub(super) fn clean_leftovers(output: &Path) -> Result<()> {
    let parent = parent_of(output);
    let mut stale_tmp = Vec::new();
    let mut stale_old = Vec::new();
    let entries = match std::fs::read_dir(&parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DataError::io(&parent, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(&parent, e))?;
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue; // runs only leave folders; a file of that name is not theirs
        }
        let name = entry.file_name();
        let (pid, list) = if let Some(pid) = leftover_pid(output, &name, "tmp") {
            (pid, &mut stale_tmp)
        } else if let Some(pid) = leftover_pid(output, &name, "old") {
            (pid, &mut stale_old)
        } else {
            continue;
        };
        if pid != std::process::id() && !process_is_running(pid) {
            list.push(entry.path());
        }
    }
    stale_old.sort();
    if std::fs::symlink_metadata(output).is_err() {
        if let Some(i) = stale_old.iter().position(|d| d.join("manifest.json").is_file()) {
            let old = stale_old.remove(i);
            std::fs::rename(&old, output).map_err(|e| DataError::io(&old, e))?;
            tracing::warn!(
                "restored {} from {} (a run was killed while replacing it)",
                output.display(),
                old.display()
            );
        }
    }
    for dir in stale_tmp.iter().chain(&stale_old) {
        let left = remove_owned_dir(dir)?;
        if left.is_empty() {
            tracing::warn!("removed {}, the leftover of a killed preprocess run", dir.display());
        } else {
            tracing::warn!(
                "removed the dataset files of {}, the leftover of a killed preprocess run, and kept the folder: it holds files preprocess did not write ({})",
                dir.display(),
                list(&left)
            );
        }
    }
    Ok(())
}

/// The hidden folder a run builds in (`.NAME.tmp-PID`); removed (its owned files) on drop unless
/// committed.
pub(super) struct TempDir {
    pub path: PathBuf,
    committed: bool,
}

impl TempDir {
    pub fn create(output: &Path) -> Result<TempDir> {
        let path = sibling(output, "tmp", std::process::id());
        if std::fs::symlink_metadata(&path).is_ok() {
            // Our own pid: a run of this process that could not clean up, or a dead process's pid reused.
            let left = remove_owned_dir(&path)?;
            if !left.is_empty() {
                return Err(DataError::Output {
                    path: path.clone(),
                    problem: format!(
                        "this build folder of preprocess holds files it did not write ({}): move them away",
                        list(&left)
                    ),
                });
            }
        }
        std::fs::create_dir(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(TempDir { path, committed: false })
    }

    /// Moves the finished folder to `output`, replacing the dataset there (whose owned files only are
    /// deleted). Checks again, just before, that the output holds nothing foreign: files may have been
    /// put there while the run was working.
    pub fn commit(mut self, output: &Path, overwrite: bool) -> Result<()> {
        check_output(output, overwrite)?;
        let old = if std::fs::symlink_metadata(output).is_ok() {
            let old = sibling(output, "old", std::process::id());
            std::fs::rename(output, &old).map_err(|e| DataError::io(output, e))?;
            Some(old)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&self.path, output) {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, output);
            }
            return Err(DataError::io(output, e));
        }
        self.committed = true;
        sync_dir(&parent_of(output));
        if let Some(old) = old {
            match remove_owned_dir(&old) {
                Ok(left) if left.is_empty() => {}
                Ok(left) => tracing::warn!(
                    "kept {}: files were put into the old dataset while it was being replaced ({}); the dataset files themselves are gone",
                    old.display(),
                    list(&left)
                ),
                Err(e) => tracing::warn!("could not remove the old dataset in {}: {e}", old.display()),
            }
        }
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.committed {
            match remove_owned_dir(&self.path) {
                Ok(left) if left.is_empty() => {}
                Ok(left) => tracing::warn!(
                    "kept {}: it holds files preprocess did not write ({})",
                    self.path.display(),
                    list(&left)
                ),
                Err(e) => tracing::warn!("could not remove {}: {e}", self.path.display()),
            }
        }
    }
}

/// Makes a rename in `dir` durable (best effort).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_names_are_exactly_the_manifest_and_shards() {
        for ok in ["manifest.json", "shard-00000.bin", "shard-12345.bin", "shard-123456.bin"] {
            assert!(is_owned_name(OsStr::new(ok)), "{ok}");
        }
        for no in [
            "NOTES.txt",
            "shard-0000.bin",
            "shard-0000a.bin",
            "shard-00000.bin.bak",
            ".manifest.json",
            "Shard-00000.bin",
            "manifest.json~",
            "",
        ] {
            assert!(!is_owned_name(OsStr::new(no)), "{no}");
        }
    }

    #[test]
    fn leftover_names_must_match_exactly() {
        let out = Path::new("/data/ds");
        assert_eq!(leftover_pid(out, OsStr::new(".ds.tmp-123"), "tmp"), Some(123));
        assert_eq!(leftover_pid(out, OsStr::new(".ds.old-9"), "old"), Some(9));
        for no in [
            ".ds.tmp-",
            ".ds.tmp-0123",
            ".ds.tmp-12x",
            ".ds.tmp--1",
            ".ds.tmp-+1",
            ".dsx.tmp-1",
            "ds.tmp-1",
            ".ds.lock",
            ".ds.tmp-99999999999",
        ] {
            assert_eq!(leftover_pid(out, OsStr::new(no), "tmp"), None, "{no}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn running_processes_are_recognised() {
        assert!(process_is_running(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_is_running(pid));
    }
}
