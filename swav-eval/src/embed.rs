//! Features for use outside swav-rs: pooled backbone features of a dataset as a NumPy `.npy` file
//! (float32 `[n, F]`, row i = image i) and, optionally, its labels (int64 `[n]`), written atomically
//! with swav-core's `.npy` codec; `numpy.load` reads both.

use std::path::Path;

use swav_data::Dataset;

use swav_core::npy;

use swav_model::{ModelFile, Overrides};

use crate::features::{extract_features, input_transform, ExtractOptions, Features};
use crate::EvalError;

/// What [`embed`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbedSummary {
    /// Rows written (every image of the dataset).
    pub images: usize,
    /// Columns written: the backbone's feature channels.
    pub feature_dim: usize,
    /// Whether a labels file was written.
    pub labels: bool,
    /// Shorter side the images were resized to, in pixels.
    pub resize: usize,
    /// Side of the centre crop fed to the network, in pixels.
    pub crop: usize,
}

/// Writes the features of every image of `dataset` to `output` (`<f4`, `[n, F]`) and, when
/// `labels_output` is given, its labels (`<i8`, `[n]`; the dataset must be labelled).
/// `input_size` and the normalisation follow [`crate::features`].
pub fn embed(
    checkpoint: &Path,
    dataset: &Dataset,
    output: &Path,
    labels_output: Option<&Path>,
    input_size: Option<usize>,
    opts: &ExtractOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<EmbedSummary, EvalError> {
    if labels_output.is_some() && !dataset.manifest().labelled {
        return Err(EvalError::Invalid(format!(
            "the data in {} has no labels: leave out the labels output",
            dataset.dir().display()
        )));
    }
    let mut file = ModelFile::read_with(checkpoint, &Overrides { input_size, ..Overrides::default() })?;
    file.model.to_device(opts.device)?;
    let (model, transform) = (&file.model, input_transform(&file.preprocessing)?);
    let f: Features = extract_features(model, dataset, &transform, opts, progress)?;
    npy::write(output, &[f.n, f.dim], &f.data)?;
    if let Some(path) = labels_output {
        let labels: Vec<i64> = f.labels_for("the labels file")?.iter().map(|&l| l as i64).collect();
        npy::write(path, &[f.n], &labels)?;
    }
    Ok(EmbedSummary {
        images: f.n,
        feature_dim: f.dim,
        labels: labels_output.is_some(),
        resize: transform.resize,
        crop: transform.crop,
    })
}
