//! The training loop end to end on a tiny dataset: resume exactness, interruption, guards.

mod fixtures;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use swav_model::checkpoint::NamedTensors;
use swav_train::checkpoint;
use swav_train::config::{self, Config};
use swav_train::trainer::{train, TrainOptions};
use swav_train::TrainError;

fn tiny(overrides: &[&str]) -> Config {
    let mut o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    o.push("train.workers=2".into());
    config::load(config::preset("cpu-tiny").unwrap().toml, &o).unwrap()
}

fn opts(run: &Path, data: &Path, max_steps: Option<usize>) -> TrainOptions {
    TrainOptions { max_steps, stop: Arc::new(AtomicBool::new(false)), ..TrainOptions::new(run, data) }
}

/// All tensors of the newest checkpoint: model file and optimiser/queue file.
fn newest_state(run: &Path) -> (usize, NamedTensors, NamedTensors) {
    let found = checkpoint::latest(run).unwrap().expect("a checkpoint");
    (
        found.sidecar.step,
        NamedTensors::read(&found.model_path()).unwrap(),
        NamedTensors::read(&found.train_path()).unwrap(),
    )
}

#[test]
fn stopping_and_resuming_gives_bit_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 48, 12);
    // 48 images / batch 8 = 6 steps per epoch; the queue starts at epoch 1 and is full after 2 steps.
    let cfg = tiny(&[
        "train.epochs=3",
        "train.queue_length=16",
        "train.epoch_queue_starts=1",
        "train.freeze_prototypes_niters=3",
    ]);

    let straight = tmp.path().join("straight");
    let a = train(&cfg, &opts(&straight, &data, Some(14))).unwrap();
    assert_eq!(a.steps, 14);

    // Stop mid-epoch (step 9: inside epoch 1, queue active), then resume to the same step.
    let resumed = tmp.path().join("resumed");
    let b1 = train(&cfg, &opts(&resumed, &data, Some(9))).unwrap();
    assert_eq!(b1.steps, 9);
    let b2 = train(&cfg, &opts(&resumed, &data, Some(14))).unwrap();
    assert_eq!((b2.steps, b2.resumed_from), (14, Some(9)));

    let (step_a, model_a, train_a) = newest_state(&straight);
    let (step_b, model_b, train_b) = newest_state(&resumed);
    assert_eq!((step_a, step_b), (14, 14));
    assert_eq!(model_a.tensors, model_b.tensors, "model weights and statistics differ after resume");
    assert_eq!(train_a.tensors, train_b.tensors, "momentum or queue differ after resume");
    assert!(train_a.tensors.contains_key("queue.0") && train_a.tensors.contains_key("queue.1"));
    assert!(train_a.tensors.keys().any(|k| k.starts_with("momentum.layer1.0.conv1")));

    // The metrics describe one run of 14 steps in both directories.
    let read =
        |dir: &std::path::Path| swav_train::metrics::read(&dir.join(swav_train::metrics::METRICS_FILE)).unwrap().rows;
    let (ma, mb) = (read(&straight), read(&resumed));
    assert_eq!(ma.len(), 14);
    assert_eq!(mb.iter().map(|m| m.step).collect::<Vec<_>>(), (0..14).collect::<Vec<_>>());
    let bits = |m: &[swav_train::metrics::StepMetrics]| m.iter().map(|m| m.loss.map(f64::to_bits)).collect::<Vec<_>>();
    assert!(ma.iter().all(|m| m.loss.is_some()));
    assert_eq!(bits(&ma), bits(&mb));
}

#[test]
fn the_stop_flag_saves_a_checkpoint_and_the_run_continues_later() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let cfg = tiny(&["train.epochs=2"]);
    let run = tmp.path().join("run");
    let o = opts(&run, &data, None);
    o.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let out = train(&cfg, &o).unwrap();
    assert!(out.interrupted);
    assert_eq!(out.steps, 1);
    assert!(out.checkpoint.exists());
    // Same command again: continues to the end (4 steps per epoch x 2).
    let out = train(&cfg, &opts(&run, &data, None)).unwrap();
    assert!(!out.interrupted);
    assert_eq!((out.steps, out.epochs_completed, out.resumed_from), (8, 2, Some(1)));
    // Checkpoints kept: at most keep_checkpoints (3); the final one is the newest.
    let all = checkpoint::list(&run).unwrap();
    assert!(all.len() <= 3);
    assert_eq!(all.last().unwrap().sidecar.step, 8);
    assert!(run.join("config.toml").exists());
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let run = tmp.path().join("run");
    // One good epoch with a sane learning rate...
    let good = tiny(&["train.epochs=2", "train.lars=false"]);
    train(&good, &opts(&run, &data, Some(4))).unwrap();
    let before = checkpoint::latest(&run).unwrap().unwrap().sidecar.step;
    // ...then an absurd one in a second run directory seeded from it is refused as a different
    // configuration; a fresh run with it diverges.
    let bad = tiny(&["train.epochs=2", "train.lars=false", "train.base_lr=1e30", "train.final_lr=1e30"]);
    let err = train(&bad, &opts(&run, &data, None)).unwrap_err();
    assert!(matches!(err, TrainError::Config(_)), "{err}");
    assert!(err.to_string().contains("base_lr"), "{err}");
    let fresh = tmp.path().join("fresh");
    let err = train(&bad, &opts(&fresh, &data, None)).unwrap_err();
    match &err {
        TrainError::NonFinite { step, .. } => assert!(*step < 8),
        other => panic!("expected a non-finite loss error, got {other}"),
    }
    assert!(err.to_string().contains("last good checkpoint"));
    assert!(checkpoint::latest(&fresh).unwrap().is_none(), "nothing may be saved from a diverged state");
    assert_eq!(checkpoint::latest(&run).unwrap().unwrap().sidecar.step, before);
}

#[test]
fn the_convolution_choice_is_part_of_the_run_and_a_resume_with_another_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let run = tmp.path().join("run");
    let cfg = tiny(&["train.epochs=2", "train.conv=direct"]);
    train(&cfg, &opts(&run, &data, Some(2))).unwrap();
    let stored = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(stored.contains("conv = \"direct\""), "{stored}");
    let other = tiny(&["train.epochs=2", "train.conv=auto"]);
    let err = train(&other, &opts(&run, &data, None)).unwrap_err().to_string();
    assert!(err.contains("conv"), "{err}");
    assert!(config::load(config::preset("cpu-tiny").unwrap().toml, &["train.conv=fast".into()]).is_err());
}

#[test]
fn a_measured_plan_is_recorded_applied_on_resume_and_required() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let cfg = tiny(&["train.epochs=2", "train.conv=measured"]);
    let plan_file = swav_train::conv_plan::FILE;

    // A run measures its plan when it starts; a resume applies the recorded one.
    let resumed = tmp.path().join("resumed");
    train(&cfg, &opts(&resumed, &data, Some(3))).unwrap();
    let plan = swav_train::conv_plan::load(&resumed.join(plan_file)).unwrap();
    assert!(!plan.entries.is_empty());
    // The same run straight through, given the same plan (a new measurement could choose differently).
    let straight = tmp.path().join("straight");
    std::fs::create_dir_all(&straight).unwrap();
    std::fs::copy(resumed.join(plan_file), straight.join(plan_file)).unwrap();
    train(&cfg, &opts(&straight, &data, Some(6))).unwrap();
    let forced = tmp.path().join("forced");
    std::fs::create_dir_all(&forced).unwrap();
    let text = std::fs::read_to_string(resumed.join(plan_file)).unwrap();
    std::fs::copy(resumed.join(plan_file), forced.join(plan_file)).unwrap();
    train(&cfg, &opts(&resumed, &data, Some(6))).unwrap();
    let (_, model_a, _) = newest_state(&straight);
    let (_, model_b, _) = newest_state(&resumed);
    assert_eq!(model_a.tensors, model_b.tensors, "resume with the recorded plan is not bit-identical");

    // The plan file is what decides: another plan (every 3x3 stride-1 shape on another kernel) gives
    // other bits.
    let mut other: serde_json::Value = serde_json::from_str(&text).unwrap();
    for e in other["entries"].as_array_mut().unwrap() {
        let shape: Vec<u64> = e["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        if shape[4..] == [3, 3, 1, 1] {
            let next = if e["kernel"] == "winograd-f4" { "winograd-f2" } else { "winograd-f4" };
            e["kernel"] = next.into();
        }
    }
    std::fs::write(forced.join(plan_file), other.to_string()).unwrap();
    train(&cfg, &opts(&forced, &data, Some(6))).unwrap();
    assert_ne!(newest_state(&forced).1.tensors, model_a.tensors, "the plan file was not applied");

    // A run whose plan is gone is refused, not silently re-planned.
    std::fs::remove_file(resumed.join(plan_file)).unwrap();
    let more = tiny(&["train.epochs=3", "train.conv=measured"]);
    let err = train(&more, &opts(&resumed, &data, None)).unwrap_err().to_string();
    assert!(err.contains(plan_file), "{err}");
}

#[test]
fn a_new_run_starts_from_given_weights_whole_or_backbone_only() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let first = tmp.path().join("first");
    train(&tiny(&["train.epochs=2"]), &opts(&first, &data, Some(4))).unwrap();
    let source = checkpoint::latest(&first).unwrap().unwrap().model_path();
    let source_state = NamedTensors::read(&source).unwrap();
    let src = source.display().to_string();
    // A zero learning rate leaves the weights where the start put them (the BN statistics move).
    let frozen = ["train.epochs=1", "train.base_lr=0", "train.final_lr=0", "train.seed=5"];
    for (backbone_only, name) in [(false, "whole"), (true, "backbone")] {
        let mut set: Vec<String> = frozen.iter().map(|s| s.to_string()).collect();
        set.push(format!("train.init=\"{src}\""));
        set.push(format!("train.init_backbone_only={backbone_only}"));
        let cfg = tiny(&set.iter().map(String::as_str).collect::<Vec<_>>());
        let run = tmp.path().join(name);
        train(&cfg, &opts(&run, &data, Some(1))).unwrap();
        let stored = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(stored.contains(&src), "the run records where it started: {stored}");
        let (_, model, _) = newest_state(&run);
        assert_eq!(model.tensors["layer1.0.conv1.weight"], source_state.tensors["layer1.0.conv1.weight"], "{name}");
        let same_head = model.tensors["projection_head.0.weight"] == source_state.tensors["projection_head.0.weight"];
        assert_eq!(same_head, !backbone_only, "{name}: the head comes from the file only for a whole start");
    }
    // A start from a file of another network is refused before training, naming the setting.
    let err = train(
        &tiny(&["train.epochs=1", "model.width=8", &format!("train.init=\"{src}\"")]),
        &opts(&tmp.path().join("other"), &data, Some(1)),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("train.init"), "{err}");
}

/// A folder of small RGB images with a colour cast (more red than blue), in two classes.
fn rgb_dataset(root: &Path) -> PathBuf {
    let input = root.join("rgb");
    for c in 0..2u8 {
        let dir = input.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..8u32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                let v = ((x * 13 + y * 7 + i * 31) % 200) as u8;
                image::Rgb([v.saturating_add(50), v / 2 + c * 20, v / 4])
            });
            img.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
    let out = root.join("rgb-data");
    let opts = swav_data::PreprocessOptions { input, output: out.clone(), workers: 1, ..Default::default() };
    swav_data::preprocess(&opts, &|_| {}).unwrap();
    out
}

#[test]
fn rgb_data_trains_a_one_channel_model_on_luma_and_records_its_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = rgb_dataset(tmp.path());
    let manifest = swav_data::Dataset::open(&data).unwrap().manifest().clone();
    assert_eq!(manifest.channels, 3);
    let run = tmp.path().join("run");
    train(&tiny(&["train.epochs=1"]), &opts(&run, &data, Some(2))).unwrap();
    // The model file records one mean and one std: the luma of the dataset's per-channel statistics.
    let found = checkpoint::latest(&run).unwrap().unwrap();
    let file = swav_model::ModelFile::read(&found.model_path()).unwrap();
    let luma = |v: &[f64]| 0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2];
    assert_eq!(file.preprocessing.mean.len(), 1);
    assert!((file.preprocessing.mean[0] as f64 - luma(&manifest.pixel_mean)).abs() < 1e-6);
    assert!((file.preprocessing.std[0] as f64 - luma(&manifest.pixel_std)).abs() < 1e-6);

    // Three explicit mean values for a one-channel model: refused, naming both settings.
    let sets = ["crops.augment.mean=[0.5, 0.4, 0.3]".to_string(), "crops.augment.std=[0.2, 0.2, 0.2]".to_string()];
    let err = config::load(config::preset("cpu-tiny").unwrap().toml, &sets).unwrap_err().to_string();
    assert!(err.contains("model.in_channels") && err.contains("crops.augment.mean"), "{err}");
}

#[test]
fn archives_every_checkpoint_freq_epochs_outlive_the_rolling_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 16, 12);
    // 2 steps per epoch, 5 epochs, archives after epoch indices 0, 2, 4 (the last), one rolling
    // checkpoint kept, two prototype heads.
    let cfg =
        tiny(&["train.epochs=5", "train.checkpoint_freq=2", "train.keep_checkpoints=1", "model.prototypes=[6, 4]"]);
    let run = tmp.path().join("run");
    train(&cfg, &opts(&run, &data, None)).unwrap();
    let archive = checkpoint::archive_dir(&run);
    let mut names: Vec<String> =
        std::fs::read_dir(&archive).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["ckp-0.safetensors", "ckp-2.safetensors", "ckp-4.safetensors"]);
    assert_eq!(checkpoint::list(&run).unwrap().len(), 1, "rolling checkpoints are pruned, archives are not");
    // Each archive is the model file of the end of its epoch (step = 2 (E + 1)), loadable alone.
    for (e, name) in [(0usize, "ckp-0"), (2, "ckp-2"), (4, "ckp-4")] {
        let file = swav_model::ModelFile::read(&archive.join(format!("{name}.safetensors"))).unwrap();
        assert_eq!(file.metadata.get("step").map(String::as_str), Some((2 * (e + 1)).to_string().as_str()), "{name}");
        assert_eq!(file.model.config.prototypes, vec![6, 4]);
    }
    let a = NamedTensors::read(&archive.join("ckp-0.safetensors")).unwrap();
    let b = NamedTensors::read(&archive.join("ckp-4.safetensors")).unwrap();
    assert_ne!(a.tensors["prototypes.prototypes1.weight"], b.tensors["prototypes.prototypes1.weight"]);
}
