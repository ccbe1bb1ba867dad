//! kind = `swav_model`: one training-mode forward of all crops through the whole network (backbone
//! once per resolution group, head on the concatenation), the SwAV loss, every parameter gradient and
//! the running statistics after the forward; and the eval-mode features of crop 0.
//!
//! The model cases check the network's arithmetic against PyTorch's float32 semantics, so they run
//! with direct (im2col) convolutions; Winograd's own accuracy is tested op by op against float64
//! direct loops (swav-tensor's tests).

use swav_model::checkpoint::{load_model_state, model_grads, model_state, LoadOptions, Value};
use swav_model::SwavModel;
use swav_tensor::ops::winograd::ConvAlgorithm;
use swav_tensor::Tensor;
use swav_train::assign::codes_for_crop;
use swav_train::loss::swapped_prediction_loss;

use crate::case::Case;
use crate::judge::{layer_of, Class, Output};
use crate::ReferenceError;

pub(crate) fn run(case: &Case<'_>) -> Result<Vec<Output>, ReferenceError> {
    let batch: usize = case.meta("batch")?;
    let assign: Vec<usize> = case.meta_list("crops_for_assign")?;
    let temperature: f32 = case.meta("temperature")?;
    let params = swav_sinkhorn::Params::new(case.meta("epsilon")?, case.meta("iterations")?);
    let sizes = case.crop_sizes()?;
    if assign.is_empty() || assign.iter().any(|&a| a >= sizes.len()) {
        return Err(case.err(format!("crops_for_assign {assign:?} for {} crops", sizes.len())));
    }
    let (shape0, _) = case.tensor("input.crop0")?;
    let in_channels = *shape0.get(1).ok_or_else(|| case.err("input.crop0 is not NCHW"))?;
    let mut model = SwavModel::new(case.model_config(in_channels)?, 0)?;
    load_model_state(&mut model, case.file, "param.", LoadOptions::default())?;
    model.set_conv_algorithm(ConvAlgorithm::Direct);
    model.to_device(case.device)?;
    let mut outputs = Vec::new();

    let groups = case.crop_groups("input.", &sizes, batch)?;
    let first = groups[0].narrow(0, batch)?;
    outputs.push(Output::value("expect.eval_features", model.features(&first)?.to_vec(), Class::Value));

    let (out, acts) = model.forward_train(groups)?;
    outputs.push(Output::value("expect.embedding", out.embedding.to_vec(), Class::Value));
    outputs.push(Output::value("expect.scores", out.scores[0].to_vec(), Class::Value));
    let k = out.scores[0].dim(1);
    let scores = &out.scores[0].to_vec();
    let codes = assign
        .iter()
        .map(|&a| codes_for_crop(&scores[a * batch * k..(a + 1) * batch * k], None, batch, k, &params))
        .collect::<Result<Vec<_>, _>>()?;
    let loss = swapped_prediction_loss(scores, k, batch, sizes.len(), &assign, &codes, temperature)?;
    outputs.push(Output::value("expect.loss", [loss.loss], Class::Value));
    let dscores = Tensor::from_vec(out.scores[0].shape(), loss.dscores)?.to_device(case.device)?;
    model.backward(acts, &out, &[dscores])?;

    for (name, value) in model_grads(&mut model).tensors {
        let Value::F32 { data, .. } = value else { continue };
        let layer = layer_of("expect.grad.", &name, "parameter gradients");
        outputs.push(Output::value(format!("expect.grad.{name}"), data, Class::Gradient).in_layer(layer));
    }
    // The running statistics the case lists (it leaves out `num_batches_tracked`).
    let state = model_state(&mut model).tensors;
    for key in case.file.tensors.keys().filter(|k| k.starts_with("expect.after.")) {
        let name = &key["expect.after.".len()..];
        let Some(Value::F32 { data, .. }) = state.get(name) else {
            return Err(case.err(format!("the model has no buffer `{name}`")));
        };
        let layer = layer_of("expect.after.", name, "running statistics");
        outputs.push(Output::value(key.clone(), data.iter().copied(), Class::Value).in_layer(layer));
    }
    Ok(outputs)
}
