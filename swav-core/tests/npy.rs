//! The `.npy` codec against what NumPy writes, and round trips through files.

use swav_core::npy;

#[test]
fn npy_header_is_numpys() {
    let bytes = npy::to_bytes(&[2, 3], &[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    // What `np.save` writes for `np.arange(6, dtype="<f4").reshape(2, 3)`: a 128-byte header.
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    let mut want = b"\x93NUMPY\x01\x00v\x00".to_vec();
    want.extend_from_slice(dict.as_bytes());
    want.resize(127, b' ');
    want.push(b'\n');
    assert_eq!(&bytes[..128], &want[..]);
    assert_eq!(bytes.len(), 128 + 6 * 4);
    assert_eq!(&bytes[128 + 4..128 + 8], &1.0f32.to_le_bytes());
}

#[test]
fn npy_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f.npy");
    let data: Vec<f32> = (0..3 * 70).map(|i| i as f32 * 0.5 - 7.0).collect();
    npy::write(&f, &[3, 70], &data).unwrap();
    let bytes = std::fs::read(&f).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0, "data is 64-byte aligned");
    assert_eq!(bytes[10 + header_len - 1], b'\n');
    assert_eq!(npy::read::<f32>(&f).unwrap(), (vec![3, 70], data));

    let l = dir.path().join("l.npy");
    let labels: Vec<i64> = vec![0, 9, 3, -1, i64::MAX, 2, 2];
    npy::write(&l, &[7], &labels).unwrap();
    let text = String::from_utf8_lossy(&std::fs::read(&l).unwrap()[..64]).into_owned();
    assert!(text.contains("'descr': '<i8'") && text.contains("'shape': (7,)"), "{text}");
    assert_eq!(npy::read::<i64>(&l).unwrap(), (vec![7], labels));

    // Wrong dtype, bad magic, truncated data and a shape that does not fit are errors.
    assert!(npy::read::<i64>(&f).is_err());
    assert!(npy::from_bytes::<f32>(b"not numpy at all").is_err());
    let bytes = std::fs::read(&f).unwrap();
    assert!(npy::from_bytes::<f32>(&bytes[..bytes.len() - 4]).is_err());
    assert!(npy::write(&f, &[4, 70], &[0.0f32; 10]).is_err());
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}
