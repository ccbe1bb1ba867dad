//! kind = `swav_loss`: codes (with optional queue scores), the swapped-prediction loss and its
//! gradient with respect to the scores.

use swav_train::assign::codes_for_crop;
use swav_train::loss::swapped_prediction_loss;

use crate::case::Case;
use crate::judge::{Class, Output};
use crate::ReferenceError;

pub(crate) fn run(case: &Case<'_>) -> Result<Vec<Output>, ReferenceError> {
    let (batch, crops, k): (usize, usize, usize) = (case.meta("batch")?, case.meta("crops")?, case.meta("prototypes")?);
    let assign: Vec<usize> = case.meta_list("crops_for_assign")?;
    let queue: usize = case.meta("queue")?;
    let temperature: f32 = case.meta("temperature")?;
    let params = swav_sinkhorn::Params::new(case.meta("epsilon")?, case.meta("iterations")?);
    let (_, scores) = case.tensor("input.scores")?;
    if scores.len() != crops * batch * k || assign.iter().any(|&a| a >= crops) {
        return Err(case.err(format!("input.scores has {} values, not crops x batch x prototypes", scores.len())));
    }
    let mut codes = Vec::new();
    for (j, &a) in assign.iter().enumerate() {
        let queue_scores = if queue > 0 { Some(case.tensor(&format!("input.queue_scores.{j}"))?.1) } else { None };
        codes.push(codes_for_crop(&scores[a * batch * k..(a + 1) * batch * k], queue_scores, batch, k, &params)?);
    }
    let loss = swapped_prediction_loss(scores, k, batch, crops, &assign, &codes, temperature)?;
    let mut outputs: Vec<Output> = codes
        .into_iter()
        .enumerate()
        .map(|(j, q)| Output::value(format!("expect.codes.{j}"), q, Class::Value))
        .collect();
    outputs.push(Output::value("expect.loss", [loss.loss], Class::Value));
    outputs.push(Output::value("expect.grad.scores", loss.dscores, Class::Value));
    Ok(outputs)
}
