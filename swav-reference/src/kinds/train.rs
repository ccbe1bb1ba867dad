//! kind = `swav_train`: whole iterations of training from given weights and crops, through
//! swav-train's own [`swav_step`] (the function training runs) with its [`Lars`] optimiser and
//! [`Queue`]; then every weight and buffer (judged on its update, final - initial), every SGD
//! momentum buffer and the queue, and the loss of every iteration.
//!
//! What the case format sets and training normally derives is passed as training would: the lr of
//! each iteration to `swav_step` (training takes it from its schedule), and a queue that exists from
//! the first iteration (training creates it at `epoch_queue_starts`; either way it is used once full).
//! Convolutions are direct, as in the `swav_model` cases.

use swav_model::checkpoint::{load_model_state, model_state, ohwi_to_oihw, LoadOptions, Value};
use swav_model::param::{Layout, Slot, Visit};
use swav_model::SwavModel;
use swav_tensor::ops::winograd::ConvAlgorithm;
use swav_train::config::{Precision, TrainConfig};
use swav_train::lars::Lars;
use swav_train::queue::Queue;
use swav_train::step::{swav_step, SwavState};

use crate::case::Case;
use crate::judge::{layer_of, Class, Output, Want};
use crate::ReferenceError;

pub(crate) fn run(case: &Case<'_>) -> Result<Vec<Output>, ReferenceError> {
    let (batch, steps): (usize, usize) = (case.meta("batch")?, case.meta("steps")?);
    let lrs: Vec<f64> = case.meta_list("lr")?;
    if lrs.len() != steps {
        return Err(case.err(format!("{} learning rates for {steps} iterations", lrs.len())));
    }
    let sizes = case.crop_sizes()?;
    let train = train_config(case, batch)?;
    if train.crops_for_assign.is_empty() || train.crops_for_assign.iter().any(|&a| a >= sizes.len()) {
        return Err(case.err(format!("crops_for_assign {:?} for {} crops", train.crops_for_assign, sizes.len())));
    }
    let queue_length: usize = case.meta("queue_length")?;
    if !queue_length.is_multiple_of(batch) {
        return Err(case.err(format!("queue_length {queue_length} is not a multiple of the batch {batch}")));
    }
    let optimizer = Lars::new(
        case.meta("momentum")?,
        case.meta("weight_decay")?,
        case.meta("trust_coefficient")?,
        case.flag("lars", true)?,
    );

    let in_channels: usize = case.meta("in_channels")?;
    let config = case.model_config(in_channels)?;
    let queue = (queue_length > 0)
        .then(|| Queue::new(train.crops_for_assign.len(), queue_length, config.feat_dim, case.device));
    let mut model = SwavModel::new(config, 0)?;
    load_model_state(&mut model, case.file, "param.", LoadOptions::default())?;
    model.set_conv_algorithm(ConvAlgorithm::Direct);
    model.to_device(case.device)?;
    let mut state = SwavState::new(model, optimizer);
    state.queue = queue;
    let initial = model_state(&mut state.model).tensors;

    let mut outputs = Vec::new();
    for (s, &lr) in lrs.iter().enumerate() {
        let groups = case.crop_groups(&format!("input.step{s}."), &sizes, batch)?;
        let stats = swav_step(&mut state, &train, groups, batch, s, lr)?;
        outputs.push(Output::value(format!("expect.step{s}.loss"), [stats.loss], Class::Value));
    }

    // Every weight and buffer, judged on what the iterations did to it.
    let params = param_layouts(&mut state.model);
    for (name, value) in model_state(&mut state.model).tensors {
        let (Value::F32 { data, .. }, Some(Value::F32 { data: before, .. })) = (&value, initial.get(&name)) else {
            continue; // `num_batches_tracked`: not in the case
        };
        let role = if params.iter().any(|(p, _)| *p == name) { "parameters" } else { "running statistics" };
        outputs.push(Output {
            name: format!("expect.final.{name}"),
            got: Some(data.iter().zip(before).map(|(&a, &b)| a as f64 - b as f64).collect()),
            want: Want::Update { initial: format!("param.{name}") },
            class: Class::Update,
            layer: Some(layer_of("expect.final.", &name, role)),
        });
    }
    // SGD momentum buffers, in PyTorch's layout; both sides must have the same set.
    for (name, layout) in &params {
        let key = format!("expect.final.momentum.{name}");
        let ours = state.optimizer.buffers.get(name).map(|b| match layout {
            Layout::Ohwi => ohwi_to_oihw(b.shape(), &b.to_vec()).1,
            Layout::Plain => b.to_vec(),
        });
        let theirs = case.file.tensors.contains_key(&key);
        let (got, want) = match (ours, theirs) {
            (None, false) => continue,
            (ours, true) => (ours.map(|v| v.into_iter().map(f64::from).collect()), Want::Tensor),
            (ours, false) => (ours.map(|v| v.into_iter().map(f64::from).collect()), Want::Absent),
        };
        let layer = Some(layer_of("expect.final.momentum.", name, "momentum"));
        outputs.push(Output { name: key, got, want, class: Class::Update, layer });
    }
    if let Some(queue) = &state.queue {
        for (j, rows) in queue.rows.iter().enumerate() {
            outputs.push(Output::value(format!("expect.final.queue.{j}"), rows.to_vec(), Class::Value));
        }
    }
    Ok(outputs)
}

/// The step's hyper-parameters from the case; the fields a step does not read (epochs, loader,
/// checkpoints) are neutral.
fn train_config(case: &Case<'_>, batch: usize) -> Result<TrainConfig, ReferenceError> {
    Ok(TrainConfig {
        epochs: 1,
        batch_size: batch,
        base_lr: 0.0,
        final_lr: 0.0,
        warmup_epochs: 0,
        start_warmup: 0.0,
        weight_decay: case.meta("weight_decay")?,
        momentum: case.meta("momentum")?,
        lars: case.flag("lars", true)?,
        trust_coefficient: case.meta("trust_coefficient")?,
        temperature: case.meta("temperature")?,
        epsilon: case.meta("epsilon")?,
        sinkhorn_iterations: case.meta("iterations")?,
        crops_for_assign: case.meta_list("crops_for_assign")?,
        freeze_prototypes_niters: case.meta("freeze_prototypes_niters")?,
        queue_length: case.meta("queue_length")?,
        epoch_queue_starts: 0,
        seed: 0,
        workers: 1,
        prefetch: 1,
        checkpoint_every_epochs: 1,
        keep_checkpoints: 1,
        checkpoint_freq: 0,
        conv: ConvAlgorithm::Direct,
        init: None,
        init_backbone_only: false,
        // The cases are float32 (PyTorch's numerics): so is the run on a CUDA device.
        precision: Some(Precision::Fp32),
    })
}

/// The model's parameters (not buffers) and their layouts, by name.
fn param_layouts(model: &mut SwavModel) -> Vec<(String, Layout)> {
    let mut out = Vec::new();
    model.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            out.push((name.to_string(), p.layout));
        }
    });
    out
}
