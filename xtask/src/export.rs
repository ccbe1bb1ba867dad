//! `cargo xtask export`: a model file -> a standard ONNX model (swav-export), optionally with check data
//! (random inputs and swav-model's outputs as .npy) to verify any runtime against.

use std::path::PathBuf;

use anyhow::Context;
use swav_export::{check, BatchDim, ExportOptions, DEFAULT_OPSET};
use swav_model::{ModelFile, Overrides, Preprocessing, Source};

#[derive(clap::Args)]
pub struct Args {
    /// Model file written by training (`<run>/checkpoints/step-N.safetensors`), any swav-rs model file,
    /// a PyTorch checkpoint (.pth, .pth.tar) or a safetensors state dict (network detected from its shapes).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The ONNX file to write (atomically: an existing file is replaced only once the new one is complete).
    #[arg(long)]
    output: PathBuf,
    /// Store the weights in `<output>.data` beside the ONNX file (ONNX external data). Automatic for
    /// models over protobuf's 2 GiB (ResNet-50w5).
    #[arg(long)]
    external_data: bool,
    /// Also output `embedding` (L2-normalised projection) and `scores` (one output per prototype head).
    #[arg(long)]
    with_head: bool,
    /// ONNX opset (13 to 21).
    #[arg(long, default_value_t = DEFAULT_OPSET)]
    opset: i64,
    /// Batch dimension: `dynamic` (any batch size at run time) or a fixed size.
    #[arg(long, default_value = "dynamic", value_parser = parse_batch)]
    batch: BatchDim,
    /// Per-channel mean recorded in the metadata (default: the checkpoint's, else ImageNet's for RGB, 0.5 otherwise).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    mean: Option<Vec<f32>>,
    /// Per-channel std recorded in the metadata (default: the checkpoint's, else ImageNet's for RGB, 0.5 otherwise).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    std: Option<Vec<f32>>,
    /// Input side in pixels recorded in the metadata (default: the checkpoint's, else 224, or 32 with the small stem).
    #[arg(long)]
    input_size: Option<usize>,
    /// Declare height and width as the input size instead of symbolic dimensions.
    #[arg(long)]
    static_input_size: bool,
    /// Keep BatchNormalization nodes instead of folding them into the convolutions and linear layers.
    #[arg(long)]
    no_fold_batchnorm: bool,
    /// Also write random input images and swav-model's outputs for them (images.npy, features.npy, ...)
    /// into this folder, to check a runtime against (see scripts/onnx_check.py).
    #[arg(long, value_name = "DIR")]
    check_data: Option<PathBuf>,
    /// Images in the check data (with a fixed --batch, that size).
    #[arg(long, default_value_t = 2)]
    check_batch: usize,
}

fn parse_batch(s: &str) -> Result<BatchDim, String> {
    if s == "dynamic" {
        return Ok(BatchDim::Dynamic);
    }
    match s.parse::<usize>() {
        // ONNX dimensions are int64.
        Ok(n) if n > 0 && i64::try_from(n).is_ok() => Ok(BatchDim::Fixed(n)),
        _ => Err(format!("`{s}`: expected `dynamic` or a positive batch size")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut outputs = vec![(args.output.as_path(), "ONNX file (--output)")];
    outputs.extend(args.check_data.as_deref().map(|d| (d, "check data folder (--check-data)")));
    swav_core::fs::check_outputs(&[(&args.checkpoint, "model file")], &outputs)?;
    let overrides = Overrides { mean: args.mean.clone(), std: args.std.clone(), input_size: args.input_size };
    let file = ModelFile::read_with(&args.checkpoint, &overrides).with_context(|| {
        let sidecar = args.checkpoint.extension().is_some_and(|e| e == "json");
        let hint =
            if sidecar { " (a checkpoint sidecar: pass the step-N.safetensors model file beside it)" } else { "" };
        format!("reading the model file {}{hint}", args.checkpoint.display())
    })?;
    let (model, pre) = (&file.model, &file.preprocessing);
    warn_defaults(pre);
    if args.with_head && !file.origin.head {
        tracing::warn!(
            "{} holds no trained projection head or prototypes: `embedding` and `scores` come from a fresh initialisation; only `features` are meaningful",
            args.checkpoint.display()
        );
    }
    let opts = ExportOptions {
        with_head: args.with_head,
        opset: args.opset,
        batch: args.batch,
        fold_batchnorm: !args.no_fold_batchnorm,
        static_input_size: args.static_input_size,
        external_data: args.external_data,
    };
    let exported = swav_export::export_to_file(model, pre, &opts, &args.output)
        .with_context(|| format!("exporting to {}", args.output.display()))?;

    let c = &model.config;
    println!(
        "exported {:?} (width {}{}) -> {} ({:.1} MiB, opset {}, IR {}, {} nodes, {:.2}M parameters)",
        c.arch,
        c.width(),
        if c.small_stem { ", small stem" } else { "" },
        args.output.display(),
        exported.bytes.len() as f64 / (1 << 20) as f64,
        opts.opset,
        exported.ir_version,
        exported.nodes,
        exported.parameters as f64 / 1e6
    );
    if let Some(data) = &exported.external {
        println!(
            "  external data: {} tensors ({:.1} MiB) in {}",
            data.tensors,
            data.bytes.len() as f64 / (1 << 20) as f64,
            args.output.with_file_name(&data.location).display()
        );
    }
    let dims = |d: &[swav_export::Dim]| d.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    println!("  input  {} [{}]", exported.input.name, dims(&exported.input.dims));
    for o in &exported.outputs {
        println!("  output {} [{}]", o.name, dims(&o.dims));
    }
    println!(
        "  preprocessing: mean {:?} ({}), std {:?} ({}), input size {} ({})",
        pre.mean, pre.mean_source, pre.std, pre.std_source, pre.input_size, pre.input_size_source
    );

    if let Some(dir) = &args.check_data {
        let batch = match opts.batch {
            BatchDim::Fixed(n) => n,
            BatchDim::Dynamic => args.check_batch.max(1),
        };
        let paths = check::write_check_data(dir, model, opts.with_head, batch, pre.input_size, 0)
            .with_context(|| format!("writing check data to {}", dir.display()))?;
        println!(
            "  check data: {} files ({batch} images of {}x{}) in {}",
            paths.len(),
            pre.input_size,
            pre.input_size,
            dir.display()
        );
    }
    Ok(())
}

fn warn_defaults(pre: &Preprocessing) {
    let mut missing = Vec::new();
    if pre.mean_source == Source::Default {
        missing.push(format!("mean {:?}", pre.mean));
    }
    if pre.std_source == Source::Default {
        missing.push(format!("std {:?}", pre.std));
    }
    if pre.input_size_source == Source::Default {
        missing.push(format!("input size {}", pre.input_size));
    }
    if !missing.is_empty() {
        tracing::warn!(
            "the checkpoint does not record its preprocessing; recording defaults: {} (set them with --mean/--std/--input-size)",
            missing.join(", ")
        );
    }
}
