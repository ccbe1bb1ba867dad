//! Semi-supervised fine-tuning: a run stopped and resumed (inside an epoch, at an epoch's end, by the
//! stop flag) ends bit-identical to one that never stopped; the learning rates follow the step decay;
//! the fine-tuned model file is readable as a backbone; run folders are guarded.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use swav_data::Dataset;
use swav_eval::finetune::{finetune, FinetuneConfig, FinetuneOptions, FinetuneOutcome};
use swav_eval::subset::Selection;
use swav_model::ModelFile;

fn options(run_dir: &Path, model: &Path) -> FinetuneOptions {
    FinetuneOptions {
        selection: Selection::Fraction { fraction: 0.75, seed: 4, balanced: true },
        config: FinetuneConfig {
            epochs: 3,
            batch_size: 8,
            lr_trunk: 0.01,
            lr_head: 0.1,
            decay_epochs: vec![1, 2],
            ..FinetuneConfig::default()
        },
        workers: 2,
        ..FinetuneOptions::new(run_dir, model)
    }
}

fn run(train: &Dataset, val: &Dataset, opts: &FinetuneOptions) -> FinetuneOutcome {
    finetune(train, val, opts, &|_| {}).unwrap()
}

#[test]
fn a_stopped_and_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::model_file(tmp.path());
    let train = common::dataset(tmp.path(), "train", 16, false, 1);
    let val = common::dataset(tmp.path(), "val", 6, false, 2);

    let whole = run(&train, &val, &options(&tmp.path().join("a"), &model));
    let report = whole.report.clone().expect("finished");
    // 36 of 48 images (12 per class), batches of 8 with the last of 4 kept: 5 steps per epoch.
    assert_eq!((report.train_images, report.subset.per_class.clone()), (36, vec![12, 12, 12]));
    assert_eq!((whole.steps, whole.epochs_completed, whole.interrupted), (15, 3, false));
    let lrs: Vec<(f64, f64)> = report.epochs.iter().map(|e| (e.lr_trunk, e.lr_head)).collect();
    assert_eq!(lrs, [(0.01, 0.1), (0.01 * 0.2, 0.1 * 0.2), (0.01 * 0.2 * 0.2, 0.1 * 0.2 * 0.2)]);
    assert!(report.best.top1 >= 0.9, "brightness classes are learned: {:?}", report.epochs);

    // The same run in three calls: stop inside epoch 1, at the end of epoch 2 (before its
    // validation), and by the stop flag after one more step.
    let b = tmp.path().join("b");
    let part = |max_steps: Option<usize>, stop: bool| {
        let opts = FinetuneOptions { max_steps, stop: Arc::new(AtomicBool::new(stop)), ..options(&b, &model) };
        run(&train, &val, &opts)
    };
    let first = part(Some(3), false);
    assert_eq!((first.steps, first.epochs_completed, first.interrupted, first.report.is_none()), (3, 0, false, true));
    assert_eq!(part(Some(10), false).steps, 10);
    let flagged = part(None, true);
    assert_eq!((flagged.steps, flagged.interrupted, flagged.resumed_from), (11, true, Some(10)));
    let last = part(None, false);
    assert_eq!((last.steps, last.resumed_from), (15, Some(11)));
    assert_eq!(last.report.as_ref().unwrap().epochs, report.epochs, "same losses and accuracies");

    // Every tensor (weights, batch-norm statistics, momentum) and metadata entry equal, bit for bit.
    // (Not the files' bytes: safetensors writes its metadata map in hash order.)
    let read = |p: &Path| swav_model::checkpoint::NamedTensors::read(p).unwrap();
    let train_file = |p: &Path| p.with_extension("train.safetensors");
    assert!(read(&whole.checkpoint) == read(&last.checkpoint), "the resumed run's network differs");
    assert!(read(&train_file(&whole.checkpoint)) == read(&train_file(&last.checkpoint)), "momentum differs");
    // ResNet-18: 60 parameter tensors; the head: 2.
    assert_eq!(read(&train_file(&whole.checkpoint)).tensors.len(), 62, "a momentum for every parameter");

    // A finished run started again does nothing and gives the same report.
    let again = run(&train, &val, &options(&b, &model));
    assert_eq!((again.steps, again.report.unwrap().epochs), (15, report.epochs.clone()));

    // The fine-tuned file is a torchvision state dict with swav-rs preprocessing: its backbone reads
    // as a model file (the classifier `fc` is left out).
    let read = ModelFile::read(&whole.checkpoint).unwrap();
    assert_eq!(read.model.config.feature_dim(), 32);
    assert_eq!((read.preprocessing.input_size, read.preprocessing.mean.clone()), (12, vec![0.45]));
    assert_eq!(read.origin.ignored, ["fc.bias", "fc.weight"]);
}

#[test]
fn run_folders_are_guarded() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::model_file(tmp.path());
    let train = common::dataset(tmp.path(), "train", 4, false, 1);
    let val = common::dataset(tmp.path(), "val", 2, false, 2);
    let err = |opts: &FinetuneOptions| finetune(&train, &val, opts, &|_| {}).unwrap_err().to_string();

    // A pretraining run's folder is not a fine-tuning run.
    let pretraining = tmp.path().join("pretrain");
    std::fs::create_dir_all(&pretraining).unwrap();
    std::fs::write(pretraining.join("config.toml"), "").unwrap();
    let e = err(&options(&pretraining, &model));
    assert!(e.contains("not a fine-tuning run"), "{e}");

    // Another process holds the folder.
    let busy = tmp.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    let held = swav_core::lock::FolderLock::acquire(&busy).unwrap();
    let e = err(&options(&busy, &model));
    assert!(e.contains("in use"), "{e}");
    drop(held);

    // A resume must describe the same run.
    let dir = tmp.path().join("run");
    let one = FinetuneOptions { max_steps: Some(1), ..options(&dir, &model) };
    finetune(&train, &val, &one, &|_| {}).unwrap();
    let other = FinetuneOptions {
        selection: Selection::Fraction { fraction: 0.75, seed: 5, balanced: true },
        ..options(&dir, &model)
    };
    let e = err(&other);
    assert!(e.contains("another fine-tuning run") && e.contains("subset"), "{e}");
    let e = err(&FinetuneOptions {
        config: FinetuneConfig { lr_head: 1.0, ..options(&dir, &model).config },
        ..one.clone()
    });
    assert!(e.contains("config"), "{e}");

    // The pretrained file may not live in the run folder (pruning could remove it).
    let inside = dir.join("model.safetensors");
    std::fs::copy(&model, &inside).unwrap();
    let e = err(&options(&dir, &inside));
    assert!(e.contains("inside the run folder"), "{e}");

    // A damaged checkpoint is named, never trusted.
    std::fs::remove_file(&inside).unwrap();
    let model_file = dir.join("checkpoints/step-00000001.safetensors");
    let mut bytes = std::fs::read(&model_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&model_file, bytes).unwrap();
    let e = err(&options(&dir, &model));
    assert!(e.contains("step-00000001.safetensors") && e.contains("damaged"), "{e}");

    // Bad settings, before any work.
    let e = err(&FinetuneOptions { config: FinetuneConfig { lr_trunk: -1.0, ..FinetuneConfig::default() }, ..one });
    assert!(e.contains("fine-tuning settings"), "{e}");
    assert!(FinetuneConfig::preset("1%").unwrap().lr_head == 5.0 && FinetuneConfig::preset("3%").is_err());
}
