//! Per-step metrics as JSON lines in `<run-dir>/metrics.jsonl`, one object per iteration:
//! `{"step", "epoch", "loss", "lr", "images_per_s", "data_wait", "cluster_entropy", "clusters_used",
//! "elapsed_s"}`. Each line is flushed as it is written, so a crash loses at most the line in flight;
//! on resume the lines after the checkpoint's step are dropped, so the file always describes one run.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TrainError;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub images_per_s: f64,
    /// Fraction of the step's wall time spent waiting for the data loader.
    pub data_wait: f64,
    pub cluster_entropy: f64,
    pub clusters_used: usize,
    pub elapsed_s: f64,
}

pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `<run_dir>/metrics.jsonl`, keeping only the lines of steps `< keep_below` (and dropping a
    /// truncated last line).
    pub fn open(run_dir: &Path, keep_below: usize) -> Result<MetricsLog, TrainError> {
        let path = run_dir.join("metrics.jsonl");
        let io = |source| TrainError::Io { path: path.display().to_string(), source };
        let mut kept = Vec::new();
        if path.exists() {
            for line in BufReader::new(File::open(&path).map_err(io)?).lines() {
                let line = line.map_err(io)?;
                if let Ok(m) = serde_json::from_str::<StepMetrics>(&line) {
                    if m.step < keep_below {
                        kept.push(line);
                    }
                }
            }
        }
        let mut file = OpenOptions::new().create(true).write(true).truncate(true).open(&path).map_err(io)?;
        for line in kept {
            writeln!(file, "{line}").map_err(io)?;
        }
        Ok(MetricsLog { file, path })
    }

    pub fn write(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        let line = serde_json::to_string(m).expect("metrics serialise");
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|source| TrainError::Io { path: self.path.display().to_string(), source })
    }
}

/// Reads every complete line of a metrics file.
pub fn read(run_dir: &Path) -> Result<Vec<StepMetrics>, TrainError> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io { path: path.display().to_string(), source })?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}
