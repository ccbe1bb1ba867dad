//! Recognising the network of a state dict from its tensor names and shapes, so that files written by
//! other tools (the official SwAV checkpoints, torchvision ResNets, safetensors conversions of either)
//! can be used without being told what they hold.
//!
//! Names are torchvision's and the official SwAV code's (see [`crate::checkpoint`]), with or without
//! DistributedDataParallel's `module.` prefix. What is read from where:
//!
//! | what | from |
//! |---|---|
//! | `small_stem` | `conv1.weight` `[w, c, k, k]`: k = 7 is the standard stem (7x7/2 and max-pool), k = 3 the small-image stem (3x3/1, no max-pool; a state dict cannot tell strides, this is swav-rs's small stem) |
//! | `width`, `in_channels` | `conv1.weight`: w and c |
//! | block kind | `layer1.0.conv3.weight` present: bottleneck (ResNet-50 family), else basic (ResNet-18/34) |
//! | `arch` | block kind and the number of blocks of `layer1` .. `layer4`: basic `[2, 2, 2, 2]` ResNet-18, basic `[3, 4, 6, 3]` ResNet-34, bottleneck `[3, 4, 6, 3]` ResNet-50, named `resnet50w2` / `w4` / `w5` at widths 128 / 256 / 320 |
//! | `hidden_mlp`, `head_bn`, `feat_dim` | `projection_head.0.weight` `[h, F]`, `.1` (BatchNorm1d: `head_bn`), `.3.weight` `[d, h]` (or `.2` without the BN); a single `projection_head.weight` `[d, F]` is `hidden_mlp = 0` |
//! | `prototypes` | `prototypes.weight` `[K, d]`, or `prototypes.prototypes{i}.weight` for several heads (the official `MultiPrototypes`); none: an empty list (the official `nmb_prototypes = 0`) |
//!
//! The result is always in [`ModelConfig::canonical`] form. A state dict without a projection head (a
//! torchvision ResNet, or a backbone exported alone) gives a backbone-only [`Detection`]: its head and
//! prototypes come from a configuration the caller gives, else from the defaults, the official head
//! on the backbone's features: `F -> F (BN, ReLU) -> 128`, 3000 prototypes ([`DEFAULT_FEAT_DIM`],
//! [`DEFAULT_PROTOTYPES`]; for ResNet-50 exactly the official 2048-2048-128 head). torchvision's
//! classifier `fc.weight` / `fc.bias` is not part of a SwAV network: it is listed in
//! [`Detection::ignored`] for the loader to leave out. Every other name is left to the loader, which
//! names what it does not expect.
//!
//! Shapes are checked only as far as they decide the configuration (and to name wide or grouped
//! ResNets, which swav-rs does not build); the loader then checks every tensor against the network.

use std::collections::{BTreeMap, BTreeSet};

use crate::checkpoint::NamedTensors;
use crate::config::{Arch, BlockKind, ModelConfig};
use crate::{ModelError, Result};

/// Embedding dimension of the default head of a backbone-only state dict (the official `feat_dim`).
pub const DEFAULT_FEAT_DIM: usize = 128;
/// Prototypes of the default head of a backbone-only state dict (the official `nmb_prototypes`).
pub const DEFAULT_PROTOTYPES: usize = 3000;

/// What [`detect`] recognised.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// The network, in canonical form. For a backbone-only state dict ([`Detection::head`] false)
    /// the head and prototypes are the caller's or the defaults, not the file's.
    pub config: ModelConfig,
    /// Whether the state dict holds the projection head (and the prototypes it has, if any).
    pub head: bool,
    /// Names of the state dict (as spelled there) that are not part of a SwAV network and must be
    /// left out when loading: torchvision's classifier `fc.weight`, `fc.bias`.
    pub ignored: Vec<String>,
}

/// The head a backbone-only configuration gets when the caller gives none: see the module docs.
pub fn default_head(backbone: &ModelConfig) -> ModelConfig {
    ModelConfig {
        hidden_mlp: backbone.feature_dim(),
        head_bn: true,
        feat_dim: DEFAULT_FEAT_DIM,
        prototypes: vec![DEFAULT_PROTOTYPES],
        ..backbone.clone()
    }
}

/// Recognises the network of `state` (see the module docs). `head` gives the projection head and
/// prototypes of a backbone-only state dict (its `hidden_mlp`, `head_bn`, `feat_dim`, `prototypes`;
/// the rest of it is ignored); it is not used when the state dict has a head of its own.
pub fn detect(state: &NamedTensors, head: Option<&ModelConfig>) -> Result<Detection> {
    let shapes = stripped_shapes(state)?;
    let backbone = detect_backbone(&shapes)?;
    let features = backbone.feature_dim();
    let detected_head = detect_head(&shapes, features)?;
    let ignored: Vec<String> =
        state.tensors.keys().filter(|k| matches!(strip(k), "fc.weight" | "fc.bias")).cloned().collect();
    let (config, has_head) = match detected_head {
        Some((hidden_mlp, head_bn, feat_dim, prototypes)) => {
            (ModelConfig { hidden_mlp, head_bn, feat_dim, prototypes, ..backbone }, true)
        }
        None => {
            let given = head.cloned().unwrap_or_else(|| default_head(&backbone));
            let config = ModelConfig {
                hidden_mlp: given.hidden_mlp,
                head_bn: given.head_bn,
                feat_dim: given.feat_dim,
                prototypes: given.prototypes,
                ..backbone
            };
            (config, false)
        }
    };
    config.validate().map_err(|e| unrecognised(e.to_string()))?;
    Ok(Detection { config: config.canonical(), head: has_head, ignored })
}

fn unrecognised(detail: String) -> ModelError {
    ModelError::Unrecognised { path: "the state dict".into(), detail }
}

fn strip(name: &str) -> &str {
    name.strip_prefix("module.").unwrap_or(name)
}

/// Shapes by name with `module.` stripped; the same name with and without it is ambiguous.
fn stripped_shapes(state: &NamedTensors) -> Result<BTreeMap<&str, &[usize]>> {
    let mut shapes = BTreeMap::new();
    for (key, value) in &state.tensors {
        if shapes.insert(strip(key), value.shape()).is_some() {
            return Err(unrecognised(format!(
                "`{key}` is there both with and without the `module.` prefix: which one is the network's is ambiguous"
            )));
        }
    }
    Ok(shapes)
}

fn shape_of<'a>(shapes: &BTreeMap<&str, &'a [usize]>, name: &str) -> Option<&'a [usize]> {
    shapes.get(name).copied()
}

/// Arch, width, stem and input channels; the head fields are placeholders.
fn detect_backbone(shapes: &BTreeMap<&str, &[usize]>) -> Result<ModelConfig> {
    let Some(conv1) = shape_of(shapes, "conv1.weight") else {
        return Err(unrecognised(no_stem_hint(shapes)));
    };
    let &[width, in_channels, kh, kw] = conv1 else {
        return Err(unrecognised(format!("`conv1.weight` has shape {conv1:?}: a convolution weight is 4-D")));
    };
    let small_stem = match (kh, kw) {
        (7, 7) => false,
        (3, 3) => true,
        _ => {
            return Err(unrecognised(format!(
                "`conv1.weight` has shape {conv1:?}: a {kh}x{kw} stem; swav-rs builds the 7x7 stem and the 3x3 small-image stem"
            )))
        }
    };
    if width == 0 || in_channels == 0 {
        return Err(unrecognised(format!("`conv1.weight` has shape {conv1:?}: an empty dimension")));
    }
    let kind = if shapes.contains_key("layer1.0.conv3.weight") {
        BlockKind::Bottleneck
    } else if shapes.contains_key("layer1.0.conv2.weight") {
        BlockKind::Basic
    } else {
        return Err(unrecognised(
            "no `layer1.0.conv2.weight` or `layer1.0.conv3.weight`: the residual stages of a ResNet are missing".into(),
        ));
    };
    let mut depths = [0usize; 4];
    for (s, depth) in depths.iter_mut().enumerate() {
        *depth = stage_depth(shapes, s + 1)?;
        let has_conv3 = shapes.contains_key(format!("layer{}.0.conv3.weight", s + 1).as_str());
        if has_conv3 != (kind == BlockKind::Bottleneck) {
            return Err(unrecognised(format!(
                "`layer1` has {} blocks but `layer{}` has {}: a ResNet has one kind of block",
                block_name(kind),
                s + 1,
                if has_conv3 { "bottleneck" } else { "basic" }
            )));
        }
    }
    let arch = match (kind, depths) {
        (BlockKind::Basic, [2, 2, 2, 2]) => Arch::Resnet18,
        (BlockKind::Basic, [3, 4, 6, 3]) => Arch::Resnet34,
        (BlockKind::Bottleneck, [3, 4, 6, 3]) => Arch::Resnet50,
        (kind, depths) => {
            let known = match (kind, depths) {
                (BlockKind::Bottleneck, [3, 4, 23, 3]) => " (ResNet-101)",
                (BlockKind::Bottleneck, [3, 8, 36, 3]) => " (ResNet-152)",
                _ => "",
            };
            return Err(unrecognised(format!(
                "{} blocks per stage {depths:?}{known}: swav-rs builds ResNet-18 (basic [2, 2, 2, 2]), ResNet-34 (basic [3, 4, 6, 3]) and ResNet-50 and its widenings (bottleneck [3, 4, 6, 3])",
                block_name(kind)
            )));
        }
    };
    // The first block's convolutions have `width` channels in a plain ResNet: torchvision's
    // wide_resnet50_2 doubles them and ResNeXt groups them, neither of which swav-rs builds.
    let k1 = if kind == BlockKind::Basic { 3 } else { 1 };
    for (name, want) in
        [("layer1.0.conv1.weight", [width, width, k1, k1]), ("layer1.0.conv2.weight", [width, width, 3, 3])]
    {
        match shape_of(shapes, name) {
            Some(s) if s == want => {}
            Some(s) => {
                return Err(unrecognised(format!(
                    "`{name}` has shape {s:?} where a ResNet of width {width} (from `conv1.weight`) has {want:?}: wide (wide_resnet50_2) and grouped (ResNeXt) ResNets are not supported"
                )))
            }
            None => return Err(unrecognised(format!("`{name}` is missing"))),
        }
    }
    let config = ModelConfig {
        arch,
        width: Some(width),
        small_stem,
        in_channels,
        hidden_mlp: 0,
        head_bn: true,
        feat_dim: 1,
        prototypes: Vec::new(),
        sync_bn: false,
        sync_bn_group: 0,
    };
    Ok(config.canonical())
}

fn block_name(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::Basic => "basic",
        BlockKind::Bottleneck => "bottleneck",
    }
}

/// Blocks of `layer{stage}`: the indices `b` of `layer{stage}.{b}.*` must be `0..n`.
fn stage_depth(shapes: &BTreeMap<&str, &[usize]>, stage: usize) -> Result<usize> {
    let prefix = format!("layer{stage}.");
    let blocks: BTreeSet<usize> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix(prefix.as_str()))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .collect();
    let n = blocks.len();
    if n == 0 {
        return Err(unrecognised(format!("no `layer{stage}.*` tensors: a ResNet has four stages")));
    }
    if blocks.iter().copied().ne(0..n) {
        // Some index below n is missing (n indices, not 0..n); list a few, never a range the file
        // could make huge (`layer1.99999999999.*`).
        let missing: Vec<usize> = (0..n).filter(|b| !blocks.contains(b)).take(8).collect();
        let shown: Vec<usize> = blocks.iter().copied().take(16).collect();
        let more = if n > 16 { " ..." } else { "" };
        return Err(unrecognised(format!(
            "`layer{stage}` has blocks {shown:?}{more}: block(s) {missing:?} are missing"
        )));
    }
    Ok(n)
}

/// Says why there is no stem, naming a prefix that hides it if there is one.
fn no_stem_hint(shapes: &BTreeMap<&str, &[usize]>) -> String {
    let prefixed = shapes.keys().find(|k| k.ends_with(".conv1.weight") && !k.contains("layer"));
    match prefixed {
        Some(k) => format!(
            "no `conv1.weight`, but `{k}`: the names carry the prefix `{}`; swav-rs reads torchvision / official SwAV names (`conv1.weight`, `layer1.0.conv1.weight`, ...), optionally behind `module.`",
            &k[..k.len() - "conv1.weight".len()]
        ),
        None => {
            let first: Vec<&str> = shapes.keys().take(5).copied().collect();
            format!(
                "no `conv1.weight` among its {} tensors (first: {}): not a ResNet with torchvision / official SwAV names",
                shapes.len(),
                if first.is_empty() { "none".to_string() } else { first.join(", ") }
            )
        }
    }
}

/// `(hidden_mlp, head_bn, feat_dim, prototypes)` of a head.
type HeadShape = (usize, bool, usize, Vec<usize>);

/// The head's shape, `None` without one.
fn detect_head(shapes: &BTreeMap<&str, &[usize]>, features: usize) -> Result<Option<HeadShape>> {
    let linear = |name: &str| -> Result<Option<(usize, usize)>> {
        match shape_of(shapes, name) {
            None => Ok(None),
            Some(&[o, i]) => Ok(Some((o, i))),
            Some(s) => Err(unrecognised(format!("`{name}` has shape {s:?}: a linear layer's weight is 2-D"))),
        }
    };
    let takes = |name: &str, got: usize, want: usize, what: &str| -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(unrecognised(format!("`{name}` takes {got} inputs but {what} gives {want}")))
        }
    };
    let head = if let Some((d, f)) = linear("projection_head.weight")? {
        takes("projection_head.weight", f, features, "the backbone")?;
        Some((0, true, d))
    } else if let Some((h, f)) = linear("projection_head.0.weight")? {
        takes("projection_head.0.weight", f, features, "the backbone")?;
        let bn =
            shapes.contains_key("projection_head.1.weight") || shapes.contains_key("projection_head.1.running_mean");
        let fc2 = if bn { "projection_head.3.weight" } else { "projection_head.2.weight" };
        let Some((d, hi)) = linear(fc2)? else {
            return Err(unrecognised(format!(
                "`projection_head.0.weight` without `{fc2}`: the official head is Linear (.0), BatchNorm1d (.1), ReLU, Linear (.3); without the batch norm, Linear (.0), ReLU, Linear (.2)"
            )));
        };
        takes(fc2, hi, h, "`projection_head.0`")?;
        Some((h, bn, d))
    } else {
        None
    };
    let mut prototypes = Vec::new();
    let single = linear("prototypes.weight")?;
    let mut i = 0;
    while let Some((k, d)) = linear(&format!("prototypes.prototypes{i}.weight"))? {
        prototypes.push((format!("prototypes.prototypes{i}.weight"), k, d));
        i += 1;
    }
    if let Some((k, d)) = single {
        if !prototypes.is_empty() {
            return Err(unrecognised(
                "both `prototypes.weight` and `prototypes.prototypes0.weight`: one prototype head or several, not both"
                    .into(),
            ));
        }
        prototypes.push(("prototypes.weight".into(), k, d));
    }
    if i == 0 && shapes.keys().any(|k| k.starts_with("prototypes.prototypes")) {
        return Err(unrecognised(
            "`prototypes.prototypes*` tensors without `prototypes.prototypes0.weight`: prototype heads are numbered from 0"
                .into(),
        ));
    }
    match head {
        Some((hidden, bn, d)) => {
            for (name, _, di) in &prototypes {
                takes(name, *di, d, "the projection head")?;
            }
            Ok(Some((hidden, bn, d, prototypes.into_iter().map(|(_, k, _)| k).collect())))
        }
        None if !prototypes.is_empty() => Err(unrecognised(format!(
            "`{}` but no projection head (`projection_head.*`): swav-rs puts prototypes on the projection head's output",
            prototypes[0].0
        ))),
        None => Ok(None),
    }
}
