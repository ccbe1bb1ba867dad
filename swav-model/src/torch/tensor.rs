//! Storages and views: from the raw bytes of a storage and a `_rebuild_tensor_v2` view (offset, sizes,
//! strides) to a contiguous [`Value`].
//!
//! Everything is checked before anything is allocated: the view's element count must not exceed its
//! storage's (so a file cannot claim 2^60 elements backed by four bytes), every element the view reaches
//! must lie inside the storage, and the output of the whole file must fit a [`Budget`] proportional to
//! the file's size (several tensors may view one storage, so the first rule alone does not bound the
//! total). Floating-point storages become `F32` (f16 and bf16 exactly, f64 rounded to nearest); integer
//! and bool storages become `I64`.

use crate::checkpoint::Value;

use super::TorchError;

/// The element type of a storage, from its pickled class (`torch.FloatStorage`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// The storage class names PyTorch pickles, with their element types.
    pub(crate) const STORAGES: [(&'static str, DType); 10] = [
        ("FloatStorage", DType::F32),
        ("HalfStorage", DType::F16),
        ("BFloat16Storage", DType::BF16),
        ("DoubleStorage", DType::F64),
        ("LongStorage", DType::I64),
        ("IntStorage", DType::I32),
        ("ShortStorage", DType::I16),
        ("CharStorage", DType::I8),
        ("ByteStorage", DType::U8),
        ("BoolStorage", DType::Bool),
    ];

    /// The storage class of this element type, e.g. `FloatStorage`.
    pub(crate) fn storage_name(self) -> &'static str {
        Self::STORAGES.iter().find(|(_, d)| *d == self).map_or("?", |(n, _)| n)
    }

    /// Bytes per element.
    pub(crate) fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    /// Bytes per element once converted ([`Value::F32`] or [`Value::I64`]).
    fn out_size(self) -> u64 {
        if self.is_float() {
            4
        } else {
            8
        }
    }
}

/// How many bytes of tensors the reader may still produce. Set to a multiple of the file's size: a
/// state dict's output is at most 8x its storages (u8 -> i64), and a few tensors may share storages.
#[derive(Debug)]
pub(crate) struct Budget {
    left: u64,
}

impl Budget {
    /// Output bytes allowed per input byte.
    pub(crate) const PER_INPUT_BYTE: u64 = 16;

    /// The budget of a file of `len` bytes.
    pub(crate) fn for_input(len: usize) -> Budget {
        Budget { left: (len as u64).saturating_mul(Self::PER_INPUT_BYTE) }
    }

    fn take(&mut self, name: &str, bytes: u64) -> Result<(), TorchError> {
        self.left = self.left.checked_sub(bytes).ok_or_else(|| {
            TorchError::Limit(format!(
                "tensor `{name}` would take the output past {}x the file's size (storages shared by too many views)",
                Self::PER_INPUT_BYTE
            ))
        })?;
        Ok(())
    }
}

/// The bytes of one storage and how to read them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StorageData<'a> {
    /// The storage's key, for messages.
    pub key: &'a str,
    /// Exactly the storage's bytes (already checked against the element count the pickle claims).
    pub bytes: &'a [u8],
    /// The element type the view reads.
    pub dtype: DType,
    /// Element order of multi-byte elements (the zip format's `byteorder` record).
    pub big_endian: bool,
}

/// A view into a storage, as `_rebuild_tensor_v2` receives it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    /// First element, in elements of the storage's type.
    pub offset: u64,
    /// Size of each dimension (empty for a 0-d tensor).
    pub size: &'a [u64],
    /// Stride of each dimension, in elements.
    pub stride: &'a [u64],
}

/// Checks the view against its storage and the budget, then copies it out contiguously.
pub(crate) fn materialize(
    name: &str,
    storage: StorageData<'_>,
    view: View<'_>,
    budget: &mut Budget,
) -> Result<Value, TorchError> {
    let numel = check_view(name, &storage, &view)?;
    budget.take(name, numel.saturating_mul(storage.dtype.out_size()))?;
    let shape: Vec<usize> = view.size.iter().map(|&s| s as usize).collect();
    let len = numel as usize;
    Ok(if storage.dtype.is_float() {
        let decode = float_decoder(storage.dtype, storage.big_endian);
        Value::F32 { shape, data: gather(&storage, &view, len, decode) }
    } else {
        let decode = int_decoder(storage.dtype, storage.big_endian);
        Value::I64 { shape, data: gather(&storage, &view, len, decode) }
    })
}

/// The view's element count, once it is known to lie inside the storage.
fn check_view(name: &str, storage: &StorageData<'_>, view: &View<'_>) -> Result<u64, TorchError> {
    let err = |detail: String| TorchError::Tensor { name: name.to_string(), detail };
    let available = (storage.bytes.len() / storage.dtype.size()) as u64;
    let numel = view
        .size
        .iter()
        .try_fold(1u64, |n, &s| n.checked_mul(s))
        .ok_or_else(|| err(format!("sizes {:?} overflow 64 bits", view.size)))?;
    if numel > available {
        return Err(err(format!(
            "claims {numel} elements but its storage `{}` holds {available} {}",
            storage.key,
            storage.dtype.storage_name()
        )));
    }
    if numel == 0 {
        return Ok(0);
    }
    // The furthest element the view reads: offset + sum((size - 1) * stride).
    let last = view
        .size
        .iter()
        .zip(view.stride)
        .try_fold(view.offset, |acc, (&s, &st)| (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x)));
    match last {
        Some(last) if last < available => Ok(numel),
        _ => Err(err(format!(
            "storage offset {} with sizes {:?} and strides {:?} reaches past the end of storage `{}` ({available} elements)",
            view.offset, view.size, view.stride, storage.key
        ))),
    }
}

/// Copies the view's elements in row-major order. The bounds were checked by [`check_view`], so every
/// index below is in range; the contiguous case reads one slice.
fn gather<T>(storage: &StorageData<'_>, view: &View<'_>, len: usize, decode: fn(&[u8]) -> T) -> Vec<T> {
    let es = storage.dtype.size();
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    let offset = view.offset as usize;
    if is_contiguous(view) {
        let bytes = &storage.bytes[offset * es..(offset + len) * es];
        out.extend(bytes.chunks_exact(es).map(decode));
        return out;
    }
    // Odometer over the multi-index, innermost dimension fastest; `at` is the current element. A
    // dimension of size 1 may carry any stride, so stepping past its end may overflow: the arithmetic
    // wraps, and every index actually read is a real in-bounds multi-index.
    let rank = view.size.len();
    let mut index = vec![0u64; rank];
    let mut at = offset;
    for _ in 0..len {
        out.push(decode(&storage.bytes[at * es..(at + 1) * es]));
        for d in (0..rank).rev() {
            index[d] += 1;
            at = at.wrapping_add(view.stride[d] as usize);
            if index[d] < view.size[d] {
                break;
            }
            at = at.wrapping_sub(view.size[d].wrapping_mul(view.stride[d]) as usize);
            index[d] = 0;
        }
    }
    out
}

/// Row-major contiguous: each stride is the product of the sizes after it (size-1 dims are free).
fn is_contiguous(view: &View<'_>) -> bool {
    let mut expect = 1u64;
    for (&s, &st) in view.size.iter().zip(view.stride).rev() {
        if s != 1 && st != expect {
            return false;
        }
        expect = expect.saturating_mul(s);
    }
    true
}

fn float_decoder(dtype: DType, big_endian: bool) -> fn(&[u8]) -> f32 {
    // The slices come from `chunks_exact(size)` or a range of exactly `size` bytes.
    fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[..N]);
        a
    }
    match (dtype, big_endian) {
        (DType::F32, false) => |b| f32::from_le_bytes(arr(b)),
        (DType::F32, true) => |b| f32::from_be_bytes(arr(b)),
        (DType::F16, false) => |b| half::f16::from_le_bytes(arr(b)).to_f32(),
        (DType::F16, true) => |b| half::f16::from_be_bytes(arr(b)).to_f32(),
        (DType::BF16, false) => |b| half::bf16::from_le_bytes(arr(b)).to_f32(),
        (DType::BF16, true) => |b| half::bf16::from_be_bytes(arr(b)).to_f32(),
        (DType::F64, false) => |b| f64::from_le_bytes(arr(b)) as f32,
        (_, _) => |b| f64::from_be_bytes(arr(b)) as f32,
    }
}

fn int_decoder(dtype: DType, big_endian: bool) -> fn(&[u8]) -> i64 {
    fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[..N]);
        a
    }
    match (dtype, big_endian) {
        (DType::I64, false) => |b| i64::from_le_bytes(arr(b)),
        (DType::I64, true) => |b| i64::from_be_bytes(arr(b)),
        (DType::I32, false) => |b| i32::from_le_bytes(arr(b)) as i64,
        (DType::I32, true) => |b| i32::from_be_bytes(arr(b)) as i64,
        (DType::I16, false) => |b| i16::from_le_bytes(arr(b)) as i64,
        (DType::I16, true) => |b| i16::from_be_bytes(arr(b)) as i64,
        (DType::I8, _) => |b| b[0] as i8 as i64,
        (DType::Bool, _) => |b| (b[0] != 0) as i64,
        (_, _) => |b| b[0] as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_storage(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn read(bytes: &[u8], offset: u64, size: &[u64], stride: &[u64]) -> Result<Value, TorchError> {
        let storage = StorageData { key: "0", bytes, dtype: DType::F32, big_endian: false };
        materialize("t", storage, View { offset, size, stride }, &mut Budget::for_input(1 << 20))
    }

    #[test]
    fn strided_views_come_out_row_major() {
        let bytes = f32_storage(&(0..12).map(|i| i as f32).collect::<Vec<_>>());
        // A 3x4 matrix transposed: sizes [4, 3], strides [1, 4].
        let t = read(&bytes, 0, &[4, 3], &[1, 4]).unwrap();
        assert_eq!(t, Value::F32 { shape: vec![4, 3], data: vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.] });
        // Offset 5, every other element: [5, 7, 9].
        assert_eq!(read(&bytes, 5, &[3], &[2]).unwrap(), Value::F32 { shape: vec![3], data: vec![5., 7., 9.] });
        // 0-d.
        assert_eq!(read(&bytes, 11, &[], &[]).unwrap(), Value::F32 { shape: vec![], data: vec![11.] });
    }

    #[test]
    fn views_past_the_storage_are_refused_before_allocating() {
        let bytes = f32_storage(&[1.0; 4]);
        let e = read(&bytes, 3, &[2], &[1]).unwrap_err().to_string();
        assert!(e.contains("offset 3") && e.contains("past the end"), "{e}");
        let e = read(&bytes, 0, &[1 << 60], &[1]).unwrap_err().to_string();
        assert!(e.contains("claims 1152921504606846976 elements"), "{e}");
        let e = read(&bytes, 0, &[1 << 30, 1 << 30], &[0, 0]).unwrap_err().to_string();
        assert!(e.contains("claims"), "{e}");
        let e = read(&bytes, 0, &[u64::MAX, 2], &[1, 1]).unwrap_err().to_string();
        assert!(e.contains("overflow"), "{e}");
        let e = read(&bytes, u64::MAX, &[1], &[1]).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
    }

    #[test]
    fn the_budget_bounds_views_that_share_a_storage() {
        let bytes = f32_storage(&[1.0; 4]);
        let mut budget = Budget { left: 40 };
        let storage = StorageData { key: "0", bytes: &bytes, dtype: DType::F32, big_endian: false };
        let view = View { offset: 0, size: &[4], stride: &[1] };
        assert!(materialize("a", storage, view, &mut budget).is_ok());
        assert!(materialize("b", storage, view, &mut budget).is_ok());
        let e = materialize("c", storage, view, &mut budget).unwrap_err().to_string();
        assert!(e.contains("`c`"), "{e}");
    }

    #[test]
    fn every_dtype_converts() {
        let case = |dtype, big_endian, bytes: &[u8]| {
            let storage = StorageData { key: "0", bytes, dtype, big_endian };
            materialize("t", storage, View { offset: 0, size: &[1], stride: &[1] }, &mut Budget::for_input(64)).unwrap()
        };
        let f = |v: f32| Value::F32 { shape: vec![1], data: vec![v] };
        let i = |v: i64| Value::I64 { shape: vec![1], data: vec![v] };
        assert_eq!(case(DType::F16, false, &half::f16::from_f32(1.5).to_le_bytes()), f(1.5));
        assert_eq!(case(DType::F16, true, &half::f16::from_f32(1.5).to_be_bytes()), f(1.5));
        assert_eq!(case(DType::BF16, false, &half::bf16::from_f32(-2.0).to_le_bytes()), f(-2.0));
        assert_eq!(case(DType::F64, true, &0.25f64.to_be_bytes()), f(0.25));
        assert_eq!(case(DType::I32, false, &(-7i32).to_le_bytes()), i(-7));
        assert_eq!(case(DType::I64, true, &(1i64 << 40).to_be_bytes()), i(1 << 40));
        assert_eq!(case(DType::I8, false, &[0xff]), i(-1));
        assert_eq!(case(DType::U8, false, &[0xff]), i(255));
        assert_eq!(case(DType::Bool, false, &[2]), i(1));
    }
}
