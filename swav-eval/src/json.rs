//! The JSON files of the evaluations (reports, run descriptions, sidecars): pretty, written
//! atomically (temporary file, fsync, rename), read with a message that names the file.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use swav_core::fs::FsError;

use crate::EvalError;

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<(), EvalError> {
    let mut json = serde_json::to_vec_pretty(value).expect("reports serialise");
    json.push(b'\n');
    swav_core::fs::atomic_write(path, &json)?;
    Ok(())
}

/// Reads a JSON file written by [`write`]; `what` names its kind in the error.
pub fn read<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T, EvalError> {
    let bytes = std::fs::read(path).map_err(|e| FsError::new(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| EvalError::Invalid(format!("{}: not {what} ({e})", path.display())))
}
