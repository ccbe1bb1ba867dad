//! Same input and settings => same bytes and same batches, whatever the number of workers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use swav_data::*;

#[test]
fn preprocess_output_is_byte_identical_for_any_worker_count() {
    let tmp = tempfile::tempdir().unwrap();
    let input = photo_folder(tmp.path(), 3, 10);
    // A few bad files too: the skip list must be identical as well.
    std::fs::write(input.join("class1/zero.png"), b"").unwrap();
    std::fs::write(input.join("class2/text.jpg"), b"hello").unwrap();
    let mut trees = Vec::new();
    for (k, workers) in [1usize, 2, 5].into_iter().enumerate() {
        for codec in [Codec::RawZstd, Codec::Jpeg] {
            let out = tmp.path().join(format!("ds-{k}-{}", codec.name()));
            let mut opts = options(&input, &out);
            opts.workers = workers;
            opts.codec = codec;
            opts.shard_size_mib = 1;
            opts.resize = Some(40);
            let r = run(&opts).unwrap();
            assert_eq!(r.written, 30);
            trees.push((codec, tree_bytes(&out)));
        }
    }
    for t in &trees[2..] {
        let first = trees.iter().find(|x| x.0 == t.0).unwrap();
        assert!(t.1 == first.1, "output differs between worker counts for {:?}", t.0);
    }
}

fn collect(loader: &mut MultiCropLoader, epoch: u64) -> Vec<(Vec<usize>, Vec<Vec<f32>>)> {
    loader
        .epoch(epoch)
        .map(|b| {
            let b = b.unwrap();
            (b.indices().to_vec(), b.groups().map(|g| g.data.to_vec()).collect())
        })
        .collect()
}

#[test]
fn batches_do_not_depend_on_workers_and_change_with_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = photo_dataset(tmp.path(), 2, 9);
    let crops = MultiCropConfig::small(24, 12);
    let mut runs = Vec::new();
    for (workers, prefetch) in [(0usize, 1usize), (1, 1), (3, 4)] {
        let cfg = LoaderConfig { batch_size: 4, seed: 7, workers, prefetch, ..LoaderConfig::default() };
        let mut loader = MultiCropLoader::new(&ds, &crops, &cfg).unwrap();
        assert_eq!(loader.steps_per_epoch(), 4); // 18 images, drop_last
        runs.push((collect(&mut loader, 0), collect(&mut loader, 1)));
    }
    for r in &runs[1..] {
        assert!(r.0 == runs[0].0 && r.1 == runs[0].1, "batches differ between worker counts");
    }
    let (e0, e1) = &runs[0];
    assert_ne!(e0.iter().map(|b| &b.0).collect::<Vec<_>>(), e1.iter().map(|b| &b.0).collect::<Vec<_>>());
    // A different seed gives different crops of the same image.
    let cfg = LoaderConfig { batch_size: 4, seed: 8, workers: 2, shuffle: false, ..LoaderConfig::default() };
    let a = collect(&mut MultiCropLoader::new(&ds, &crops, &cfg).unwrap(), 0);
    let cfg = LoaderConfig { seed: 9, ..cfg };
    let b = collect(&mut MultiCropLoader::new(&ds, &crops, &cfg).unwrap(), 0);
    assert_eq!(a[0].0, b[0].0);
    assert_ne!(a[0].1, b[0].1);
}

#[test]
fn batch_layout_is_crop_major_and_matches_the_transform() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = photo_dataset(tmp.path(), 2, 5);
    let crops = MultiCropConfig::official();
    for layout in [Layout::Nhwc, Layout::Nchw] {
        let cfg =
            LoaderConfig { batch_size: 3, seed: 11, workers: 2, layout, channels: Some(3), ..LoaderConfig::default() };
        let mut loader = MultiCropLoader::new(&ds, &crops, &cfg).unwrap();
        let batch = loader.epoch(2).next().unwrap().unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.num_groups(), 2);
        let g0 = batch.group(0);
        let g1 = batch.group(1);
        match layout {
            Layout::Nhwc => {
                assert_eq!(g0.shape, [6, 224, 224, 3]);
                assert_eq!(g1.shape, [18, 96, 96, 3]);
            }
            Layout::Nchw => {
                assert_eq!(g0.shape, [6, 3, 224, 224]);
                assert_eq!(g1.shape, [18, 3, 96, 96]);
            }
        }
        for (i, &index) in batch.indices().iter().enumerate() {
            let img = ds.image(index).unwrap();
            let want = loader.transform().crops(&img, 11, 2, index as u64);
            assert_eq!(want.len(), 8);
            for (k, want_k) in want.iter().enumerate().take(2) {
                assert!(g0.image(k, i) == want_k.as_slice(), "group 0 crop {k} image {i}");
                assert!(&g0.data[(k * 3 + i) * 224 * 224 * 3..][..224 * 224 * 3] == want_k.as_slice());
            }
            for k in 0..6 {
                assert!(g1.image(k, i) == want[2 + k].as_slice(), "group 1 crop {k} image {i}");
            }
            assert_eq!(batch.labels()[i], ds.label(index));
        }
    }
}

#[test]
fn nchw_is_the_transpose_of_nhwc() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = photo_dataset(tmp.path(), 1, 3);
    let crops = MultiCropConfig::small(20, 10);
    let get = |layout| {
        let cfg = LoaderConfig { batch_size: 2, workers: 1, layout, ..LoaderConfig::default() };
        let mut l = MultiCropLoader::new(&ds, &crops, &cfg).unwrap();
        let b = l.epoch(0).next().unwrap().unwrap();
        b.group(0).image(1, 1).to_vec()
    };
    let (nhwc, nchw) = (get(Layout::Nhwc), get(Layout::Nchw));
    let (h, w) = (20, 20);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                assert_eq!(nhwc[(y * w + x) * 3 + c], nchw[(c * h + y) * w + x]);
            }
        }
    }
}

#[test]
fn distributed_sampler_semantics() {
    // drop_last: equal shares, disjoint, together a subset of size floor(n / w) * w.
    for (n, w) in [(10usize, 3usize), (9, 3), (7, 4), (5, 1)] {
        let mut all = Vec::new();
        for r in 0..w {
            let o = epoch_order(n, 3, 1, true, r, w, true);
            assert_eq!(o.len(), n / w);
            all.extend(o);
        }
        let mut s = all.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), all.len(), "ranks overlap");
        assert_eq!(all.len(), n / w * w);
        // Padding: ceil(n / w) each, every index present.
        let mut all = Vec::new();
        for r in 0..w {
            let o = epoch_order(n, 3, 1, true, r, w, false);
            assert_eq!(o.len(), n.div_ceil(w));
            all.extend(o);
        }
        all.sort();
        all.dedup();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }
    // Rank slices interleave the shuffled order like DistributedSampler (indices[rank::world]).
    let full = epoch_order(12, 5, 2, true, 0, 1, true);
    assert_eq!(epoch_order(12, 5, 2, true, 1, 3, true), vec![full[1], full[4], full[7], full[10]]);
    // Unshuffled order is the identity.
    assert_eq!(epoch_order(5, 0, 0, false, 0, 1, true), vec![0, 1, 2, 3, 4]);

    // Through the loader: steps and last batch.
    let tmp = tempfile::tempdir().unwrap();
    let ds = photo_dataset(tmp.path(), 1, 11);
    let crops = MultiCropConfig::small(16, 8);
    let cfg = LoaderConfig { batch_size: 2, workers: 1, world_size: 2, rank: 1, ..LoaderConfig::default() };
    let mut l = MultiCropLoader::new(&ds, &crops, &cfg).unwrap();
    assert_eq!(l.samples_per_epoch(), 5);
    assert_eq!(l.steps_per_epoch(), 2);
    assert_eq!(l.epoch(0).map(|b| b.unwrap().len()).collect::<Vec<_>>(), vec![2, 2]);
    let cfg = LoaderConfig { drop_last: false, ..cfg };
    let mut l = MultiCropLoader::new(&ds, &crops, &cfg).unwrap();
    assert_eq!(l.samples_per_epoch(), 6);
    assert_eq!(l.steps_per_epoch(), 3);
    let sizes: Vec<usize> = l.epoch(0).map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes, vec![2, 2, 2]);
    // Too few images for one batch is a configuration error that says what to do.
    let cfg = LoaderConfig { batch_size: 64, workers: 1, ..LoaderConfig::default() };
    let err = MultiCropLoader::new(&ds, &crops, &cfg).err().unwrap().to_string();
    assert!(err.contains("lower batch_size"), "{err}");
    let cfg = LoaderConfig { rank: 2, world_size: 2, ..LoaderConfig::default() };
    assert!(MultiCropLoader::new(&ds, &crops, &cfg).is_err());
}

#[test]
fn buffers_are_recycled() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = photo_dataset(tmp.path(), 1, 8);
    let cfg = LoaderConfig { batch_size: 2, workers: 1, prefetch: 1, ..LoaderConfig::default() };
    let mut l = MultiCropLoader::new(&ds, &MultiCropConfig::small(16, 8), &cfg).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        for b in l.epoch(0) {
            seen.insert(b.unwrap().group(0).data.as_ptr() as usize);
        }
    }
    // 12 batches served from a handful of allocations (prefetch + the one in hand).
    assert!(seen.len() <= 3, "{} distinct buffers", seen.len());
}

#[test]
fn dropping_stops_promptly() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = photo_dataset(tmp.path(), 2, 10);
    let cfg = LoaderConfig { batch_size: 4, workers: 2, prefetch: 4, ..LoaderConfig::default() };
    let crops = MultiCropConfig::official();
    let mut l = MultiCropLoader::new(&ds, &crops, &cfg).unwrap();
    {
        let mut e = l.epoch(0);
        e.next().unwrap().unwrap();
        // Abandon the epoch with work in flight; the next epoch must still be right.
    }
    let first = l.epoch(1).next().unwrap().unwrap();
    let again = {
        let mut l2 = MultiCropLoader::new(&ds, &crops, &LoaderConfig { workers: 1, ..cfg.clone() }).unwrap();
        let b = l2.epoch(1).next().unwrap().unwrap();
        b.group(1).data.to_vec()
    };
    assert!(first.group(1).data == again.as_slice());
    drop(first);
    // Drop the loader with a full prefetch queue: returns after the images in progress.
    let mut e = l.epoch(2);
    let _b = e.next().unwrap().unwrap();
    drop(e);
    let t = Instant::now();
    drop(l);
    assert!(t.elapsed() < Duration::from_secs(2), "drop took {:?}", t.elapsed());
    // A batch may outlive its loader.
    drop(_b);
}

#[test]
fn eval_loader_covers_everything_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = photo_dataset(tmp.path(), 2, 5);
    let cfg = LoaderConfig { batch_size: 4, workers: 2, ..LoaderConfig::default() };
    let eval = EvalConfig { resize: 32, crop: 28, mean: Some(vec![0.5]), std: Some(vec![0.25]) };
    let mut l = EvalLoader::new(&ds, &eval, &cfg).unwrap();
    assert_eq!(l.steps(), 3);
    let batches: Vec<Batch> = l.iter().map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
    let all: Vec<usize> = batches.iter().flat_map(|b| b.indices().to_vec()).collect();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    for b in &batches {
        assert_eq!(b.group(0).shape, [b.len(), 28, 28, 3]);
        for (i, &index) in b.indices().iter().enumerate() {
            let want = l.transform().apply(&ds.image(index).unwrap());
            assert!(b.group(0).image(0, i) == want.as_slice());
            assert_eq!(b.labels()[i], ds.label(index));
        }
    }
}
