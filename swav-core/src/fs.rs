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

/// Whether a process with this id is running (on non-Unix systems: assumed running, so nothing of a
/// possibly live process is ever removed).
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: kill with signal 0 only checks for the process; no signal is sent.
        let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// The process id in a temporary name written by [`atomic_write`] (or any `.NAME.tmp-PID`).
fn temporary_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once(".tmp-")?;
    pid.parse().ok()
}

/// Removes the temporary files and folders (`.NAME.tmp-PID`) that processes which no longer run left
/// in `dir` when they were killed mid-write, and returns what it removed. Only names of exactly that
/// pattern are considered, and never those of a running process.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>, FsError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(FsError::new(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| FsError::new(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temporary_pid(&name) else { continue };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| FsError::new(&path, e))?;
        let result = if kind.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        result.map_err(|e| FsError::new(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// An output that would overwrite an input of the same command, or another output.
#[derive(Debug, thiserror::Error)]
#[error("the {output_role} {} would overwrite the {input_role} {}: choose another output path", output.display(), input.display())]
pub struct PathConflict {
    /// The output path.
    pub output: PathBuf,
    /// What the output is (e.g. `features file`).
    pub output_role: String,
    /// The input (or earlier output) it collides with.
    pub input: PathBuf,
    /// What that is (e.g. `model file`, `dataset folder`).
    pub input_role: String,
}

/// The absolute, symlink-free form of a path that may not exist yet: the longest existing prefix is
/// resolved by the system, the rest lexically (`.` dropped, `..` removes the previous part).
fn resolved(path: &Path) -> PathBuf {
    use std::path::Component;
    let absolute =
        if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    let mut out = PathBuf::new();
    let mut existing = true;
    for part in absolute.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => {
                out.push(other);
                if existing {
                    match std::fs::canonicalize(&out) {
                        Ok(p) => out = p,
                        Err(_) => existing = false,
                    }
                }
            }
        }
    }
    out
}

/// Refuses outputs that are one of the inputs, lie inside an input folder, or are the same file as
/// another output. Each path comes with its role, for the message.
pub fn check_outputs(inputs: &[(&Path, &str)], outputs: &[(&Path, &str)]) -> Result<(), PathConflict> {
    let conflict = |(out, out_role): (&Path, &str), (inp, in_role): (&Path, &str)| PathConflict {
        output: out.to_path_buf(),
        output_role: out_role.to_string(),
        input: inp.to_path_buf(),
        input_role: in_role.to_string(),
    };
    let inputs: Vec<(PathBuf, (&Path, &str))> = inputs.iter().map(|&(p, r)| (resolved(p), (p, r))).collect();
    let mut seen: Vec<(PathBuf, (&Path, &str))> = Vec::new();
    for &(out, role) in outputs {
        let o = resolved(out);
        for (i, orig) in &inputs {
            if &o == i || o.starts_with(i) {
                return Err(conflict((out, role), *orig));
            }
        }
        if let Some((_, orig)) = seen.iter().find(|(s, _)| s == &o) {
            return Err(conflict((out, role), *orig));
        }
        seen.push((o, (out, role)));
    }
    Ok(())
}

#[cfg(test)]
mod safety_tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_dead_processes_go_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join(".a.json.tmp-999999999"), "x").unwrap();
        std::fs::create_dir(d.join(".data.tmp-999999998")).unwrap();
        std::fs::write(d.join(format!(".mine.tmp-{}", std::process::id())), "x").unwrap();
        std::fs::write(d.join("notes.tmp-999999999"), "x").unwrap();
        std::fs::write(d.join(".b.tmp-abc"), "x").unwrap();
        let mut removed: Vec<String> = remove_stale_temporaries(d)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        removed.sort();
        assert_eq!(removed, [".a.json.tmp-999999999", ".data.tmp-999999998"]);
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 3);
        assert!(process_alive(std::process::id()));
    }

    #[test]
    fn outputs_may_not_overwrite_inputs_enter_input_folders_or_collide() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let model = d.join("m.safetensors");
        std::fs::write(&model, "x").unwrap();
        let data = d.join("data");
        std::fs::create_dir(&data).unwrap();
        let inputs = [(model.as_path(), "model file"), (data.as_path(), "dataset folder")];
        let ok = [(d.join("f.npy"), "features"), (d.join("l.npy"), "labels")];
        check_outputs(&inputs, &ok.iter().map(|(p, r)| (p.as_path(), *r)).collect::<Vec<_>>()).unwrap();
        let err = check_outputs(&inputs, &[(&d.join("./m.safetensors"), "ONNX file")]).unwrap_err();
        assert!(err.to_string().contains("model file"), "{err}");
        let err = check_outputs(&inputs, &[(&data.join("manifest.json"), "features")]).unwrap_err();
        assert!(err.to_string().contains("dataset folder"), "{err}");
        let same = d.join("f.npy");
        let err = check_outputs(&inputs, &[(&same, "features"), (&d.join("sub/../f.npy"), "labels")]).unwrap_err();
        assert!(err.to_string().contains("labels") && err.to_string().contains("features"), "{err}");
    }
}
