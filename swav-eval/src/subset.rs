//! The labelled subset of a semi-supervised evaluation: which training images may be used.
//!
//! - A list file ([`Selection::List`]): one entry per line (blank lines and lines starting with `#`
//!   ignored), each the source name of an image as the dataset records it (`Dataset::names`: the path
//!   relative to the input folder, e.g. `n01440764/n01440764_10026.JPEG`, or `#k` for record `k` of an
//!   IDX file), or its file name alone when exactly one image has it (the official 1% / 10% ImageNet
//!   lists give `n01440764_10026.JPEG`), or an image index (`0` .. `len - 1`). Names are tried first,
//!   then indices. An entry that matches nothing, matches several images, or selects an image twice
//!   is refused, naming it: a silently shorter subset would change the protocol.
//! - A fraction ([`Selection::Fraction`]): `round(fraction * n)` images (at least 1) drawn with a
//!   fixed seed, or, class-balanced, `round(fraction * n_c)` (at least 1) of each class `c`. The draw
//!   is a SplitMix64 shuffle keyed by (seed, class), so a seed gives the same subset everywhere.
//!
//! The indices come back sorted, with the per-class counts and a digest that a run records, so that
//! resuming with another subset is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use swav_core::rng::SplitMix64;
use swav_data::Dataset;

use crate::EvalError;

/// How the subset is chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Selection {
    /// Every image.
    All,
    /// The images a list file names (see the module docs).
    List {
        /// The list file.
        path: PathBuf,
    },
    /// A random fraction of the images.
    Fraction {
        /// In `(0, 1]`.
        fraction: f64,
        /// Seed of the draw.
        seed: u64,
        /// The same fraction of every class.
        balanced: bool,
    },
}

/// The chosen images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subset {
    /// How they were chosen.
    pub selection: Selection,
    /// Dataset indices, ascending.
    #[serde(skip)]
    pub indices: Vec<usize>,
    /// Number of images.
    pub images: usize,
    /// Images of each class (dataset class order).
    pub per_class: Vec<usize>,
    /// SHA-256 of the indices (little-endian u64s): the identity of the subset.
    pub sha256: String,
}

impl Subset {
    fn new(dataset: &Dataset, selection: Selection, mut indices: Vec<usize>) -> Subset {
        indices.sort_unstable();
        let mut per_class = vec![0; dataset.classes().len()];
        for &i in &indices {
            if let Some(n) = dataset.label(i).and_then(|l| per_class.get_mut(l as usize)) {
                *n += 1;
            }
        }
        let mut h = Sha256::new();
        indices.iter().for_each(|&i| h.update((i as u64).to_le_bytes()));
        let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Subset { selection, images: indices.len(), indices, per_class, sha256 }
    }
}

/// Stream tag of the subset draws ("SUBSET" in ASCII).
const SUBSET_STREAM: u64 = 0x5355_4253_4554;

/// Chooses the images of `dataset` that `selection` asks for.
pub fn select(dataset: &Dataset, selection: &Selection) -> Result<Subset, EvalError> {
    let indices = match selection {
        Selection::All => (0..dataset.len()).collect(),
        Selection::List { path } => {
            let text = std::fs::read_to_string(path).map_err(|e| swav_core::fs::FsError::new(path, e))?;
            from_list(dataset, &text, path)?
        }
        &Selection::Fraction { fraction, seed, balanced } => from_fraction(dataset, fraction, seed, balanced)?,
    };
    if indices.is_empty() {
        return Err(EvalError::Invalid(format!("the subset of {} is empty", dataset.dir().display())));
    }
    Ok(Subset::new(dataset, selection.clone(), indices))
}

/// The indices a list names (see the module docs); `path` is for the messages.
pub fn from_list(dataset: &Dataset, text: &str, path: &Path) -> Result<Vec<usize>, EvalError> {
    let names = dataset.names()?;
    let (mut exact, mut base): (HashMap<&str, usize>, HashMap<&str, Vec<usize>>) = Default::default();
    for (i, name) in names.iter().flatten().enumerate() {
        exact.insert(name.as_str(), i);
        base.entry(name.rsplit('/').next().unwrap_or(name)).or_default().push(i);
    }
    let at = |line: usize| format!("{} line {line}", path.display());
    let mut chosen = vec![None::<usize>; dataset.len()];
    let mut out = Vec::new();
    for (n, entry) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
        if entry.is_empty() || (entry.starts_with('#') && !exact.contains_key(entry)) {
            continue;
        }
        let index = match (exact.get(entry), base.get(entry).map(Vec::as_slice)) {
            (Some(&i), _) | (None, Some(&[i])) => i,
            (None, Some(many)) => {
                let names = names.as_deref().unwrap_or_default();
                return Err(EvalError::Invalid(format!(
                    "{}: `{entry}` is the file name of {} images ({}, {}, ...): give the path the dataset records (folder/file)",
                    at(n),
                    many.len(),
                    names[many[0]],
                    names[many[1]]
                )));
            }
            (None, None) => match entry.parse::<usize>() {
                Ok(i) if i < dataset.len() => i,
                Ok(i) => {
                    return Err(EvalError::Invalid(format!(
                        "{}: image index {i} is out of range (the dataset has {} images)",
                        at(n),
                        dataset.len()
                    )))
                }
                Err(_) => {
                    let why = if names.is_some() {
                        "no image of the dataset has this name"
                    } else {
                        "the dataset records no image names (it was preprocessed before they were recorded: preprocess it again), and this is not an image index"
                    };
                    return Err(EvalError::Invalid(format!("{}: `{entry}`: {why}", at(n))));
                }
            },
        };
        if let Some(first) = chosen[index] {
            return Err(EvalError::Invalid(format!(
                "{}: `{entry}` selects image {index} again (first at line {first})",
                at(n)
            )));
        }
        chosen[index] = Some(n);
        out.push(index);
    }
    Ok(out)
}

/// A random `fraction` of the images, per class when `balanced` (see the module docs).
pub fn from_fraction(dataset: &Dataset, fraction: f64, seed: u64, balanced: bool) -> Result<Vec<usize>, EvalError> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(EvalError::Invalid(format!("the labelled fraction must be in (0, 1], got {fraction}")));
    }
    let take = |n: usize| ((fraction * n as f64).round() as usize).clamp(1, n);
    if !balanced {
        let mut all: Vec<usize> = (0..dataset.len()).collect();
        SplitMix64::from_key(&[seed, SUBSET_STREAM]).shuffle(&mut all);
        all.truncate(take(all.len()));
        return Ok(all);
    }
    if !dataset.manifest().labelled {
        return Err(EvalError::Invalid(format!(
            "a class-balanced subset needs labels; the data in {} has none",
            dataset.dir().display()
        )));
    }
    let mut by_class = vec![Vec::new(); dataset.classes().len()];
    for i in 0..dataset.len() {
        if let Some(list) = dataset.label(i).and_then(|l| by_class.get_mut(l as usize)) {
            list.push(i);
        }
    }
    let mut out = Vec::new();
    for (c, mut list) in by_class.into_iter().enumerate().filter(|(_, l)| !l.is_empty()) {
        SplitMix64::from_key(&[seed, SUBSET_STREAM, c as u64]).shuffle(&mut list);
        out.extend_from_slice(&list[..take(list.len())]);
    }
    Ok(out)
}
