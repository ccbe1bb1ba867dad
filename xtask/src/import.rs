//! `cargo xtask import`: any file `ModelFile` reads (a PyTorch checkpoint such as the official
//! `swav_800ep_pretrain.pth.tar` or a torchvision ResNet, a safetensors state dict, a swav-rs model
//! file) -> a swav-rs model file with its configuration and preprocessing recorded, so that every
//! other command uses it without guessing. The network is detected from the tensor shapes; `--arch`
//! checks it. The weights are copied bit for bit (fp16 / bf16 widened exactly); the output is read
//! back and compared before the command reports success.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use swav_model::checkpoint::model_state;
use swav_model::detect::default_head;
use swav_model::file::{FileKind, HEAD_FRESH, META_EPOCH, META_HEAD, META_IMPORTED_FROM};
use swav_model::pretrained::{init_from, InitScope};
use swav_model::torch::Container;
use swav_model::{Arch, ModelConfig, ModelFile, Overrides, Preprocessing, SwavModel};

#[derive(clap::Args)]
pub struct Args {
    /// The file to import: a PyTorch checkpoint (.pth, .pth.tar, .pt; zip or legacy format), a
    /// safetensors state dict with torchvision / official SwAV names, or a swav-rs model file.
    #[arg(long)]
    input: PathBuf,
    /// The swav-rs model file to write (safetensors, atomically); must not be the input.
    #[arg(long)]
    output: PathBuf,
    /// The architecture the input must hold (resnet18, resnet34, resnet50, resnet50w2, resnet50w4,
    /// resnet50w5): checked against the detected one, an error if they differ. A narrower network of
    /// the same depth (e.g. a ResNet-50 of width 16) agrees with its arch.
    #[arg(long)]
    arch: Option<String>,
    /// Keep only the backbone (conv1, bn1, layer*): the output gets a freshly initialised default head
    /// (features -> features (BN) -> 128, 3000 prototypes; seed 0), marked `head = fresh`. Automatic for
    /// inputs without a projection head (torchvision ResNets).
    #[arg(long)]
    backbone_only: bool,
    /// Per-channel mean to record (default: what the input records, else ImageNet's for RGB).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    mean: Option<Vec<f32>>,
    /// Per-channel std to record (default: what the input records, else ImageNet's for RGB).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    std: Option<Vec<f32>>,
    /// Input side in pixels to record (default: what the input records, else 224, or 32 with the small stem).
    #[arg(long)]
    input_size: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    refuse_same_file(&args.input, &args.output)?;
    let arch = args.arch.as_deref().map(Arch::parse).transpose().context("--arch")?;
    let overrides = Overrides { mean: args.mean.clone(), std: args.std.clone(), input_size: args.input_size };
    let mut file =
        ModelFile::read_with(&args.input, &overrides).with_context(|| format!("reading {}", args.input.display()))?;
    let detected = file.model.config.canonical();
    if let Some(want) = arch {
        if want != detected.arch && want != file.model.config.arch {
            bail!(
                "--arch {} does not match {}: its tensor shapes are those of {}",
                want.name(),
                args.input.display(),
                describe(&detected, file.origin.head)
            );
        }
    }

    let name = args.input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let origin = file.origin.clone();
    let location = match &origin.container {
        Some(Container::Bare) => "a bare state dict".to_string(),
        Some(c @ Container::Key(_)) => format!("state dict at {c}"),
        None => "safetensors".to_string(),
    };
    println!("read {}: {}, {location}", args.input.display(), origin.kind);
    println!("  network: {}", describe(&detected, origin.head));
    if let Some(said) = origin.entries.get("arch") {
        match Arch::parse(said) {
            Ok(a) if a == detected.arch => {}
            _ => tracing::warn!(
                "the file's `arch` entry says {said:?} but its tensor shapes are those of a {}",
                detected.arch.name()
            ),
        }
    }
    if !origin.ignored.is_empty() {
        println!("  left out: {} (not part of a SwAV network: torchvision's classifier)", origin.ignored.join(", "));
    }

    let fresh_head = args.backbone_only || !origin.head;
    let (mut model, p, metadata) = if args.backbone_only && origin.head {
        let mut model = SwavModel::new(default_head(&file.model.config).canonical(), 0)?;
        let shown = args.input.display().to_string();
        init_from(&mut model, &mut file, InitScope::Backbone, &shown)?;
        (model, file.preprocessing, file.metadata)
    } else {
        (file.model, file.preprocessing, file.metadata)
    };
    let head_note = if fresh_head {
        if origin.head {
            "dropped (--backbone-only): a fresh default head, marked `head = fresh`"
        } else {
            "none in the input: a fresh default head, marked `head = fresh`"
        }
    } else {
        "from the input"
    };
    println!("  projection head and prototypes: {head_note}");

    let pre = Preprocessing::recorded(&model.config, p.mean.clone(), p.std.clone(), p.input_size)?;
    let mut extra = BTreeMap::new();
    let from = match origin.kind {
        FileKind::Torch(_) => format!("{name} ({location})"),
        _ => format!("{name} ({})", origin.kind),
    };
    extra.insert(META_IMPORTED_FROM.to_string(), from);
    if let Some(epoch) = origin.entries.get("epoch").or_else(|| metadata.get(META_EPOCH)) {
        extra.insert(META_EPOCH.to_string(), epoch.clone());
    }
    if fresh_head {
        extra.insert(META_HEAD.to_string(), HEAD_FRESH.to_string());
    }
    ModelFile::write(&mut model, &pre, &extra, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;

    // Read back what was written: same network, same values, bit for bit.
    let mut back = ModelFile::read(&args.output).with_context(|| format!("reading back {}", args.output.display()))?;
    let written = model_state(&mut back.model).tensors;
    if back.model.config != model.config || written != model_state(&mut model).tensors {
        bail!("{} does not read back as written", args.output.display());
    }
    println!(
        "wrote {} ({} tensors, {:.2}M values{})",
        args.output.display(),
        written.len(),
        back.model.config.state_values() as f64 / 1e6,
        origin.entries.get("epoch").map_or(String::new(), |e| format!(", epoch {e}"))
    );
    println!(
        "  preprocessing recorded: mean {:?}, std {:?}, input size {} ({})",
        pre.mean,
        pre.std,
        pre.input_size,
        if p.is_default() { "ImageNet defaults for a file that records none" } else { "as given / recorded" }
    );
    Ok(())
}

/// Refuses an output that is the input itself (under any spelling, or through a link): the import
/// would replace the only copy of the weights it reads.
fn refuse_same_file(input: &Path, output: &Path) -> anyhow::Result<()> {
    let input = std::fs::canonicalize(input).with_context(|| format!("reading {}", input.display()))?;
    let resolved = match std::fs::canonicalize(output) {
        Ok(p) => p,
        Err(_) => {
            let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let parent = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
            parent.join(output.file_name().unwrap_or_default())
        }
    };
    if resolved == input {
        bail!("--output {} is the input file: write the imported model to another path", output.display());
    }
    Ok(())
}

/// The network in words; `head`: whether the projection head and prototypes are the file's.
fn describe(c: &ModelConfig, head: bool) -> String {
    let backbone = format!(
        "{} (width {}, {} stem, {} input channels)",
        c.arch.name(),
        c.width(),
        if c.small_stem { "small" } else { "standard" },
        c.in_channels
    );
    if !head {
        return format!("{backbone}, no projection head");
    }
    let layers = if c.hidden_mlp == 0 {
        format!("linear head {} -> {}", c.feature_dim(), c.feat_dim)
    } else {
        let bn = if c.head_bn { " (BN)" } else { "" };
        format!("head {} -> {}{bn} -> {}", c.feature_dim(), c.hidden_mlp, c.feat_dim)
    };
    format!("{backbone}, {layers}, prototypes {:?}", c.prototypes)
}
