//! Exclusive locks on run and output folders, so that two processes never write the same run: the
//! second one stops at once with an error naming the holder's process id.
//!
//! The lock is an advisory `flock` on a file in the folder (`.lock`), which also records the holder's
//! pid for the message. The kernel releases it when the holder exits, however it exits, so a lock
//! left by a killed process is recovered by the next start without any clean-up (the stale file
//! stays and is simply locked again).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside a locked folder.
pub const LOCK_FILE: &str = ".lock";

/// Why a folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("{} is in use by another process (pid {pid}); wait for it to finish or stop it (a lock of a process that has exited is recovered automatically)", dir.display())]
    Held {
        /// The locked folder.
        dir: PathBuf,
        /// The holder's process id, as it recorded it (`?` when unreadable).
        pid: String,
    },
    /// The lock file could not be created or locked.
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive lock on a folder, held until dropped.
#[derive(Debug)]
pub struct FolderLock {
    file: File,
    path: PathBuf,
}

impl FolderLock {
    /// Locks `dir` (which must exist), or fails at once if another process holds it.
    pub fn acquire(dir: &Path) -> Result<FolderLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io { path: path.clone(), source };
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        // An empty lock file that is still locked is being released or just taken: a process that
        // forked while holding it keeps the lock until the child's exec closes the descriptor. Such a
        // lock is tried again for a moment before it counts as held.
        let mut tries = 0;
        while !try_lock(&file).map_err(io)? {
            let mut pid = String::new();
            file.rewind().map_err(io)?;
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim().to_string();
            tries += 1;
            if !pid.is_empty() || tries > 40 {
                let pid = if pid.is_empty() { "?".into() } else { pid };
                return Err(LockError::Held { dir: dir.to_path_buf(), pid });
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).and_then(|_| file.flush()).map_err(io)?;
        Ok(FolderLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Closing the file releases the lock; emptying it first keeps a stale pid from being shown.
        let _ = self.file.set_len(0);
    }
}

#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(err)
    }
}

#[cfg(not(unix))]
fn try_lock(file: &File) -> std::io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = FolderLock::acquire(dir.path()).unwrap();
        let err = FolderLock::acquire(dir.path()).unwrap_err();
        match &err {
            LockError::Held { pid, .. } => assert_eq!(pid, &std::process::id().to_string()),
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("in use"), "{err}");
        drop(first);
        FolderLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_stale_lock_file_of_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "999999999").unwrap();
        FolderLock::acquire(dir.path()).unwrap();
    }
}
