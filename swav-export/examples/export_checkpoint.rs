//! Exports a model file (a training checkpoint `step-N.safetensors`, or an imported one) to ONNX with
//! its projection head, and prints what the graph holds and the preprocessing it expects.
//!
//! ```text
//! cargo run --release -p swav-export --example random_checkpoint -- model.safetensors resnet18 16 small
//! cargo run --release -p swav-export --example export_checkpoint -- model.safetensors model.onnx
//! ```

use swav_export::{export_checkpoint, ExportOptions};
use swav_model::Overrides;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        return Err("usage: export_checkpoint MODEL.safetensors OUT.onnx".into());
    };
    let opts = ExportOptions { with_head: true, ..ExportOptions::default() };
    let (exported, pre) = export_checkpoint(input.as_ref(), output.as_ref(), &Overrides::default(), &opts)?;
    println!("{output}: {} nodes, outputs {:?}", exported.nodes, exported.outputs);
    println!(
        "feed NCHW float32 images of {0}x{0}, normalised with mean {1:?} and std {2:?}",
        pre.input_size, pre.mean, pre.std
    );
    Ok(())
}
