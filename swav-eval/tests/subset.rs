//! Labelled subsets: lists of recorded names, file names or indices; seeded fractions, balanced per
//! class when asked; every mistake in a list refused with its line.

mod common;

use std::path::Path;

use swav_eval::subset::{from_fraction, from_list, select, Selection};

#[test]
fn lists_select_by_recorded_name_file_name_or_index() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::dataset(tmp.path(), "data", 5, false, 1);
    // Images are class0/img000.png .. class2/img004.png, in that order.
    let list = "# the official lists are file names\nclass1/img002.png\n\n  img004.png\n3\n";
    let path = Path::new("list.txt");
    let chosen = from_list(&data, list.replace("img004.png", "class2/img004.png").as_str(), path).unwrap();
    assert_eq!(chosen, [7, 14, 3]);
    let file = tmp.path().join("list.txt");
    std::fs::write(&file, "class1/img002.png\n3\n0\n").unwrap();
    let s = select(&data, &Selection::List { path: file.clone() }).unwrap();
    assert_eq!((s.indices.clone(), s.images, s.per_class.clone()), (vec![0, 3, 7], 3, vec![2, 1, 0]));
    assert_eq!(select(&data, &Selection::List { path: file }).unwrap().sha256, s.sha256);

    let err = |text: &str| from_list(&data, text, path).unwrap_err().to_string();
    let e = err(list);
    assert!(e.contains("list.txt line 4") && e.contains("img004.png") && e.contains("3 images"), "{e}");
    let e = err("class0/img000.png\nclass9/x.png\n");
    assert!(e.contains("line 2") && e.contains("no image of the dataset has this name"), "{e}");
    let e = err("15\n");
    assert!(e.contains("out of range") && e.contains("15 images"), "{e}");
    let e = err("class0/img001.png\n1\n");
    assert!(e.contains("line 2") && e.contains("again") && e.contains("line 1"), "{e}");
}

#[test]
fn fractions_are_deterministic_and_balanced_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::dataset(tmp.path(), "data", 10, false, 1);
    let pick = |f: f64, seed: u64, balanced: bool| {
        select(&data, &Selection::Fraction { fraction: f, seed, balanced }).unwrap()
    };
    let a = pick(0.3, 1, true);
    assert_eq!((a.images, a.per_class.clone()), (9, vec![3, 3, 3]));
    assert_eq!(pick(0.3, 1, true), a, "the same seed gives the same subset");
    assert_ne!(pick(0.3, 2, true).indices, a.indices, "another seed another one");
    assert!(a.indices.windows(2).all(|w| w[0] < w[1]));
    // At least one image per class, however small the fraction.
    assert_eq!(pick(0.01, 1, true).per_class, [1, 1, 1]);
    let u = pick(0.5, 1, false);
    assert_eq!(u.images, 15);
    assert_eq!(pick(1.0, 9, false).indices, (0..30).collect::<Vec<_>>());
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        assert!(from_fraction(&data, bad, 1, true).is_err(), "{bad}");
    }
}
