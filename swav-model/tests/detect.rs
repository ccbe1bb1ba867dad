//! Architecture detection: the configuration recognised from a state dict's names and shapes is the
//! one that built it (round trips through `SwavModel::new` for many configurations, the PyTorch-made
//! fixtures' own configurations, the wide ResNet-50s from shapes computed here independently), and
//! what cannot be recognised is named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use swav_model::checkpoint::{model_state, NamedTensors, Value};
use swav_model::detect::{default_head, detect, DEFAULT_FEAT_DIM, DEFAULT_PROTOTYPES};
use swav_model::torch::read_torch_file;
use swav_model::{Arch, ModelConfig, SwavModel};

fn cfg(arch: Arch, width: Option<usize>) -> ModelConfig {
    ModelConfig {
        arch,
        width,
        small_stem: false,
        in_channels: 3,
        hidden_mlp: 16,
        head_bn: true,
        feat_dim: 8,
        prototypes: vec![10],
        sync_bn: false,
        sync_bn_group: 0,
    }
}

fn state_of(config: &ModelConfig) -> NamedTensors {
    model_state(&mut SwavModel::new(config.clone(), 5).unwrap())
}

fn with_module_prefix(state: &NamedTensors) -> NamedTensors {
    NamedTensors {
        tensors: state.tensors.iter().map(|(k, v)| (format!("module.{k}"), v.clone())).collect(),
        metadata: BTreeMap::new(),
    }
}

#[test]
fn configurations_round_trip_through_a_built_model() {
    let configs = vec![
        cfg(Arch::Resnet18, Some(8)),
        cfg(Arch::Resnet18, None),
        cfg(Arch::Resnet34, Some(4)),
        cfg(Arch::Resnet50, Some(4)),
        cfg(Arch::Resnet50, Some(12)),
        ModelConfig { small_stem: true, in_channels: 1, ..cfg(Arch::Resnet18, Some(8)) },
        ModelConfig { small_stem: true, in_channels: 4, ..cfg(Arch::Resnet50, Some(4)) },
        ModelConfig { hidden_mlp: 0, ..cfg(Arch::Resnet18, Some(8)) },
        ModelConfig { head_bn: false, ..cfg(Arch::Resnet34, Some(4)) },
        ModelConfig { prototypes: vec![10, 7, 3], ..cfg(Arch::Resnet50, Some(4)) },
        ModelConfig { prototypes: vec![], ..cfg(Arch::Resnet18, Some(4)) },
        ModelConfig { hidden_mlp: 0, head_bn: false, prototypes: vec![5, 6], ..cfg(Arch::Resnet18, Some(4)) },
        // Spelled differently, built the same: detection gives the canonical spelling.
        cfg(Arch::Resnet50w2, Some(4)),
        cfg(Arch::Resnet18, Some(64)),
    ];
    for config in configs {
        let state = state_of(&config);
        let want = config.canonical();
        for (label, s) in [("plain", state.clone()), ("module.", with_module_prefix(&state))] {
            let d = detect(&s, None).unwrap_or_else(|e| panic!("{config:?} ({label}): {e}"));
            assert_eq!(d.config, want, "{label}");
            assert!(d.head && d.ignored.is_empty(), "{config:?}");
            // A caller's head is not used when the file has one.
            let other = ModelConfig { feat_dim: 99, prototypes: vec![1], ..want.clone() };
            assert_eq!(detect(&s, Some(&other)).unwrap().config, want);
        }
    }
    // The canonical spellings themselves.
    assert_eq!(cfg(Arch::Resnet50w2, Some(4)).canonical().arch, Arch::Resnet50);
    assert_eq!(cfg(Arch::Resnet18, Some(64)).canonical().width, None);
    assert_eq!(cfg(Arch::Resnet50, Some(256)).canonical(), cfg(Arch::Resnet50w4, None));
    assert!(ModelConfig { hidden_mlp: 0, head_bn: false, ..cfg(Arch::Resnet18, None) }.canonical().head_bn);
}

/// torchvision / official SwAV names and PyTorch shapes of a configuration, written out here from
/// the papers' layer tables rather than taken from swav-model.
fn torchvision_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let w = c.width.unwrap_or(match c.arch {
        Arch::Resnet50w2 => 128,
        Arch::Resnet50w4 => 256,
        Arch::Resnet50w5 => 320,
        _ => 64,
    });
    let bottleneck = !matches!(c.arch, Arch::Resnet18 | Arch::Resnet34);
    let depths = if c.arch == Arch::Resnet18 { [2, 2, 2, 2] } else { [3, 4, 6, 3] };
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let bn = |out: &mut Vec<(String, Vec<usize>)>, p: &str, n: usize| {
        for s in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{p}.{s}"), vec![n]));
        }
        out.push((format!("{p}.num_batches_tracked"), vec![]));
    };
    let k = if c.small_stem { 3 } else { 7 };
    out.push(("conv1.weight".into(), vec![w, c.in_channels, k, k]));
    bn(&mut out, "bn1", w);
    let mut cin = w;
    for (s, &depth) in depths.iter().enumerate() {
        let planes = w << s;
        let cout = if bottleneck { 4 * planes } else { planes };
        for b in 0..depth {
            let p = format!("layer{}.{b}", s + 1);
            if bottleneck {
                out.push((format!("{p}.conv1.weight"), vec![planes, cin, 1, 1]));
                out.push((format!("{p}.conv2.weight"), vec![planes, planes, 3, 3]));
                out.push((format!("{p}.conv3.weight"), vec![cout, planes, 1, 1]));
                bn(&mut out, &format!("{p}.bn3"), cout);
            } else {
                out.push((format!("{p}.conv1.weight"), vec![planes, cin, 3, 3]));
                out.push((format!("{p}.conv2.weight"), vec![planes, planes, 3, 3]));
            }
            bn(&mut out, &format!("{p}.bn1"), planes);
            bn(&mut out, &format!("{p}.bn2"), planes);
            if b == 0 && (s > 0 || cin != cout) {
                out.push((format!("{p}.downsample.0.weight"), vec![cout, cin, 1, 1]));
                bn(&mut out, &format!("{p}.downsample.1"), cout);
            }
            cin = cout;
        }
    }
    let (h, d) = (c.hidden_mlp, c.feat_dim);
    if h == 0 {
        out.push(("projection_head.weight".into(), vec![d, cin]));
        out.push(("projection_head.bias".into(), vec![d]));
    } else {
        out.push(("projection_head.0.weight".into(), vec![h, cin]));
        out.push(("projection_head.0.bias".into(), vec![h]));
        let last = if c.head_bn {
            bn(&mut out, "projection_head.1", h);
            3
        } else {
            2
        };
        out.push((format!("projection_head.{last}.weight"), vec![d, h]));
        out.push((format!("projection_head.{last}.bias"), vec![d]));
    }
    match c.prototypes.len() {
        1 => out.push(("prototypes.weight".into(), vec![c.prototypes[0], d])),
        _ => {
            for (i, &kk) in c.prototypes.iter().enumerate() {
                out.push((format!("prototypes.prototypes{i}.weight"), vec![kk, d]));
            }
        }
    }
    out
}

/// A state dict with the right names and shapes and no values (detection reads shapes only).
fn shapes_only(shapes: &[(String, Vec<usize>)]) -> NamedTensors {
    NamedTensors {
        tensors: shapes.iter().map(|(k, s)| (k.clone(), Value::F32 { shape: s.clone(), data: Vec::new() })).collect(),
        metadata: BTreeMap::new(),
    }
}

#[test]
fn the_independent_layer_table_matches_built_models() {
    for config in [
        cfg(Arch::Resnet18, Some(8)),
        cfg(Arch::Resnet34, Some(4)),
        cfg(Arch::Resnet50, Some(4)),
        ModelConfig { small_stem: true, hidden_mlp: 0, prototypes: vec![3, 4], ..cfg(Arch::Resnet50, Some(4)) },
        ModelConfig { head_bn: false, in_channels: 1, ..cfg(Arch::Resnet18, Some(4)) },
    ] {
        let built: Vec<(String, Vec<usize>)> =
            state_of(&config).tensors.into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
        let mut table = torchvision_shapes(&config);
        table.sort();
        assert_eq!(table, built, "{config:?}");
    }
}

#[test]
fn wide_resnets_and_the_official_model_are_named_from_their_shapes() {
    let official = ModelConfig::swav_resnet50();
    assert_eq!(detect(&shapes_only(&torchvision_shapes(&official)), None).unwrap().config, official);
    for (arch, width) in [(Arch::Resnet50w2, 128), (Arch::Resnet50w4, 256), (Arch::Resnet50w5, 320)] {
        let c = ModelConfig { arch, width: None, hidden_mlp: 2 * width, feat_dim: 128, ..official.clone() };
        let d = detect(&shapes_only(&torchvision_shapes(&c)), None).unwrap();
        assert_eq!(d.config, c, "{arch:?}");
        assert_eq!(d.config.width(), width);
        // Given as resnet50 at that width: the same network, named by its arch.
        let spelled = ModelConfig { arch: Arch::Resnet50, width: Some(width), ..c.clone() };
        assert_eq!(detect(&shapes_only(&torchvision_shapes(&spelled)), None).unwrap().config, c);
    }
    // A ResNet-50 at a width that has no name keeps it explicit.
    let odd = ModelConfig { width: Some(96), ..official.clone() };
    let d = detect(&shapes_only(&torchvision_shapes(&odd)), None).unwrap();
    assert_eq!((d.config.arch, d.config.width), (Arch::Resnet50, Some(96)));
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch")
}

#[derive(serde::Deserialize)]
struct Fixture {
    file: String,
    kind: String,
    model_config: Option<ModelConfig>,
    strict: bool,
}

fn model_fixtures() -> Vec<Fixture> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        fixtures: Vec<Fixture>,
    }
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    let m: Manifest = serde_json::from_str(&text).unwrap();
    m.fixtures.into_iter().filter(|f| f.kind == "model").collect()
}

#[test]
fn every_pytorch_fixture_is_recognised() {
    let all = model_fixtures();
    assert_eq!(all.len(), 6);
    for f in all {
        let state = read_torch_file(&fixtures().join(&f.file)).unwrap().state;
        let made_with = f.model_config.unwrap().canonical();
        let d = detect(&state, None).unwrap_or_else(|e| panic!("{}: {e}", f.file));
        if f.strict {
            assert_eq!(d.config, made_with, "{}", f.file);
            assert!(d.head && d.ignored.is_empty(), "{}", f.file);
        } else {
            // torchvision: a backbone and a classifier.
            assert!(!d.head, "{}", f.file);
            assert_eq!(d.ignored, ["fc.bias", "fc.weight"], "{}", f.file);
            let backbone = |c: &ModelConfig| (c.arch, c.width, c.small_stem, c.in_channels);
            assert_eq!(backbone(&d.config), backbone(&made_with), "{}", f.file);
            assert_eq!(d.config, default_head(&d.config).canonical());
            assert_eq!(
                (d.config.hidden_mlp, d.config.feat_dim, d.config.prototypes.clone()),
                (d.config.feature_dim(), DEFAULT_FEAT_DIM, vec![DEFAULT_PROTOTYPES])
            );
            // The caller's head replaces the defaults.
            let given = detect(&state, Some(&made_with)).unwrap();
            assert_eq!(given.config, made_with, "{}", f.file);
            assert!(!given.head);
        }
    }
}

fn err(state: &NamedTensors) -> String {
    detect(state, None).unwrap_err().to_string()
}

fn edited(config: &ModelConfig, edit: impl FnOnce(&mut Vec<(String, Vec<usize>)>)) -> NamedTensors {
    let mut table = torchvision_shapes(config);
    edit(&mut table);
    shapes_only(&table)
}

#[test]
fn what_cannot_be_recognised_is_named() {
    let r50 = cfg(Arch::Resnet50, Some(8));
    let r18 = cfg(Arch::Resnet18, Some(8));
    let cases: Vec<(&str, NamedTensors, Vec<&str>)> = vec![
        ("empty", NamedTensors::default(), vec!["no `conv1.weight`", "0 tensors"]),
        (
            "prefixed",
            edited(&r18, |t| t.iter_mut().for_each(|(k, _)| *k = format!("backbone.{k}"))),
            vec!["`backbone.conv1.weight`", "prefix `backbone.`"],
        ),
        ("5x5 stem", edited(&r18, |t| t[0].1 = vec![8, 3, 5, 5]), vec!["`conv1.weight`", "[8, 3, 5, 5]", "5x5 stem"]),
        (
            "ResNet-101",
            edited(&r50, |t| {
                let extra: Vec<(String, Vec<usize>)> = (6..23)
                    .flat_map(|b| {
                        [("conv1", vec![32, 128, 1, 1]), ("conv2", vec![32, 32, 3, 3]), ("conv3", vec![128, 32, 1, 1])]
                            .map(|(c, s)| (format!("layer3.{b}.{c}.weight"), s))
                    })
                    .collect();
                t.extend(extra);
            }),
            vec!["[3, 4, 23, 3]", "ResNet-101"],
        ),
        (
            "wide_resnet50_2",
            edited(&r50, |t| {
                for (k, s) in t.iter_mut() {
                    if k == "layer1.0.conv1.weight" {
                        *s = vec![16, 8, 1, 1];
                    }
                }
            }),
            vec!["`layer1.0.conv1.weight`", "[16, 8, 1, 1]", "[8, 8, 1, 1]", "wide"],
        ),
        (
            "mixed blocks",
            edited(&r50, |t| t.retain(|(k, _)| !k.starts_with("layer3.0.conv3"))),
            vec!["`layer3` has basic"],
        ),
        (
            "missing block",
            edited(&r18, |t| t.retain(|(k, _)| !k.starts_with("layer2.1."))),
            vec!["basic blocks per stage [2, 1, 2, 2]"],
        ),
        (
            "gap in blocks",
            edited(&r50, |t| t.retain(|(k, _)| !k.starts_with("layer3.2."))),
            vec!["`layer3`", "[2] are missing"],
        ),
        (
            "absurd block index",
            edited(&r18, |t| t.push(("layer2.99999999999.conv1.weight".into(), vec![16, 16, 3, 3]))),
            vec!["`layer2` has blocks [0, 1, 99999999999]", "[2] are missing"],
        ),
        ("no stage", edited(&r18, |t| t.retain(|(k, _)| !k.starts_with("layer4."))), vec!["no `layer4.*`"]),
        (
            "half a head",
            edited(&r18, |t| t.retain(|(k, _)| !k.starts_with("projection_head.3"))),
            vec!["`projection_head.0.weight` without `projection_head.3.weight`"],
        ),
        (
            "head on other features",
            edited(&r18, |t| {
                for (k, s) in t.iter_mut() {
                    if k == "projection_head.0.weight" {
                        *s = vec![16, 32];
                    }
                }
            }),
            vec!["`projection_head.0.weight` takes 32 inputs but the backbone gives 64"],
        ),
        (
            "prototypes of another dimension",
            edited(&r18, |t| {
                for (k, s) in t.iter_mut() {
                    if k == "prototypes.weight" {
                        *s = vec![10, 9];
                    }
                }
            }),
            vec!["`prototypes.weight` takes 9 inputs but the projection head gives 8"],
        ),
        (
            "prototypes without a head",
            edited(&r18, |t| t.retain(|(k, _)| !k.starts_with("projection_head"))),
            vec!["`prototypes.weight` but no projection head"],
        ),
        (
            "both prototype forms",
            edited(&r18, |t| t.push(("prototypes.prototypes0.weight".into(), vec![3, 8]))),
            vec!["both `prototypes.weight` and `prototypes.prototypes0.weight`"],
        ),
        (
            "3-D linear weight",
            edited(&r18, |t| t.push(("projection_head.weight".into(), vec![3, 8, 1]))),
            vec!["`projection_head.weight` has shape [3, 8, 1]"],
        ),
    ];
    for (label, state, needles) in cases {
        let e = err(&state);
        eprintln!("{label}: {e}");
        for n in needles {
            assert!(e.contains(n), "{label}: `{n}` not in: {e}");
        }
        assert!(e.starts_with("cannot recognise the network in the state dict"), "{label}: {e}");
    }
    // The same name with and without `module.` is ambiguous.
    let mut both = shapes_only(&torchvision_shapes(&r18));
    both.tensors.insert("module.conv1.weight".into(), Value::F32 { shape: vec![8, 3, 7, 7], data: vec![] });
    assert!(err(&both).contains("both with and without the `module.` prefix"), "{}", err(&both));
}
