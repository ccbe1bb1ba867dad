//! The CLI against careless use: a second process on a busy folder stops at once naming the first,
//! Ctrl-C and SIGTERM save a checkpoint and exit 130, the embedded default data works from a binary
//! outside the source tree, the pipeline never touches a run folder it did not make.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_xtask")
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin()).args(args).env("RUST_LOG", "warn").output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn dataset(root: &Path, n: usize) -> PathBuf {
    let images = swav_data::synthetic::write_shapes_idx(&root.join("raw"), n, 12, 3).unwrap();
    let out = root.join("data");
    let (code, log) = run(&["preprocess", "--input", images.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{log}");
    out
}

/// Runs `command`, waits for a line of its standard error containing `marker`, sends `signal`, and
/// returns the exit code and everything it printed.
fn signal_after(command: &mut Command, marker: &str, signal: i32) -> (Option<i32>, String) {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    // A binary copied a moment ago can be "busy" (ETXTBSY) while a child that another test thread is
    // forking still holds the copy's write handle, until that child execs: wait for it.
    let mut child = loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            spawned => break spawned.unwrap(),
        }
    };
    let stdout = child.stdout.take().unwrap();
    let out =
        std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    let mut log = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut sent = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        log += &line;
        log.push('\n');
        if line.contains(marker) {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
            sent = true;
            break;
        }
    }
    log.extend(lines.map_while(Result::ok).map(|l| l + "\n"));
    let status = child.wait().unwrap();
    log += &out.join().unwrap();
    assert!(sent, "never saw `{marker}`:\n{log}");
    (status.code(), log)
}

#[test]
fn a_second_train_on_a_busy_run_folder_stops_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 32);
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let held = swav_core::lock::FolderLock::acquire(&run_dir).unwrap();
    let args =
        ["train", "--data", data.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap(), "--preset", "cpu-tiny"];
    let (code, log) = run(&args);
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("in use") && log.contains(&std::process::id().to_string()), "{log}");
    assert!(!run_dir.join("metrics.jsonl").exists(), "the second process wrote nothing");
    drop(held);
    let (code, log) = run(&[&args[..], &["--max-steps", "1"]].concat());
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn sigterm_during_training_saves_a_checkpoint_and_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), 64);
    let run_dir = tmp.path().join("run");
    let args = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--preset",
        "cpu-tiny",
        "--epochs",
        "200",
    ];
    let (code, log) =
        signal_after(Command::new(bin()).args(args).env("RUST_LOG", "info"), "epoch 1/200 done", libc::SIGTERM);
    assert_eq!(code, Some(130), "{log}");
    let found = swav_train::checkpoint::latest(&run_dir).unwrap().expect("a checkpoint");
    assert!(found.model_path().exists(), "{log}");
    // The same command continues from it.
    let (code, log) = run(&[&args[..7], &["--max-steps", &(found.sidecar.step + 1).to_string()]].concat());
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("resuming") || log.contains("steps"), "{log}");
}

/// The default pipeline runs from a copy of the binary in a folder far from the source tree: its
/// images come from the binary. Ctrl-C during training saves a checkpoint and exits 130.
#[test]
fn the_embedded_default_runs_from_an_installed_binary_and_ctrl_c_stops_it_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let installed = tmp.path().join("bin/swav");
    std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
    std::fs::copy(bin(), &installed).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // The pipeline prints its steps on standard output; training logs its epochs on standard error.
    let mut command = Command::new(&installed);
    command.args(["pipeline", "--out", "demo"]).current_dir(&work).env("RUST_LOG", "info");
    let (code, log) = signal_after(&mut command, "epochs of", libc::SIGINT);
    assert_eq!(code, Some(130), "{log}");
    let demo = work.join("demo");
    assert!(demo.join("input/fashion-mnist/t10k-images-idx3-ubyte.gz").exists(), "{log}");
    assert!(log.contains("8000 images") && log.contains("2000 images"), "{log}");
    assert!(swav_train::checkpoint::latest(&demo.join("run")).unwrap().is_some(), "{log}");
}

#[test]
fn the_pipeline_refuses_a_run_folder_it_did_not_make_and_touch_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let images = swav_data::synthetic::write_shapes_idx(tmp.path(), 96, 12, 5).unwrap();
    let desc = tmp.path().join("p.toml");
    let text = format!(
        "out_dir = \"out\"\n[data]\ntrain = \"{}\"\nholdout = 32\n[train]\npreset = \"cpu-tiny\"\nset = [\"train.epochs=1\"]\n[eval]\nrandom_baseline = false\nk = 10\n[export]\nenabled = false\nwith_head = false\n",
        images.display()
    );
    std::fs::write(&desc, text).unwrap();
    let d = desc.to_str().unwrap();
    // Someone's own run where the pipeline would put its own: refused, left alone.
    let theirs = tmp.path().join("out/run");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("NOTES.txt"), "my experiment").unwrap();
    let (code, log) = run(&["pipeline", "--config", d]);
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("not made by the pipeline"), "{log}");
    assert_eq!(std::fs::read_to_string(theirs.join("NOTES.txt")).unwrap(), "my experiment");
    std::fs::remove_dir_all(&theirs).unwrap();

    let (code, log) = run(&["pipeline", "--config", d]);
    assert_eq!(code, Some(0), "{log}");
    assert!(tmp.path().join("out/report.png").exists() && tmp.path().join("out/report.txt").exists(), "{log}");
    assert!(log.contains("report:"), "{log}");
    // Same content, new modification time: every step is still up to date.
    let bytes = std::fs::read(&images).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&images, &bytes).unwrap();
    let (code, log) = run(&["pipeline", "--config", d]);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(log.matches("up to date").count(), 3, "{log}");
    // Another convolution choice is another run: the pipeline's own old run is replaced, and says so.
    let (code, log) = run(&["pipeline", "--config", d, "--conv", "direct"]);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("removing") && log.contains("another configuration"), "{log}");
}
