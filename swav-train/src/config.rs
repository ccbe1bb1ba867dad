//! The training configuration: one TOML document with three tables, `[model]` (swav-model's
//! `ModelConfig`), `[crops]` (swav-data's `MultiCropConfig`) and `[train]` (below). Presets are such
//! documents shipped in the binary; `--set key=value` edits any field by its dotted path before the
//! document is parsed, so unknown keys and bad values are refused by the same parser, naming the key.
//! Every check happens before any work starts.

use serde::{Deserialize, Serialize};
use swav_data::MultiCropConfig;
use swav_model::ModelConfig;
use swav_tensor::ops::winograd::ConvAlgorithm;

use crate::TrainError;

/// Hyper-parameters of the SwAV optimisation (the official `main_swav.py` flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the dataset.
    pub epochs: usize,
    /// Images per step (on this process).
    pub batch_size: usize,
    /// Peak learning rate, reached after the warm-up.
    pub base_lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub final_lr: f64,
    /// Linear warm-up from `start_warmup` to `base_lr` over this many epochs. Required: the official
    /// scripts set it per recipe (10 at batch 4096, 0 at batch 256), and main_swav.py's default of 10
    /// would be most of a short run.
    pub warmup_epochs: usize,
    /// Learning rate at the first warm-up iteration.
    #[serde(default)]
    pub start_warmup: f64,
    /// Weight decay (L2, applied through the optimiser, also inside LARC's trust ratio).
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// SGD momentum.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// LARC trust coefficient; LARS is applied when `lars` is true (the official setting).
    #[serde(default = "default_true")]
    pub lars: bool,
    /// LARC trust coefficient (`eta`); only used when `lars` is true.
    #[serde(default = "default_trust")]
    pub trust_coefficient: f64,
    /// Softmax temperature of the swapped prediction.
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Sinkhorn regularisation and iterations.
    #[serde(default = "default_epsilon")]
    pub epsilon: f32,
    /// Sinkhorn-Knopp iterations per assignment (the official default: 3).
    #[serde(default = "default_iters")]
    pub sinkhorn_iterations: usize,
    /// Crops whose codes are computed (the large ones).
    #[serde(default = "default_assign")]
    pub crops_for_assign: Vec<usize>,
    /// The prototypes get no update (weight decay included) during the first iterations. Required: the
    /// official scripts set it per recipe (313 at batch 4096, 5005 at batch 256), and no default can
    /// fit both, while 0 would silently turn the freezing off.
    pub freeze_prototypes_niters: usize,
    /// Embeddings kept per assigned crop (0: no queue); rounded down to a multiple of the batch.
    #[serde(default)]
    pub queue_length: usize,
    /// Epoch (0-based) from which the queue is filled and used; before it, codes come from the batch alone.
    #[serde(default = "default_queue_start")]
    pub epoch_queue_starts: usize,
    /// Seed of every random stream (main_swav.py's default: 31).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Loader worker threads (0: one per core, minus one for compute when there are several).
    #[serde(default)]
    pub workers: usize,
    /// Batches prepared ahead by the loader (at least 1): more hides loading time at the cost of host memory.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Checkpoint every this many epochs (and always at the end and on Ctrl-C).
    #[serde(default = "default_one")]
    pub checkpoint_every_epochs: usize,
    /// Checkpoints kept in the run directory (older ones are removed).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Every this many epochs the model file is also archived as `checkpoints/archive/ckp-E.safetensors`
    /// (E the 0-based epoch index, as main_swav.py names its `ckp-E.pth`), and after the last epoch;
    /// archives are never pruned. main_swav.py's default: 25. 0: no archives.
    #[serde(default = "default_checkpoint_freq")]
    pub checkpoint_freq: usize,
    /// Convolution algorithms of the engine (`auto`, `winograd2`, `direct`, `measured`: the fastest per
    /// layer shape on this machine, recorded in the run folder's `conv-plan.json`; or one kernel
    /// wherever it applies: `im2col`, `winograd-f2`, `winograd-f4`): part of the run, because the choice
    /// changes the last bits and a resumed run must make the same one to stay bit-identical.
    #[serde(default, with = "conv_name")]
    pub conv: ConvAlgorithm,
    /// Start a new run from the weights of this model file (swav-rs, PyTorch `.pth`/`.pth.tar`, or a
    /// safetensors state dict) instead of a random initialisation: a fresh optimiser, the schedule from
    /// step 0. Recorded so that the run says where it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// Precision. On a CUDA device, the storage of the activations: `bf16` (mixed precision like
    /// PyTorch's autocast: convolutions, batch norms and pools in bf16 with fp32 accumulation; pooled
    /// features, head, scores, loss and Sinkhorn in fp32; fp32 master weights) or `fp32`; absent: bf16.
    /// On the CPU, what the convolutions multiply: `bf16` rounds their factors (im2col, and Winograd
    /// F(2,3)'s transformed tiles) to bf16 with fp32 sums, only where the CPU has AVX512_BF16; absent or
    /// `fp32`: fp32. Recorded, so a resume computes the same bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// With `init`: take only the backbone (`conv1`, `bn1`, `layer*`); the head and prototypes start
    /// from their random initialisation.
    #[serde(default)]
    pub init_backbone_only: bool,
}

/// Training precision (see `TrainConfig::precision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 everywhere.
    Fp32,
    /// On CUDA, bf16 activations with fp32 accumulation and master weights; on the CPU, bf16 factors of
    /// the convolutions' products with fp32 sums.
    Bf16,
}

/// `ConvAlgorithm` as its name in TOML.
mod conv_name {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use swav_tensor::ops::winograd::ConvAlgorithm;

    pub fn serialize<S: Serializer>(a: &ConvAlgorithm, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(a.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ConvAlgorithm, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

fn default_wd() -> f64 {
    1e-6
}
fn default_momentum() -> f64 {
    0.9
}
fn default_true() -> bool {
    true
}
fn default_trust() -> f64 {
    0.001
}
fn default_temperature() -> f32 {
    0.1
}
fn default_epsilon() -> f32 {
    0.05
}
fn default_iters() -> usize {
    3
}
fn default_assign() -> Vec<usize> {
    vec![0, 1]
}
fn default_queue_start() -> usize {
    15
}
fn default_prefetch() -> usize {
    2
}
fn default_one() -> usize {
    1
}
fn default_keep() -> usize {
    3
}
fn default_seed() -> u64 {
    31
}
fn default_checkpoint_freq() -> usize {
    25
}

/// A whole training configuration, as presets and `config.toml` files write it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The network: backbone, projection head and prototypes.
    pub model: ModelConfig,
    /// The multi-crop augmentation.
    pub crops: MultiCropConfig,
    /// The optimisation.
    pub train: TrainConfig,
}

/// A preset: name, one-line description, TOML source.
pub struct Preset {
    /// Its name, as given to `--preset`.
    pub name: &'static str,
    /// One line for the preset list.
    pub about: &'static str,
    /// The TOML document, parsed by [`load`].
    pub toml: &'static str,
}

/// Every preset shipped in the binary.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "imagenet-rn50-100ep-bs4096",
        about:
            "official scripts/swav_100ep_pretrain.sh: ResNet-50, 100 ep, batch 4096, 2x224+6x96 (72.1% linear top-1)",
        toml: include_str!("../presets/imagenet-rn50-100ep-bs4096.toml"),
    },
    Preset {
        name: "imagenet-rn50-200ep-bs4096",
        about: "official scripts/swav_200ep_pretrain.sh: ResNet-50, 200 ep, batch 4096, 2x224+6x96 (73.9%)",
        toml: include_str!("../presets/imagenet-rn50-200ep-bs4096.toml"),
    },
    Preset {
        name: "imagenet-rn50-400ep-bs4096",
        about: "official scripts/swav_400ep_pretrain.sh: ResNet-50, 400 ep, batch 4096, 2x224+6x96 (74.6%)",
        toml: include_str!("../presets/imagenet-rn50-400ep-bs4096.toml"),
    },
    Preset {
        name: "imagenet-rn50-800ep-bs4096",
        about: "official scripts/swav_800ep_pretrain.sh: ResNet-50, 800 ep, batch 4096, 2x224+6x96 (75.3%)",
        toml: include_str!("../presets/imagenet-rn50-800ep-bs4096.toml"),
    },
    Preset {
        name: "imagenet-rn50-200ep-bs256",
        about: "official scripts/swav_200ep_bs256_pretrain.sh: ResNet-50, 200 ep, batch 256, queue 3840 (72.7%)",
        toml: include_str!("../presets/imagenet-rn50-200ep-bs256.toml"),
    },
    Preset {
        name: "imagenet-rn50-400ep-bs256",
        about: "official scripts/swav_400ep_bs256_pretrain.sh: ResNet-50, 400 ep, batch 256, queue 3840 (74.3%)",
        toml: include_str!("../presets/imagenet-rn50-400ep-bs256.toml"),
    },
    Preset {
        name: "imagenet-rn50-400ep-2x224-bs4096",
        about: "official scripts/swav_400ep_2x224_pretrain.sh: ResNet-50, 400 ep, 2x224 only (70.1%)",
        toml: include_str!("../presets/imagenet-rn50-400ep-2x224-bs4096.toml"),
    },
    Preset {
        name: "imagenet-rn50w2-400ep-bs4096",
        about: "official scripts/swav_RN50w2_400ep_pretrain.sh: ResNet-50-w2, hidden 8192, 2x224+4x96 (77.3%)",
        toml: include_str!("../presets/imagenet-rn50w2-400ep-bs4096.toml"),
    },
    Preset {
        name: "imagenet-rn50w4-400ep-bs2560",
        about: "official scripts/swav_RN50w4_400ep_pretrain.sh: ResNet-50-w4, hidden 8192, queue 2560 (77.9%)",
        toml: include_str!("../presets/imagenet-rn50w4-400ep-bs2560.toml"),
    },
    Preset {
        name: "imagenet-rn50w5-400ep-bs2560",
        about: "ResNet-50-w5 (78.5% published, no script): the RN50-w4 script with the w5 arch",
        toml: include_str!("../presets/imagenet-rn50w5-400ep-bs2560.toml"),
    },
    Preset {
        name: "fmnist-rn18",
        about: "ResNet-18 small stem on Fashion-MNIST, 2x28+4x16, batch 256, lr 0.6 LARS (GPU reference recipe)",
        toml: include_str!("../presets/fmnist-rn18.toml"),
    },
    Preset {
        name: "cpu-demo",
        about: "narrow ResNet-18 on 28-px grayscale images, 2x28 crops, sized for minutes on a few CPU cores",
        toml: include_str!("../presets/cpu-demo.toml"),
    },
    Preset {
        name: "cpu-tiny",
        about: "a very small network and few crops, for smoke tests",
        toml: include_str!("../presets/cpu-tiny.toml"),
    },
];

/// The preset named `name`, or a configuration error listing the available names.
pub fn preset(name: &str) -> Result<&'static Preset, TrainError> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        TrainError::Config(format!("unknown preset `{name}` (available: {})", names.join(", ")))
    })
}

/// Parses a TOML document, applies `key=value` overrides (dotted paths, e.g. `train.epochs=5`,
/// `model.width=16`, `crops.augment.blur_p=0`; values are TOML literals, bare words are strings) and
/// validates the result.
pub fn load(source: &str, overrides: &[String]) -> Result<Config, TrainError> {
    let mut doc: toml::Table = source.parse().map_err(|e: toml::de::Error| TrainError::Config(e.to_string()))?;
    for o in overrides {
        apply_override(&mut doc, o)?;
    }
    let config: Config =
        toml::Value::Table(doc).try_into().map_err(|e: toml::de::Error| TrainError::Config(e.to_string()))?;
    config.validate()?;
    Ok(config)
}

fn apply_override(doc: &mut toml::Table, o: &str) -> Result<(), TrainError> {
    let (key, raw) = o.split_once('=').ok_or_else(|| TrainError::Config(format!("`--set {o}`: expected key=value")))?;
    let key = key.trim();
    let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed a table with key v"),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let (last, path) = parts
        .split_last()
        .filter(|(l, _)| !l.is_empty())
        .ok_or_else(|| TrainError::Config(format!("`--set {o}`: empty key")))?;
    let mut table = doc;
    for (i, p) in path.iter().enumerate() {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| TrainError::Config(format!("`--set {o}`: `{}` is not a table", parts[..=i].join("."))))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

impl Config {
    /// The configuration as a TOML document that [`load`] reads back unchanged.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serialises")
    }

    /// Checks every value that would otherwise fail (or silently misbehave) later, naming the key.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |key: &str, why: String| Err(TrainError::Config(format!("{key}: {why}")));
        let t = &self.train;
        self.model.validate().map_err(|e| TrainError::Config(format!("model: {e}")))?;
        self.crops.validate().map_err(|e| TrainError::Config(format!("crops: {e}")))?;
        for (key, values) in
            [("crops.augment.mean", &self.crops.augment.mean), ("crops.augment.std", &self.crops.augment.std)]
        {
            let c = self.model.in_channels;
            if let Some(v) = values.as_ref().filter(|v| v.len() != 1 && v.len() != c) {
                return bad(
                    key,
                    match c {
                        1 => format!(
                            "{} values for model.in_channels = 1: give 1 value (or set model.in_channels = 3 to train on colour)",
                            v.len()
                        ),
                        c => format!("{} values for model.in_channels = {c}: give 1 value or {c}", v.len()),
                    },
                );
            }
        }
        if self.model.prototypes.is_empty() {
            return bad("model.prototypes", "SwAV training needs at least one prototype head, e.g. [3000]".into());
        }
        if t.epochs == 0 {
            return bad("train.epochs", "must be at least 1".into());
        }
        if t.batch_size < 2 {
            return bad("train.batch_size", format!("{} (batch norm needs at least 2 images)", t.batch_size));
        }
        for (key, v) in [
            ("train.base_lr", t.base_lr),
            ("train.final_lr", t.final_lr),
            ("train.start_warmup", t.start_warmup),
            ("train.weight_decay", t.weight_decay),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(key, format!("{v} must be a finite number >= 0"));
            }
        }
        if !(0.0..1.0).contains(&t.momentum) {
            return bad("train.momentum", format!("{} must be in [0, 1)", t.momentum));
        }
        if !(t.trust_coefficient > 0.0 && t.trust_coefficient.is_finite()) {
            return bad("train.trust_coefficient", format!("{} must be positive", t.trust_coefficient));
        }
        if t.warmup_epochs >= t.epochs && t.warmup_epochs > 0 {
            return bad(
                "train.warmup_epochs",
                format!("{} must be smaller than train.epochs = {}", t.warmup_epochs, t.epochs),
            );
        }
        if !(t.temperature > 0.0 && t.temperature.is_finite()) {
            return bad("train.temperature", format!("{} must be positive", t.temperature));
        }
        if !(t.epsilon > 0.0 && t.epsilon.is_finite()) {
            return bad("train.epsilon", format!("{} must be positive", t.epsilon));
        }
        if t.sinkhorn_iterations == 0 {
            return bad("train.sinkhorn_iterations", "must be at least 1".into());
        }
        let crops = self.crops.num_crops();
        if t.crops_for_assign.is_empty() {
            return bad("train.crops_for_assign", "needs at least one crop".into());
        }
        if let Some(&c) = t.crops_for_assign.iter().find(|&&c| c >= crops) {
            return bad("train.crops_for_assign", format!("crop {c} does not exist ({crops} crops per image)"));
        }
        if crops < 2 {
            return bad("crops.groups", format!("{crops} crop per image: the swapped prediction needs at least 2"));
        }
        if t.queue_length > 0 && !t.queue_length.is_multiple_of(t.batch_size) {
            return bad(
                "train.queue_length",
                format!(
                    "{} is not a multiple of train.batch_size = {} (the official code rounds it down to {}; set that)",
                    t.queue_length,
                    t.batch_size,
                    t.queue_length / t.batch_size * t.batch_size
                ),
            );
        }
        if t.keep_checkpoints == 0 {
            return bad("train.keep_checkpoints", "must be at least 1".into());
        }
        if t.checkpoint_every_epochs == 0 {
            return bad("train.checkpoint_every_epochs", "must be at least 1".into());
        }
        if t.init_backbone_only && t.init.is_none() {
            return bad("train.init_backbone_only", "needs train.init (the model file to start from)".into());
        }
        if t.prefetch == 0 {
            return bad("train.prefetch", "must be at least 1".into());
        }
        Ok(())
    }

    /// Total number of crops per image.
    pub fn num_crops(&self) -> usize {
        self.crops.num_crops()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_validates() {
        for p in PRESETS {
            load(p.toml, &[]).unwrap_or_else(|e| panic!("preset {}: {e}", p.name));
        }
    }

    #[test]
    fn overrides_edit_nested_keys_and_unknown_keys_are_named() {
        let src = preset("cpu-tiny").unwrap().toml;
        let c =
            load(src, &["train.epochs=7".into(), "model.width=4".into(), "crops.augment.blur_p=0.25".into()]).unwrap();
        assert_eq!(c.train.epochs, 7);
        assert_eq!(c.model.width, Some(4));
        assert_eq!(c.crops.augment.blur_p, 0.25);
        let err = load(src, &["train.epochz=7".into()]).unwrap_err().to_string();
        assert!(err.contains("epochz"), "{err}");
        let err = load(src, &["train.batch_size=-3".into()]).unwrap_err().to_string();
        assert!(err.contains("batch_size"), "{err}");
        let err = load(src, &["train.queue_length=100".into(), "train.batch_size=64".into()]).unwrap_err().to_string();
        assert!(err.contains("train.queue_length") && err.contains("multiple"), "{err}");
        let err = load(src, &["train.crops_for_assign=[0, 9]".into()]).unwrap_err().to_string();
        assert!(err.contains("crops_for_assign"), "{err}");
        assert!(load(src, &["nonsense".into()]).is_err());
    }

    #[test]
    fn every_published_recipe_names_its_script_and_accuracy() {
        let imagenet: Vec<&Preset> = PRESETS.iter().filter(|p| p.name.starts_with("imagenet-")).collect();
        assert_eq!(imagenet.len(), 10);
        for p in imagenet {
            assert!(p.toml.contains("scripts/swav_") && p.toml.contains('%'), "{}: script or accuracy missing", p.name);
            assert!(p.about.contains('%'), "{}", p.name);
            let c = load(p.toml, &[]).unwrap();
            assert!(c.train.freeze_prototypes_niters > 0 && c.train.checkpoint_freq == 25, "{}", p.name);
        }
    }

    #[test]
    fn keys_without_a_safe_default_are_required_and_named() {
        let src = preset("cpu-tiny").unwrap().toml;
        for key in ["freeze_prototypes_niters", "warmup_epochs"] {
            let without: String = src.lines().filter(|l| !l.starts_with(key)).map(|l| format!("{l}\n")).collect();
            let err = load(&without, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        // Omitted keys with a default take main_swav.py's.
        let without: String = src.lines().filter(|l| !l.starts_with("seed")).map(|l| format!("{l}\n")).collect();
        let c = load(&without, &[]).unwrap();
        assert_eq!((c.train.seed, c.train.checkpoint_freq, c.train.epoch_queue_starts), (31, 25, 15));
    }

    #[test]
    fn configuration_round_trips_through_toml() {
        let c = load(preset("fmnist-rn18").unwrap().toml, &[]).unwrap();
        assert_eq!(load(&c.to_toml(), &[]).unwrap(), c);
    }
}
