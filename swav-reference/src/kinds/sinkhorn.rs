//! kind = `sinkhorn`: the codes of every rank of a (possibly distributed) Sinkhorn-Knopp run.

use crate::case::Case;
use crate::judge::{Class, Output};
use crate::ReferenceError;

pub(crate) fn run(case: &Case<'_>) -> Result<Vec<Output>, ReferenceError> {
    let params = swav_sinkhorn::Params::new(case.meta("epsilon")?, case.meta("iterations")?);
    let (world, rows, prototypes): (usize, usize, usize) =
        (case.meta("world_size")?, case.meta("rows")?, case.meta("prototypes")?);
    let inputs = (0..world)
        .map(|r| case.tensor(&format!("input.scores.rank{r}")).map(|(_, d)| d))
        .collect::<Result<Vec<_>, _>>()?;
    let codes =
        swav_sinkhorn::sinkhorn_ranks(&inputs, rows, prototypes, &params).map_err(|e| case.err(e.to_string()))?;
    Ok(codes
        .into_iter()
        .enumerate()
        .map(|(r, q)| Output::value(format!("expect.q.rank{r}"), q, Class::Sinkhorn))
        .collect())
}
