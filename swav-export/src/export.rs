//! Walks a [`SwavModel`] and writes its evaluation-mode forward as an ONNX graph, NCHW throughout.
//!
//! ```text
//! images [batch, C, H, W]
//!   -> Conv (+BN) -> Relu [-> MaxPool 3x3/2 pad 1]                        stem
//!   -> blocks: (Conv (+BN) -> Relu)*, Conv (+BN), shortcut, Add -> Relu  layer1..layer4
//!   -> GlobalAveragePool -> Flatten                                     = features [batch, F]
//! with the head:
//!   -> Gemm (+BN) -> Relu -> Gemm   (or one Gemm)                       projection head
//!   -> x / Max(ReduceL2(x), 1e-12)                                      = embedding [batch, D]
//!   -> Gemm with each prototype matrix (transB)                         = scores, scores_1, ... [batch, K]
//! ```
//!
//! Batch norms use the running statistics. By default each is folded into the convolution or linear
//! layer before it (`w' = w s`, `b' = beta - mean s` with `s = gamma / sqrt(var + eps)`, computed in
//! f64); `fold_batchnorm: false` keeps explicit `BatchNormalization` nodes instead.
//!
//! The L2 normalisation is `ReduceL2 -> Max(., 1e-12) -> Div`, exactly PyTorch's `F.normalize` and
//! swav-model's forward. `LpNormalization` is not used: it has no epsilon clamp, so an all-zero
//! embedding would give NaN instead of zeros.
//!
//! Only standard operators of the default domain are used: Conv, BatchNormalization (unfolded only),
//! Relu, MaxPool, Add, GlobalAveragePool, Flatten, Gemm, ReduceL2, Max, Div.

use std::collections::BTreeSet;

use swav_model::head::ProjectionHead;
use swav_model::layers::{BatchNorm, Conv2d, Linear};
use swav_model::resnet::Block;
use swav_model::SwavModel;

use crate::graph::{value_info, Attr, Dim, Graph, Initializer};
use crate::proto::{data_location, field as f, len_delimited, Msg};
use crate::{ExportError, Result};
use swav_model::file::{META_INPUT_SIZE, META_MEAN, META_STD};
use swav_model::Preprocessing;

/// Opsets the exporter can write (13: the first with today's Flatten/ReduceL2/Gemm forms; 21: the
/// newest that the common runtimes all read).
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;
/// Opset written unless [`ExportOptions::opset`] says otherwise.
pub const DEFAULT_OPSET: i64 = 17;
/// Epsilon of the L2 normalisation's clamp (PyTorch's `F.normalize` default).
pub const L2_EPS: f32 = 1e-12;

/// Name of the graph's single input, NCHW float32 images normalised as the model's preprocessing says.
pub const INPUT_NAME: &str = "images";

/// The largest protobuf message (2 GiB - 1): an ONNX model whose tensors would make it larger keeps
/// them in an external data file instead (ResNet-50w5 with its head: 2.4 GB of weights).
pub const PROTOBUF_LIMIT: usize = i32::MAX as usize;
/// With external data, tensors of at least this many bytes go to the data file and smaller ones stay
/// in the protobuf (the `onnx` package's default `size_threshold`).
pub const EXTERNAL_MIN_BYTES: usize = 1024;
/// Offsets in the external data file are multiples of this: the ONNX specification asks for
/// multiples of the page size (4096) so that runtimes can memory-map the tensors.
pub const EXTERNAL_ALIGNMENT: usize = 4096;
/// The data file that [`to_onnx`] refers to; [`crate::export_to_file`] names it after the output
/// instead ([`data_file_name`]).
pub const DEFAULT_DATA_LOCATION: &str = "model.onnx.data";

/// The batch dimension of the graph's input and outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchDim {
    /// A symbolic `batch` dimension: any batch size at run time.
    Dynamic,
    /// Exactly this many images per run.
    Fixed(usize),
}

/// How a model is exported; the default writes `features` only, dynamic batch, opset [`DEFAULT_OPSET`].
#[derive(Clone, Debug, PartialEq)]
pub struct ExportOptions {
    /// Also output `embedding` (L2-normalised head output) and the prototype `scores`.
    pub with_head: bool,
    /// ONNX opset to target, within [`OPSETS`].
    pub opset: i64,
    /// Batch dimension of the input and outputs.
    pub batch: BatchDim,
    /// Fold every batch norm into the layer before it (default) instead of `BatchNormalization` nodes.
    pub fold_batchnorm: bool,
    /// Declare height and width as the preprocessing's `input_size` instead of symbolic `height` /
    /// `width` (the network itself takes any size).
    pub static_input_size: bool,
    /// Store the tensors in an external data file beside the `.onnx` even when the model would fit in
    /// one protobuf file. Models that would not fit ([`PROTOBUF_LIMIT`]) always use external data.
    pub external_data: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            with_head: false,
            opset: DEFAULT_OPSET,
            batch: BatchDim::Dynamic,
            fold_batchnorm: true,
            static_input_size: false,
            external_data: false,
        }
    }
}

/// A graph input or output: name and dimensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueInfo {
    /// The value's name in the graph.
    pub name: String,
    /// Its dimensions, outermost first (NCHW for the input).
    pub dims: Vec<Dim>,
}

/// The external data file of an exported model: the tensors' bytes, each at an offset that is a
/// multiple of [`EXTERNAL_ALIGNMENT`], zeros between them.
#[derive(Clone, Debug)]
pub struct ExternalData {
    /// The file name the `.onnx` refers to (`location`), relative to the `.onnx` file's folder.
    pub location: String,
    /// The file's contents.
    pub bytes: Vec<u8>,
    /// How many tensors are in it.
    pub tensors: usize,
}

/// An encoded ONNX model and what it holds.
#[derive(Clone, Debug)]
pub struct Exported {
    /// The serialised `ModelProto` (the `.onnx` file).
    pub bytes: Vec<u8>,
    /// With external data, the data file that must lie beside the `.onnx` file under its location.
    pub external: Option<ExternalData>,
    /// The graph's input ([`INPUT_NAME`]).
    pub input: ValueInfo,
    /// The graph's outputs, in the order of [`output_names`].
    pub outputs: Vec<ValueInfo>,
    /// Distinct operator types used, for checking a runtime supports them.
    pub op_types: BTreeSet<String>,
    /// Number of nodes in the graph.
    pub nodes: usize,
    /// Values stored in float initialisers (after folding).
    pub parameters: usize,
    /// The `ModelProto.ir_version` written (follows from the opset).
    pub ir_version: i64,
    /// `ModelProto.metadata_props`: preprocessing (input size, mean, std, layout) and the model configuration.
    pub metadata: Vec<(String, String)>,
}

/// The graph's output names: `features`, then with the head `embedding`, `scores` (prototype head 0)
/// and `scores_1`, `scores_2`, ... for further prototype heads.
pub fn output_names(model: &SwavModel, with_head: bool) -> Vec<String> {
    let mut names = vec!["features".to_string()];
    if with_head {
        names.push("embedding".into());
        for i in 0..model.prototypes.heads.len() {
            names.push(if i == 0 { "scores".into() } else { format!("scores_{i}") });
        }
    }
    names
}

/// The ONNX IR version that goes with an opset (the table of the `onnx` package's releases).
pub fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

/// The data file name of an export to `output`: its file name plus `.data` (`model.onnx.data`).
pub fn data_file_name(output: &std::path::Path) -> String {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.onnx".into());
    format!("{name}.data")
}

/// Encodes the model's evaluation-mode forward as an ONNX model. With external data (forced, or a
/// model over [`PROTOBUF_LIMIT`]) the tensors refer to a data file named [`DEFAULT_DATA_LOCATION`];
/// [`to_onnx_with_location`] or [`crate::export_to_file`] name it otherwise.
pub fn to_onnx(model: &SwavModel, pre: &Preprocessing, opts: &ExportOptions) -> Result<Exported> {
    to_onnx_with_location(model, pre, opts, DEFAULT_DATA_LOCATION)
}

/// [`to_onnx`], with external data (if any) in the file `location` (a file name: it is written beside
/// the `.onnx` file).
pub fn to_onnx_with_location(
    model: &SwavModel,
    pre: &Preprocessing,
    opts: &ExportOptions,
    location: &str,
) -> Result<Exported> {
    if location.is_empty() || location.contains(['/', '\\']) || location == "." || location == ".." {
        return Err(ExportError::Options(format!(
            "external data location `{location}` must be a plain file name, written beside the .onnx file"
        )));
    }
    if !OPSETS.contains(&opts.opset) {
        return Err(ExportError::Options(format!(
            "opset {} is not supported (use {} to {})",
            opts.opset,
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    if opts.batch == BatchDim::Fixed(0) {
        return Err(ExportError::Options("a fixed batch size must be positive".into()));
    }
    let cfg = &model.config;
    if pre.mean.len() != cfg.in_channels || pre.std.len() != cfg.in_channels {
        return Err(ExportError::Options(format!(
            "mean and std need {} values, one per input channel",
            cfg.in_channels
        )));
    }
    let mut g = Graph::new(opts.opset);
    let features = backbone(&mut g, model, INPUT_NAME, opts.fold_batchnorm)?;
    let names = output_names(model, opts.with_head);
    let batch = match opts.batch {
        BatchDim::Dynamic => Dim::Named("batch".into()),
        BatchDim::Fixed(n) => Dim::Fixed(n),
    };
    let mut outputs = vec![(
        ValueInfo { name: features, dims: vec![batch.clone(), Dim::Fixed(cfg.feature_dim())] },
        FEATURES_DOC.to_string(),
    )];
    if opts.with_head {
        let h = head(&mut g, &model.head, &outputs[0].0.name, opts.fold_batchnorm)?;
        let norm = g.reduce_l2_axis1(&h, "embedding.norm");
        let eps = g.init_f32("embedding.eps", &[], &[L2_EPS]);
        let clamped = g.node("Max", &[&norm, &eps], "embedding.norm_clamped", &[]);
        let embedding = g.node("Div", &[&h, &clamped], &names[1], &[]);
        outputs.push((
            ValueInfo { name: embedding.clone(), dims: vec![batch.clone(), Dim::Fixed(cfg.feat_dim)] },
            EMBEDDING_DOC.into(),
        ));
        let multi = model.prototypes.heads.len() > 1;
        for (i, proto) in model.prototypes.heads.iter().enumerate() {
            let pname = if multi { format!("prototypes.prototypes{i}") } else { "prototypes".into() };
            let w = check_linear(&pname, proto)?;
            let k = w.0;
            if proto.bias.is_some() {
                return Err(ExportError::Tensor {
                    name: format!("{pname}.bias"),
                    detail: "prototypes have no bias".into(),
                });
            }
            let wn = g.init_f32(&format!("{pname}.weight"), &[w.0, w.1], proto.weight.value.as_slice());
            let scores = g.node("Gemm", &[&embedding, &wn], &names[2 + i], &[Attr::Int("transB", 1)]);
            let doc = format!("{SCORES_DOC} (prototype head {i}, {k} prototypes)");
            outputs.push((ValueInfo { name: scores, dims: vec![batch.clone(), Dim::Fixed(k)] }, doc));
        }
    }

    let (h, w) = if opts.static_input_size {
        (Dim::Fixed(pre.input_size), Dim::Fixed(pre.input_size))
    } else {
        (Dim::Named("height".into()), Dim::Named("width".into()))
    };
    let input = ValueInfo { name: INPUT_NAME.into(), dims: vec![batch, Dim::Fixed(cfg.in_channels), h, w] };
    let metadata = metadata(model, pre, opts, &names)?;
    let ir = ir_version(opts.opset);
    let node_count = g.nodes.len();
    // The graph without its initialisers, which go last: where their bytes go depends on the size of
    // the whole model, known exactly before anything is encoded.
    let graph = Msg::new()
        .msgs(f::GRAPH_NODE, std::mem::take(&mut g.nodes))
        .string(f::GRAPH_NAME, if opts.with_head { "swav" } else { "swav_backbone" })
        .string(f::GRAPH_DOC_STRING, &graph_doc(model, opts))
        .msg(f::GRAPH_INPUT, value_info(INPUT_NAME, &input.dims, &input_doc(pre)))
        .msgs(f::GRAPH_OUTPUT, outputs.iter().map(|(v, doc)| value_info(&v.name, &v.dims, doc)));
    let model_proto = |graph: Msg| {
        Msg::new()
            .int(f::MODEL_IR_VERSION, ir)
            .string(f::MODEL_PRODUCER_NAME, "swav-rs")
            .string(f::MODEL_PRODUCER_VERSION, env!("CARGO_PKG_VERSION"))
            .string(
                f::MODEL_DOC_STRING,
                "SwAV-pretrained backbone exported by swav-rs; see the metadata for the preprocessing.",
            )
            .msg(f::MODEL_GRAPH, graph)
            .msg(f::MODEL_OPSET_IMPORT, Msg::new().string(f::OPSET_DOMAIN, "").int(f::OPSET_VERSION, opts.opset))
            .msgs(
                f::MODEL_METADATA_PROPS,
                metadata.iter().map(|(k, v)| Msg::new().string(f::ENTRY_KEY, k).string(f::ENTRY_VALUE, v)),
            )
    };
    let initializers = std::mem::take(&mut g.initializers);
    let inline_graph_len = graph.encoded_len()
        + initializers
            .iter()
            .map(|t| {
                let tensor = t.header().encoded_len() + len_delimited(f::TENSOR_RAW_DATA, t.raw.len());
                len_delimited(f::GRAPH_INITIALIZER, tensor)
            })
            .sum::<usize>();
    let inline_len = model_proto(Msg::new()).encoded_len() - len_delimited(f::MODEL_GRAPH, 0)
        + len_delimited(f::MODEL_GRAPH, inline_graph_len);
    let (tensors, external) = if opts.external_data || inline_len > PROTOBUF_LIMIT {
        let (tensors, data) = externalize(initializers, location);
        (tensors, Some(data))
    } else {
        (initializers.into_iter().map(|t| t.header().bytes(f::TENSOR_RAW_DATA, t.raw)).collect(), None)
    };
    let model_proto = model_proto(graph.msgs(f::GRAPH_INITIALIZER, tensors));
    let len = model_proto.encoded_len();
    debug_assert!(external.is_some() || len == inline_len, "size estimate {inline_len}, encoded {len}");
    if len > PROTOBUF_LIMIT {
        return Err(ExportError::TooLarge { bytes: len });
    }
    Ok(Exported {
        bytes: model_proto.encode(),
        external,
        input,
        outputs: outputs.into_iter().map(|(v, _)| v).collect(),
        op_types: std::mem::take(&mut g.op_types),
        nodes: node_count,
        parameters: g.parameters,
        ir_version: ir,
        metadata,
    })
}

/// Moves the bytes of every tensor of at least [`EXTERNAL_MIN_BYTES`] into one data file (offsets
/// aligned to [`EXTERNAL_ALIGNMENT`]) and refers to them by `location`, `offset` and `length` with
/// `data_location = EXTERNAL`; smaller tensors stay inline. Each tensor's bytes are dropped once
/// copied, so the weights are held about twice at most, not three times.
fn externalize(initializers: Vec<Initializer>, location: &str) -> (Vec<Msg>, ExternalData) {
    let external = |t: &Initializer| t.raw.len() >= EXTERNAL_MIN_BYTES;
    let total: usize =
        initializers.iter().filter(|t| external(t)).map(|t| t.raw.len().next_multiple_of(EXTERNAL_ALIGNMENT)).sum();
    let mut data = Vec::with_capacity(total);
    let mut tensors = Vec::with_capacity(initializers.len());
    let mut count = 0;
    let entry = |key: &str, value: &str| Msg::new().string(f::ENTRY_KEY, key).string(f::ENTRY_VALUE, value);
    for t in initializers {
        let header = t.header();
        if !external(&t) {
            tensors.push(header.bytes(f::TENSOR_RAW_DATA, t.raw));
            continue;
        }
        data.resize(data.len().next_multiple_of(EXTERNAL_ALIGNMENT), 0);
        let offset = data.len();
        data.extend_from_slice(&t.raw);
        let entries = [
            entry("location", location),
            entry("offset", &offset.to_string()),
            entry("length", &t.raw.len().to_string()),
        ];
        tensors
            .push(header.msgs(f::TENSOR_EXTERNAL_DATA, entries).int(f::TENSOR_DATA_LOCATION, data_location::EXTERNAL));
        count += 1;
    }
    (tensors, ExternalData { location: location.to_string(), bytes: data, tensors: count })
}

const FEATURES_DOC: &str =
    "globally average-pooled backbone features (the representation for k-NN, linear probes, fine-tuning)";
const EMBEDDING_DOC: &str = "projection head output, L2-normalised: x / max(||x||, 1e-12)";
const SCORES_DOC: &str = "embedding . prototypes^T";

fn input_doc(pre: &Preprocessing) -> String {
    format!(
        "float32 NCHW; pixels scaled to [0, 1], resized to {0}x{0}, then (x - mean) / std per channel with mean {1:?}, std {2:?}",
        pre.input_size, pre.mean, pre.std
    )
}

fn graph_doc(model: &SwavModel, opts: &ExportOptions) -> String {
    let c = &model.config;
    format!(
        "{:?}{} width {}{}, evaluation mode (batch norm running statistics{})",
        c.arch,
        if c.small_stem { " (small-image stem)" } else { "" },
        c.width(),
        if opts.with_head { " with projection head and prototypes" } else { "" },
        if opts.fold_batchnorm { ", folded into the preceding layers" } else { "" }
    )
}

fn metadata(
    model: &SwavModel,
    pre: &Preprocessing,
    opts: &ExportOptions,
    outputs: &[String],
) -> Result<Vec<(String, String)>> {
    let json = |v: &[f32]| serde_json::to_string(v).expect("finite floats serialise");
    let config =
        serde_json::to_string(&model.config).map_err(|e| ExportError::Options(format!("model configuration: {e}")))?;
    let mut m = vec![
        (META_MEAN.to_string(), json(&pre.mean)),
        (META_STD.to_string(), json(&pre.std)),
        (META_INPUT_SIZE.to_string(), pre.input_size.to_string()),
        (
            "preprocessing".to_string(),
            "pixels scaled to [0, 1], resized to input_size x input_size, then (x - mean) / std per channel"
                .to_string(),
        ),
        ("preprocessing_source".to_string(), pre.sources_json()),
        ("input_layout".to_string(), "NCHW".to_string()),
    ];
    match model.config.in_channels {
        3 => m.push(("channels".into(), "RGB".into())),
        1 => m.push(("channels".into(), "grayscale".into())),
        _ => {}
    }
    m.push(("outputs".into(), outputs.join(",")));
    m.push(("batchnorm".into(), if opts.fold_batchnorm { "folded" } else { "BatchNormalization" }.into()));
    m.push(("model_config".into(), config));
    Ok(m)
}

/// The stem, the four stages and the global pooling; returns the name of `features`.
fn backbone(g: &mut Graph, model: &SwavModel, input: &str, fold: bool) -> Result<String> {
    let r = &model.backbone;
    let mut x = conv_bn(g, "conv1", &r.conv1, "bn1", &r.bn1, input, fold)?;
    x = g.node("Relu", &[&x], "relu", &[]);
    if r.maxpool {
        x = g.node(
            "MaxPool",
            &[&x],
            "maxpool",
            &[Attr::Ints("kernel_shape", &[3, 3]), Attr::Ints("strides", &[2, 2]), Attr::Ints("pads", &[1, 1, 1, 1])],
        );
    }
    for (s, stage) in r.stages.iter().enumerate() {
        for (b, block) in stage.iter().enumerate() {
            x = residual_block(g, &format!("layer{}.{b}", s + 1), block, &x, fold)?;
        }
    }
    let pooled = g.node("GlobalAveragePool", &[&x], "avgpool", &[]);
    Ok(g.node("Flatten", &[&pooled], "features", &[Attr::Int("axis", 1)]))
}

fn residual_block(g: &mut Graph, p: &str, block: &Block, input: &str, fold: bool) -> Result<String> {
    if block.convs.is_empty() || block.convs.len() != block.bns.len() {
        return Err(ExportError::Tensor {
            name: format!("{p}.conv1.weight"),
            detail: "a block needs one batch norm per convolution".into(),
        });
    }
    let last = block.convs.len() - 1;
    let mut x = input.to_string();
    for (i, (conv, bn)) in block.convs.iter().zip(&block.bns).enumerate() {
        x = conv_bn(g, &format!("{p}.conv{}", i + 1), conv, &format!("{p}.bn{}", i + 1), bn, &x, fold)?;
        if i < last {
            x = g.node("Relu", &[&x], &format!("{p}.relu{}", i + 1), &[]);
        }
    }
    let shortcut = match &block.downsample {
        Some(ds) => {
            conv_bn(g, &format!("{p}.downsample.0"), &ds.conv, &format!("{p}.downsample.1"), &ds.bn, input, fold)?
        }
        None => input.to_string(),
    };
    let sum = g.node("Add", &[&x, &shortcut], &format!("{p}.add"), &[]);
    Ok(g.node("Relu", &[&sum], &format!("{p}.relu"), &[]))
}

/// Per-channel `s = gamma / sqrt(var + eps)` and `t = beta - mean s` (f64), after checking the lengths.
fn bn_affine(name: &str, bn: &BatchNorm, channels: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    for (suffix, t) in [
        ("weight", &bn.weight.value),
        ("bias", &bn.bias.value),
        ("running_mean", &bn.running_mean),
        ("running_var", &bn.running_var),
    ] {
        if t.shape() != [channels] {
            return Err(ExportError::Tensor {
                name: format!("{name}.{suffix}"),
                detail: format!("shape {:?}, the layer before it has {channels} output channels", t.shape()),
            });
        }
    }
    let (gamma, beta) = (bn.weight.value.as_slice(), bn.bias.value.as_slice());
    let (mean, var) = (bn.running_mean.as_slice(), bn.running_var.as_slice());
    let s: Vec<f64> = (0..channels).map(|c| gamma[c] as f64 / (var[c] as f64 + bn.eps as f64).sqrt()).collect();
    let t = (0..channels).map(|c| beta[c] as f64 - mean[c] as f64 * s[c]).collect();
    Ok((s, t))
}

/// `BatchNormalization` with the running statistics (inference form).
fn batchnorm_node(g: &mut Graph, name: &str, bn: &BatchNorm, channels: usize, input: &str) -> Result<String> {
    bn_affine(name, bn, channels)?;
    let scale = g.init_f32(&format!("{name}.weight"), &[channels], bn.weight.value.as_slice());
    let bias = g.init_f32(&format!("{name}.bias"), &[channels], bn.bias.value.as_slice());
    let mean = g.init_f32(&format!("{name}.running_mean"), &[channels], bn.running_mean.as_slice());
    let var = g.init_f32(&format!("{name}.running_var"), &[channels], bn.running_var.as_slice());
    Ok(g.node("BatchNormalization", &[input, &scale, &bias, &mean, &var], name, &[Attr::Float("epsilon", bn.eps)]))
}

fn conv_bn(
    g: &mut Graph,
    conv_name: &str,
    conv: &Conv2d,
    bn_name: &str,
    bn: &BatchNorm,
    input: &str,
    fold: bool,
) -> Result<String> {
    let shape = conv.weight.value.shape();
    let &[o, kh, kw, i] = shape else {
        return Err(ExportError::Tensor {
            name: format!("{conv_name}.weight"),
            detail: format!("shape {shape:?} (OHWI) is not 4-D"),
        });
    };
    if o == 0 || i == 0 || kh == 0 || kw == 0 {
        return Err(ExportError::Tensor {
            name: format!("{conv_name}.weight"),
            detail: format!("shape {shape:?} (OHWI) has an empty dimension"),
        });
    }
    let (dims, mut w) = swav_model::checkpoint::ohwi_to_oihw(shape, conv.weight.value.as_slice());
    let (s, p) = (conv.stride as i64, conv.pad as i64);
    let attrs = [
        Attr::Ints("kernel_shape", &[kh as i64, kw as i64]),
        Attr::Ints("strides", &[s, s]),
        Attr::Ints("pads", &[p, p, p, p]),
    ];
    if fold {
        let (scale, shift) = bn_affine(bn_name, bn, o)?;
        let per_out = i * kh * kw;
        for (c, row) in w.chunks_exact_mut(per_out).enumerate() {
            row.iter_mut().for_each(|v| *v = (*v as f64 * scale[c]) as f32);
        }
        let bias: Vec<f32> = shift.iter().map(|&v| v as f32).collect();
        let wn = g.init_f32(&format!("{conv_name}.weight"), &dims, &w);
        let bn_ = g.init_f32(&format!("{conv_name}.bias"), &[o], &bias);
        Ok(g.node("Conv", &[input, &wn, &bn_], conv_name, &attrs))
    } else {
        let wn = g.init_f32(&format!("{conv_name}.weight"), &dims, &w);
        let x = g.node("Conv", &[input, &wn], conv_name, &attrs);
        batchnorm_node(g, bn_name, bn, o, &x)
    }
}

/// `(out, in)` of a linear layer, after checking its weight and bias shapes.
fn check_linear(name: &str, l: &Linear) -> Result<(usize, usize)> {
    let shape = l.weight.value.shape();
    let &[o, i] = shape else {
        return Err(ExportError::Tensor {
            name: format!("{name}.weight"),
            detail: format!("shape {shape:?} is not 2-D [out, in]"),
        });
    };
    if let Some(b) = &l.bias {
        if b.value.shape() != [o] {
            return Err(ExportError::Tensor {
                name: format!("{name}.bias"),
                detail: format!("shape {:?}, expected [{o}]", b.value.shape()),
            });
        }
    }
    Ok((o, i))
}

/// `Gemm(x, W^T) + b`, with an optional batch norm folded in (`W' = diag(s) W`, `b' = s b + t`).
fn linear(
    g: &mut Graph,
    name: &str,
    l: &Linear,
    bn: Option<(&str, &BatchNorm)>,
    input: &str,
    fold: bool,
) -> Result<String> {
    let (o, i) = check_linear(name, l)?;
    let bias = l.bias.as_ref().map(|b| b.value.as_slice());
    let out = match bn {
        Some((bn_name, bn)) if fold => {
            let (s, t) = bn_affine(bn_name, bn, o)?;
            let mut w = l.weight.value.to_vec();
            for (row, &sr) in w.chunks_exact_mut(i).zip(&s) {
                row.iter_mut().for_each(|v| *v = (*v as f64 * sr) as f32);
            }
            let b: Vec<f32> = (0..o).map(|r| (bias.map_or(0.0, |b| b[r] as f64) * s[r] + t[r]) as f32).collect();
            let wn = g.init_f32(&format!("{name}.weight"), &[o, i], &w);
            let bn_ = g.init_f32(&format!("{name}.bias"), &[o], &b);
            return Ok(g.node("Gemm", &[input, &wn, &bn_], name, &[Attr::Int("transB", 1)]));
        }
        _ => {
            let wn = g.init_f32(&format!("{name}.weight"), &[o, i], l.weight.value.as_slice());
            let mut inputs = vec![input.to_string(), wn];
            if let Some(b) = bias {
                inputs.push(g.init_f32(&format!("{name}.bias"), &[o], b));
            }
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            g.node("Gemm", &refs, name, &[Attr::Int("transB", 1)])
        }
    };
    match bn {
        Some((bn_name, bn)) => batchnorm_node(g, bn_name, bn, o, &out),
        None => Ok(out),
    }
}

/// The projection head (official names `projection_head.*`); returns its output before normalisation.
fn head(g: &mut Graph, head: &ProjectionHead, input: &str, fold: bool) -> Result<String> {
    match head {
        ProjectionHead::Linear(fc) => linear(g, "projection_head", fc, None, input, fold),
        ProjectionHead::Mlp { fc1, bn, fc2 } => {
            let h = linear(g, "projection_head.0", fc1, bn.as_ref().map(|b| ("projection_head.1", b)), input, fold)?;
            let a = g.node("Relu", &[&h], "projection_head.relu", &[]);
            let fc2_name = if bn.is_some() { "projection_head.3" } else { "projection_head.2" };
            linear(g, fc2_name, fc2, None, &a, fold)
        }
    }
}
