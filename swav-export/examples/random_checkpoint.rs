//! Writes a randomly initialised model file, as training would, for trying the exporter without a
//! training run (CI exports one and checks it with onnxruntime). Batch-norm statistics are made
//! non-trivial so that folding them is exercised.
//!
//! ```text
//! cargo run --release -p swav-export --example random_checkpoint -- OUT.safetensors [ARCH] [WIDTH] [standard|small] [INPUT_SIZE]
//! ```

use std::collections::BTreeMap;

use swav_model::param::{Slot, Visit};
use swav_model::{Arch, ModelConfig, ModelFile, Preprocessing, SwavModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first() else {
        return Err("usage: random_checkpoint OUT.safetensors [ARCH] [WIDTH] [standard|small] [INPUT_SIZE]".into());
    };
    let arch = Arch::parse(args.get(1).map_or("resnet18", String::as_str))?;
    let width: usize = args.get(2).map_or(Ok(16), |w| w.parse())?;
    let small_stem = match args.get(3).map_or("standard", String::as_str) {
        "standard" => false,
        "small" => true,
        other => return Err(format!("stem `{other}`: expected standard or small").into()),
    };
    let input_size: usize = args.get(4).map_or(Ok(if small_stem { 32 } else { 64 }), |s| s.parse())?;
    let config = ModelConfig {
        arch,
        width: Some(width),
        small_stem,
        in_channels: 3,
        hidden_mlp: 4 * width,
        head_bn: true,
        feat_dim: 32,
        prototypes: vec![50, 20],
        sync_bn: false,
        sync_bn_group: 0,
    };
    let mut model = SwavModel::new(config, 7)?;
    let mut rng = swav_core::rng::SplitMix64::new(0x2545_f491_4f6c_dd1d);
    let mut uniform = move || rng.next_f64() as f32;
    model.visit("", &mut |name, slot| match slot {
        Slot::Buffer(t) if name.ends_with("running_var") => {
            t.as_mut_slice().iter_mut().for_each(|v| *v = 0.5 + uniform())
        }
        Slot::Buffer(t) if name.ends_with("running_mean") => {
            t.as_mut_slice().iter_mut().for_each(|v| *v = 0.4 * (uniform() - 0.5))
        }
        _ => {}
    });
    model.normalize_prototypes()?;
    let imagenet = (swav_core::imagenet::MEAN.to_vec(), swav_core::imagenet::STD.to_vec());
    let pre = Preprocessing::recorded(&model.config, imagenet.0, imagenet.1, input_size)?;
    ModelFile::write(&mut model, &pre, &BTreeMap::new(), out.as_ref())?;
    println!(
        "wrote {out}: {arch:?} width {width}, {} stem, input size {input_size}",
        if small_stem { "small" } else { "standard" }
    );
    Ok(())
}
