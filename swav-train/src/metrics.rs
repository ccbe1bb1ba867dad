//! Per-step metrics as JSON lines in `<run-dir>/metrics.jsonl`, one object per iteration. [`StepMetrics`]
//! is the one schema of the file, for the trainer that writes it and for every reader (the run
//! report): readers are lenient, since a crash can cut the last line short and other tools may add
//! keys. Every field but `step` may be missing or `null` (a non-finite loss is written as `null`);
//! unknown keys are ignored; lines that do not parse are counted, not fatal.
//!
//! Each line is flushed as it is written, so a crash loses at most the line in flight; on resume the
//! lines after the checkpoint's step are dropped, so the file always describes one run.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// The file name of the metrics in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// The iteration (0-based, counted over the whole run).
    pub step: u64,
    /// The epoch the iteration belongs to.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// The SwAV loss (`null` when not finite).
    #[serde(default)]
    pub loss: Option<f64>,
    /// The learning rate of the iteration.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Images per second of the iteration, data wait included.
    #[serde(default)]
    pub images_per_s: Option<f64>,
    /// Fraction of the step's wall time spent waiting for the data loader.
    #[serde(default)]
    pub data_wait: Option<f64>,
    /// Entropy (nats) of the mean code of the first assigned crop.
    #[serde(default)]
    pub cluster_entropy: Option<f64>,
    /// Prototypes that are the argmax code of at least one image of the batch.
    #[serde(default)]
    pub clusters_used: Option<u64>,
    /// Seconds since this process started training.
    #[serde(default)]
    pub elapsed_s: Option<f64>,
}

/// Appends metrics to a run's `metrics.jsonl`.
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

impl MetricsLog {
    /// Opens `<run_dir>/metrics.jsonl`, keeping only the lines of steps `< keep_below` (and dropping
    /// lines that do not parse, such as a truncated last line).
    pub fn open(run_dir: &Path, keep_below: u64) -> Result<MetricsLog, TrainError> {
        let path = run_dir.join(METRICS_FILE);
        let mut kept = Vec::new();
        if path.exists() {
            for line in BufReader::new(File::open(&path).map_err(io(&path))?).lines() {
                let line = line.map_err(io(&path))?;
                if let Ok(m) = serde_json::from_str::<StepMetrics>(&line) {
                    if m.step < keep_below {
                        kept.push(line);
                    }
                }
            }
        }
        let mut file = OpenOptions::new().create(true).write(true).truncate(true).open(&path).map_err(io(&path))?;
        for line in kept {
            writeln!(file, "{line}").map_err(io(&path))?;
        }
        Ok(MetricsLog { file, path })
    }

    /// Appends one line and flushes it.
    pub fn write(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        let line = serde_json::to_string(m).expect("metrics serialise");
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(io(&self.path))
    }
}

/// The lines of a metrics file that parse, and how many did not.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsFile {
    /// The readable lines, in file order.
    pub rows: Vec<StepMetrics>,
    /// Non-empty lines that did not parse.
    pub skipped_lines: usize,
}

/// Reads a metrics file leniently (see the module docs).
pub fn read(path: &Path) -> Result<MetricsFile, TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut file = MetricsFile::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match serde_json::from_str::<StepMetrics>(line) {
            Ok(row) => file.rows.push(row),
            Err(_) => file.skipped_lines += 1,
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_tolerate_nulls_missing_keys_unknown_keys_and_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let full = StepMetrics { step: 3, epoch: Some(1), loss: Some(f64::NAN), lr: Some(0.1), ..Default::default() };
        let line = serde_json::to_string(&full).unwrap();
        assert!(line.contains("\"loss\":null"), "{line}");
        std::fs::write(&path, format!("{line}\n{{\"step\": 4, \"extra\": 1}}\n{{\"step\": 5, \"lo")).unwrap();
        let read = read(&path).unwrap();
        assert_eq!(read.skipped_lines, 1);
        assert_eq!(read.rows.len(), 2);
        assert_eq!((read.rows[0].loss, read.rows[0].lr), (None, Some(0.1)));
        assert_eq!((read.rows[1].step, read.rows[1].loss), (4, None));
    }
}
