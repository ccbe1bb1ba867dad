//! Checking a reference case of kind `sinkhorn` (PyTorch results, see `tests/cases/README.md` in this
//! crate) independently of the file format: the caller supplies the case's metadata and a way to
//! fetch its tensors (e.g. from a safetensors file).
//!
//! Metadata: `epsilon`, `iterations`, `world_size`, `rows`, `prototypes`. Tensors: `input.scores.rank{r}`
//! (rows x prototypes) and `expect.q.rank{r}` for every rank `r`. Distributed cases run their ranks as
//! threads joined by a [`crate::LocalGroup`].

use crate::{relative_error, sinkhorn_ranks, Params, SinkhornError};
use std::collections::HashMap;

/// Runs the case and returns, for every `expect.q.rank{r}`, its relative L2 error.
pub fn verify_case<F>(metadata: &HashMap<String, String>, tensor: F) -> Result<Vec<(String, f64)>, SinkhornError>
where
    F: Fn(&str) -> Option<Vec<f32>>,
{
    fn param<T: std::str::FromStr>(metadata: &HashMap<String, String>, key: &str) -> Result<T, SinkhornError> {
        metadata
            .get(key)
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| SinkhornError::Reference(format!("metadata `{key}` is missing or malformed")))
    }
    if let Some(kind) = metadata.get("kind") {
        if kind != "sinkhorn" {
            return Err(SinkhornError::Reference(format!("kind `{kind}` is not `sinkhorn`")));
        }
    }
    let params = Params::new(param(metadata, "epsilon")?, param(metadata, "iterations")?);
    let world: usize = param(metadata, "world_size")?;
    let rows: usize = param(metadata, "rows")?;
    let prototypes: usize = param(metadata, "prototypes")?;
    let fetch =
        |name: String| tensor(&name).ok_or_else(|| SinkhornError::Reference(format!("tensor `{name}` is missing")));
    let inputs = (0..world).map(|r| fetch(format!("input.scores.rank{r}"))).collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let got = sinkhorn_ranks(&refs, rows, prototypes, &params)?;
    let mut errors = Vec::new();
    for (r, q) in got.iter().enumerate() {
        let name = format!("expect.q.rank{r}");
        let want = fetch(name.clone())?;
        errors.push((name, relative_error(q, &want)));
    }
    Ok(errors)
}
