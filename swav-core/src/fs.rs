//! Atomic file writes: the bytes go to a temporary file in the same folder (`.NAME.tmp-PID`), are
//! synced to disk, and the file is renamed over the real name, then the folder is synced. A crash at
//! any moment leaves either the old file or the new one under the real name, never a partial file.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A file operation that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FsError {
    /// The file or folder.
    pub path: PathBuf,
    /// What the system said.
    #[source]
    pub source: std::io::Error,
}

impl FsError {
    /// An error about `path`.
    pub fn new(path: &Path, source: std::io::Error) -> FsError {
        FsError { path: path.to_path_buf(), source }
    }
}

/// The temporary name [`atomic_write`] uses for `path` in this process: `.NAME.tmp-PID` beside it.
pub fn temporary_path(path: &Path) -> PathBuf {
    let dir = parent_dir(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    if path.file_name().is_none() {
        return Err(FsError::new(path, std::io::Error::other("not a file path")));
    }
    let dir = parent_dir(path);
    let tmp = temporary_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the folder's entry is on disk too.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| FsError::new(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        atomic_write(&path, b"one").unwrap();
        atomic_write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);
    }

    #[test]
    fn a_failed_write_names_the_path_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/folder/a.txt");
        let err = atomic_write(&missing, b"x").unwrap_err();
        assert!(err.to_string().contains("no/such/folder/a.txt"), "{err}");
    }
}
