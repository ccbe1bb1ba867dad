//! Every image's source name is recorded (`names.json`, checked against the manifest), and a loader
//! over a subset of the images gives exactly the crops the full loader gives for those images.

mod common;

use swav_data::{Dataset, LoaderConfig, MultiCropConfig, MultiCropLoader};

#[test]
fn names_are_the_source_paths_in_index_order_and_skipped_files_have_none() {
    let tmp = tempfile::tempdir().unwrap();
    let input = common::photo_folder(tmp.path(), 2, 3);
    std::fs::write(input.join("class1/broken.png"), b"not a png").unwrap();
    let out = tmp.path().join("ds");
    common::run(&common::options(&input, &out)).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let names = ds.names().unwrap().unwrap();
    let want = [
        "class0/img000.png",
        "class0/img001.png",
        "class0/img002.png",
        "class1/img000.png",
        "class1/img001.png",
        "class1/img002.png",
    ];
    assert_eq!(names, want);
    assert_eq!(ds.manifest().names.as_ref().unwrap().count, 6);
    ds.verify().unwrap();

    // A damaged names file is named, never trusted.
    let path = out.join("names.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("img001", "img009");
    std::fs::write(&path, text).unwrap();
    let err = Dataset::open(&out).unwrap().names().unwrap_err().to_string();
    assert!(err.contains("names.json") && err.contains("damaged"), "{err}");
}

#[test]
fn idx_records_are_named_by_their_position_in_the_file_and_old_datasets_have_no_names() {
    let tmp = tempfile::tempdir().unwrap();
    let images: Vec<Vec<u8>> = (0..6).map(|i| vec![i as u8 * 20; 16]).collect();
    let idx = common::write_idx(tmp.path(), "x", &images, 4, 4, &[0, 1, 2, 0, 1, 2], false);
    let mut opts = common::options(&idx, &tmp.path().join("part"));
    opts.select = Some(2..5);
    common::run(&opts).unwrap();
    let ds = Dataset::open(tmp.path().join("part")).unwrap();
    assert_eq!(ds.names().unwrap().unwrap(), ["#2", "#3", "#4"]);

    // A manifest without the entry (written before names were recorded) still opens: no names.
    let manifest = tmp.path().join("part/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("names");
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    assert_eq!(Dataset::open(tmp.path().join("part")).unwrap().names().unwrap(), None);
}

#[test]
fn a_subset_loader_shuffles_the_subset_and_keeps_each_images_crops() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::photo_dataset(tmp.path(), 3, 4);
    let crops = MultiCropConfig::preset("1x16").unwrap();
    let cfg = LoaderConfig { batch_size: 2, workers: 2, seed: 5, drop_last: false, ..LoaderConfig::default() };
    let subset = [1usize, 4, 5, 9, 11];
    let mut loader = MultiCropLoader::with_indices(&ds, &subset, &crops, &cfg).unwrap();
    assert_eq!((loader.samples_per_epoch(), loader.steps_per_epoch()), (5, 3));
    let transform = loader.transform().clone();
    let mut orders = Vec::new();
    for epoch in 0..2u64 {
        let mut seen = Vec::new();
        for batch in loader.epoch(epoch) {
            let batch = batch.unwrap();
            let g = batch.group(0);
            for (pos, &index) in batch.indices().iter().enumerate() {
                let want = transform.crops(&ds.image(index).unwrap(), 5, epoch, index as u64);
                assert_eq!(g.image(0, pos), want[0].as_slice(), "epoch {epoch}, image {index}");
                assert_eq!(batch.labels()[pos], ds.label(index));
            }
            seen.extend_from_slice(batch.indices());
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, subset, "every subset image once per epoch");
        orders.push(seen);
    }
    assert_ne!(orders[0], orders[1], "a new order every epoch");

    assert!(MultiCropLoader::with_indices(&ds, &[], &crops, &cfg).is_err());
    let err = MultiCropLoader::with_indices(&ds, &[3, 12], &crops, &cfg).err().unwrap().to_string();
    assert!(err.contains("12"), "{err}");
}
