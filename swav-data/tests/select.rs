//! Importing a part of the input: `select` splits one source into disjoint datasets.

mod common;

#[test]
fn selecting_ranges_splits_an_idx_file_into_disjoint_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = tmp.path().join("x-images-idx3-ubyte");
    let (n, side) = (10usize, 4usize);
    let pixels: Vec<u8> = (0..n * side * side).map(|i| (i * 7 % 251) as u8).collect();
    let mut bytes = 0x0803u32.to_be_bytes().to_vec();
    for d in [n as u32, side as u32, side as u32] {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(&pixels);
    std::fs::write(&idx, bytes).unwrap();
    let mut labels = 0x0801u32.to_be_bytes().to_vec();
    labels.extend_from_slice(&(n as u32).to_be_bytes());
    labels.extend((0..n).map(|i| (i % 3) as u8));
    std::fs::write(tmp.path().join("x-labels-idx1-ubyte"), labels).unwrap();
    let part = |range: std::ops::Range<usize>, name: &str| {
        let mut opts = common::options(&idx, &tmp.path().join(name));
        opts.select = Some(range);
        common::run(&opts).unwrap();
        swav_data::Dataset::open(tmp.path().join(name)).unwrap()
    };
    let (a, b) = (part(0..7, "a"), part(7..10, "b"));
    assert_eq!((a.len(), b.len()), (7, 3));
    for i in 0..3 {
        assert_eq!(b.image(i).unwrap().pixels, &pixels[(7 + i) * 16..(8 + i) * 16], "image {i} of the second part");
    }
    assert_eq!(a.image(6).unwrap().pixels, &pixels[6 * 16..7 * 16]);
    assert_eq!((a.label(6), b.label(0)), (Some(0), Some(1)));
    let mut opts = common::options(&idx, &tmp.path().join("c"));
    opts.select = Some(5..11);
    assert!(common::run(&opts).is_err(), "a selection past the end is refused");
}
