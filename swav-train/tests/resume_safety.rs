//! Resume trusts nothing it reads: file names come from the step, checksums and shapes are verified,
//! leftovers of a crash are cleaned, and what cannot fit in memory is refused before it starts.

mod fixtures;

use std::path::Path;

use swav_train::checkpoint;
use swav_train::config::{self, Config};
use swav_train::trainer::{train, TrainOptions};

fn tiny(overrides: &[&str]) -> Config {
    let mut o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    o.push("train.workers=1".into());
    config::load(config::preset("cpu-tiny").unwrap().toml, &o).unwrap()
}

fn opts(run: &Path, data: &Path, max_steps: Option<usize>) -> TrainOptions {
    TrainOptions { max_steps, ..TrainOptions::new(run, data) }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn pruning_never_follows_names_written_in_a_sidecar() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let run = tmp.path().join("run");
    // 4 steps per epoch; keep 3 checkpoints.
    let cfg = tiny(&["train.epochs=6"]);
    train(&cfg, &opts(&run, &data, Some(4))).unwrap();
    let victims = [tmp.path().join("victim.txt"), tmp.path().join("victim2.txt")];
    for v in &victims {
        std::fs::write(v, "precious").unwrap();
    }
    let oldest = checkpoint::list(&run).unwrap()[0].clone();
    let side = oldest.dir.join(format!("{}.json", checkpoint::stem(oldest.sidecar.step)));
    edit_json(&side, |v| {
        v["model_file"] = "../../victim.txt".into();
        v["train_file"] = victims[1].display().to_string().into();
    });
    train(&cfg, &opts(&run, &data, None)).unwrap();
    for v in &victims {
        assert_eq!(std::fs::read_to_string(v).unwrap(), "precious", "{} was deleted", v.display());
    }
    assert!(checkpoint::list(&run).unwrap().len() <= 3);
}

#[test]
fn damaged_swapped_or_edited_checkpoints_are_refused_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let cfg = tiny(&["train.epochs=3"]);
    let run = tmp.path().join("run");
    train(&cfg, &opts(&run, &data, Some(2))).unwrap();
    let found = checkpoint::latest(&run).unwrap().unwrap();
    let side = found.dir.join(format!("{}.json", checkpoint::stem(found.sidecar.step)));
    let pristine = |what: &Path| std::fs::read(what).unwrap();
    let (model, train_file, sidecar) = (pristine(&found.model_path()), pristine(&found.train_path()), pristine(&side));
    let restore = || {
        std::fs::write(found.model_path(), &model).unwrap();
        std::fs::write(found.train_path(), &train_file).unwrap();
        std::fs::write(&side, &sidecar).unwrap();
    };
    let resume_err = || train(&cfg, &opts(&run, &data, Some(3))).unwrap_err().to_string();

    // One flipped byte in the model file.
    let mut flipped = model.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x10;
    std::fs::write(found.model_path(), &flipped).unwrap();
    let err = resume_err();
    assert!(err.contains("SHA-256") && err.contains("damaged"), "{err}");
    restore();

    // The optimiser state of another run (another head width), with the checksum fixed up too: the
    // shapes give it away.
    let other = tmp.path().join("other");
    train(&tiny(&["train.epochs=3", "model.hidden_mlp=12"]), &opts(&other, &data, Some(2))).unwrap();
    let theirs = checkpoint::latest(&other).unwrap().unwrap();
    std::fs::copy(theirs.train_path(), found.train_path()).unwrap();
    edit_json(&side, |v| v["train_sha256"] = theirs.sidecar.train_sha256.clone().unwrap().into());
    let err = resume_err();
    assert!(err.contains("momentum.projection_head") && err.contains("shape"), "{err}");
    restore();

    // A sidecar edited to another step.
    edit_json(&side, |v| v["step"] = 1.into());
    let err = resume_err();
    assert!(err.contains("step 1") && err.contains("step 2"), "{err}");
    restore();

    // Untouched, it resumes.
    let out = train(&cfg, &opts(&run, &data, Some(3))).unwrap();
    assert_eq!(out.resumed_from, Some(2));
}

#[test]
fn leftovers_of_an_interrupted_save_are_removed_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let cfg = tiny(&["train.epochs=3"]);
    let run = tmp.path().join("run");
    train(&cfg, &opts(&run, &data, Some(2))).unwrap();
    let dir = checkpoint::checkpoint_dir(&run);
    // A save killed after its first two files, and a temporary of a process that no longer runs.
    let orphans = [dir.join("step-00000009.safetensors"), dir.join("step-00000009.train.safetensors")];
    for o in &orphans {
        std::fs::write(o, "partial").unwrap();
    }
    let tmpfile = dir.join(".step-00000009.json.tmp-999999999");
    std::fs::write(&tmpfile, "partial").unwrap();
    let notes = dir.join("NOTES.txt");
    std::fs::write(&notes, "mine").unwrap();
    train(&cfg, &opts(&run, &data, Some(3))).unwrap();
    for o in orphans.iter().chain([&tmpfile]) {
        assert!(!o.exists(), "{} left", o.display());
    }
    assert!(notes.exists(), "a file of another kind is left alone");
}

#[test]
fn runs_that_cannot_fit_or_do_nothing_are_refused_before_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures::shapes_dataset(tmp.path(), 32, 12);
    let run = tmp.path().join("run");
    let started = std::time::Instant::now();
    let err = train(&tiny(&["model.prototypes=[100000000]"]), &opts(&run, &data, None)).unwrap_err().to_string();
    assert!(err.contains("needs about") && err.contains("model.prototypes"), "{err}");
    assert!(started.elapsed().as_secs() < 5, "refused before allocating");
    let limited = TrainOptions { max_memory: Some(1 << 20), ..opts(&run, &data, None) };
    let err = train(&tiny(&[]), &limited).unwrap_err().to_string();
    assert!(err.contains("the limit given"), "{err}");
    let err = train(&tiny(&[]), &opts(&run, &data, Some(0))).unwrap_err().to_string();
    assert!(err.contains("max-steps"), "{err}");
    assert!(!run.join("metrics.jsonl").exists());
}
