//! Multi-crop batches in a loop of your own: make a small labelled image set (synthetic shapes, no
//! download), preprocess it into a dataset, and iterate over SwAV batches with their crop groups.
//!
//! ```text
//! cargo run --release -p swav-data --example multicrop
//! ```

use swav_data::{preprocess, CropGroup, Dataset, LoaderConfig, MultiCropConfig, MultiCropLoader, PreprocessOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = std::env::temp_dir().join(format!("swav-multicrop-example-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let images = swav_data::synthetic::write_shapes_idx(&tmp, 512, 32, 7)?;
    let opts = PreprocessOptions { input: images, output: tmp.join("dataset"), ..Default::default() };
    preprocess(&opts, &|_| {})?;
    let dataset = Dataset::open(&tmp.join("dataset"))?;

    // Two 28-px crops and four 12-px crops per image, the official augmentations otherwise.
    let mut crops = MultiCropConfig::official();
    crops.groups = vec![
        CropGroup { count: 2, size: 28, min_scale: 0.3, max_scale: 1.0 },
        CropGroup { count: 4, size: 12, min_scale: 0.1, max_scale: 0.3 },
    ];
    let cfg = LoaderConfig { batch_size: 64, seed: 31, ..Default::default() };
    let mut loader = MultiCropLoader::new(&dataset, &crops, &cfg)?;
    let start = std::time::Instant::now();
    let mut images_seen = 0;
    for batch in loader.epoch(0) {
        let batch = batch?;
        for group in batch.groups() {
            // `group.data` is f32, crop-major ([count * batch, h, w, c]): hand it to your model here.
            let mean = group.data.iter().sum::<f32>() / group.data.len() as f32;
            println!("group {:?}: mean {mean:+.3}", group.shape);
        }
        images_seen += batch.len();
    }
    println!("{images_seen} images in {:.2} s", start.elapsed().as_secs_f64());
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
