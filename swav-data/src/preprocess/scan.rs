//! Finding the input images of a folder.
//!
//! A folder with sub-folders is labelled: each top-level sub-folder is a class (names sorted, label =
//! position), and every file below it, at any depth, is an image of that class. A folder without
//! sub-folders is unlabelled: its files are the images. Symbolic links are followed; a directory reached
//! twice (a symlink loop or a second link to it) is scanned once and the other path is listed as
//! skipped. Hidden entries (name starting with `.`) and anything that is not a regular file or directory
//! are listed as skipped too. Entries are visited in byte order of their names, so the result does not
//! depend on the file system's order.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::manifest::Skipped;

/// One candidate image.
#[derive(Clone, Debug)]
pub(crate) struct FileEntry {
    pub path: PathBuf,
    /// Path relative to the input folder, `/`-separated.
    pub rel: String,
    pub label: Option<u32>,
}

pub(crate) struct Scan {
    pub entries: Vec<FileEntry>,
    pub classes: Vec<String>,
    pub labelled: bool,
    pub skipped: Vec<Skipped>,
}

fn is_loop(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::ELOOP)
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

enum Kind {
    Dir,
    File,
    Skip(String),
}

fn kind_of(path: &Path) -> Kind {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Kind::Dir,
        Ok(m) if m.is_file() => Kind::File,
        Ok(_) => Kind::Skip("not a regular file (device, FIFO or socket)".into()),
        Err(e) if is_loop(&e) => Kind::Skip("symlink loop".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && fs::symlink_metadata(path).is_ok() => {
            Kind::Skip("broken symlink (its target does not exist)".into())
        }
        Err(e) => Kind::Skip(format!("unreadable: {e}")),
    }
}

fn read_sorted(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        out.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
    }
    out.sort_by(|a, b| a.1.as_os_str().as_encoded_bytes().cmp(b.1.as_os_str().as_encoded_bytes()));
    Ok(out)
}

fn join_rel(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_owned()
    } else {
        format!("{rel}/{name}")
    }
}

struct Walker {
    visited: HashSet<PathBuf>,
    entries: Vec<FileEntry>,
    skipped: Vec<Skipped>,
}

impl Walker {
    fn skip(&mut self, rel: String, reason: impl Into<String>) {
        self.skipped.push(Skipped { path: rel, reason: reason.into() });
    }

    fn walk(&mut self, dir: &Path, rel: &str, label: Option<u32>) {
        match fs::canonicalize(dir) {
            Ok(c) => {
                if !self.visited.insert(c) {
                    self.skip(rel.to_owned(), "symlink loop or second link to a directory already scanned");
                    return;
                }
            }
            Err(e) => {
                self.skip(rel.to_owned(), format!("unreadable directory: {e}"));
                return;
            }
        }
        let list = match read_sorted(dir) {
            Ok(l) => l,
            Err(e) => {
                self.skip(rel.to_owned(), format!("unreadable directory: {e}"));
                return;
            }
        };
        for (name, path) in list {
            let r = join_rel(rel, &name);
            if name.starts_with('.') {
                self.skip(r, "hidden entry (name starts with a dot)");
                continue;
            }
            match kind_of(&path) {
                Kind::Dir => self.walk(&path, &r, label),
                Kind::File => self.entries.push(FileEntry { path, rel: r, label }),
                Kind::Skip(reason) => self.skip(r, reason),
            }
        }
    }
}

/// Scans `root` (an existing directory).
pub(crate) fn scan_folder(root: &Path) -> Result<Scan> {
    let input_err = |problem: String| DataError::Input { path: root.to_owned(), problem };
    let top = read_sorted(root).map_err(|e| input_err(format!("cannot list the folder: {e}")))?;
    let mut w = Walker { visited: HashSet::new(), entries: Vec::new(), skipped: Vec::new() };
    if let Ok(c) = fs::canonicalize(root) {
        w.visited.insert(c);
    }
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for (name, path) in top {
        if name.starts_with('.') {
            w.skip(name, "hidden entry (name starts with a dot)");
            continue;
        }
        match kind_of(&path) {
            Kind::Dir => dirs.push((name, path)),
            Kind::File => files.push((name, path)),
            Kind::Skip(reason) => w.skip(name, reason),
        }
    }
    let labelled = !dirs.is_empty();
    let mut classes = Vec::new();
    if labelled {
        for (name, _) in files {
            w.skip(name, "file outside the class folders (a labelled folder has one sub-folder per class)");
        }
        dirs.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, path)) in dirs.into_iter().enumerate() {
            let before = w.entries.len();
            w.walk(&path, &name, Some(i as u32));
            if w.entries.len() == before {
                tracing::warn!("class folder `{name}` holds no file");
            }
            classes.push(name);
        }
    } else {
        for (name, path) in files {
            w.entries.push(FileEntry { path, rel: name, label: None });
        }
    }
    Ok(Scan { entries: w.entries, classes, labelled, skipped: w.skipped })
}
