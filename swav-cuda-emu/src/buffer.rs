//! Emulated device buffers: typed storage with guard zones, and CUDA's bf16 conversions.

use crate::Elem;

/// Bytes of canary before and after every buffer: a kernel writing just outside its buffer (the
/// common off-by-one) changes them, and the launch reports it.
const GUARD: usize = 64;
const CANARY: u8 = 0xA5;
const WORD: usize = std::mem::size_of::<u128>();

/// A device buffer of the emulator: `len` elements of one [`Elem`] type, 16-byte aligned (vector loads
/// work), between two guard zones checked after every launch.
#[derive(Clone)]
pub struct Buffer {
    elem: Elem,
    len: usize,
    words: Vec<u128>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({:?} x {})", self.elem, self.len)
    }
}

macro_rules! typed {
    ($from:ident, $as:ident, $as_mut:ident, $t:ty, $($e:ident)|+) => {
        /// A buffer holding a copy of `data`.
        pub fn $from(data: &[$t]) -> Buffer {
            let mut b = Buffer::filled(typed!(@first $($e)|+), data.len(), 0);
            b.$as_mut().copy_from_slice(data);
            b
        }
        /// The contents (panics if the element type differs).
        pub fn $as(&self) -> &[$t] {
            self.expect(&[$(Elem::$e),+]);
            // SAFETY: the storage is 16-byte aligned, holds `len` elements after the guard, and every
            // bit pattern is a valid value of the type.
            unsafe { std::slice::from_raw_parts(self.data_ptr() as *const $t, self.len) }
        }
        /// The contents, writable (panics if the element type differs).
        pub fn $as_mut(&mut self) -> &mut [$t] {
            self.expect(&[$(Elem::$e),+]);
            // SAFETY: as above, and `&mut self` makes the access exclusive.
            unsafe { std::slice::from_raw_parts_mut(self.data_mut_ptr() as *mut $t, self.len) }
        }
    };
    (@first $e:ident $(| $rest:ident)*) => { Elem::$e };
}

impl Buffer {
    /// `len` elements whose bytes are all `byte`.
    pub fn filled(elem: Elem, len: usize, byte: u8) -> Buffer {
        let data = len * elem.size();
        let words = (2 * GUARD + data).div_ceil(WORD);
        let mut b = Buffer { elem, len, words: vec![0; words] };
        let bytes = b.raw_mut();
        bytes.fill(CANARY);
        bytes[GUARD..GUARD + data].fill(byte);
        b
    }

    /// Zero-filled.
    pub fn zeros(elem: Elem, len: usize) -> Buffer {
        Buffer::filled(elem, len, 0)
    }

    /// Filled with 0xFF bytes (NaN for floating-point types, all ones for integers): what a kernel
    /// reads from it before writing shows up in the results. For scratch and output buffers.
    pub fn poisoned(elem: Elem, len: usize) -> Buffer {
        Buffer::filled(elem, len, 0xff)
    }

    typed!(from_f32, as_f32, as_f32_mut, f32, F32);
    typed!(from_bf16_bits, as_bf16_bits, as_bf16_bits_mut, u16, Bf16);
    typed!(from_i32, as_i32, as_i32_mut, i32, I32);
    typed!(from_u32, as_u32, as_u32_mut, u32, U32);
    typed!(from_u8, as_u8, as_u8_mut, u8, U8);
    typed!(from_i64, as_i64, as_i64_mut, i64, I64);
    typed!(from_u64, as_u64, as_u64_mut, u64, U64);

    /// A buffer of `elem` holding a copy of `bytes` (whose length must be a multiple of the element
    /// size): device memory seen through a kernel parameter's type.
    pub fn from_bytes(elem: Elem, bytes: &[u8]) -> Buffer {
        assert_eq!(bytes.len() % elem.size(), 0, "{} bytes are not whole {elem:?} elements", bytes.len());
        let mut b = Buffer::filled(elem, bytes.len() / elem.size(), 0);
        b.raw_mut()[GUARD..GUARD + bytes.len()].copy_from_slice(bytes);
        b
    }

    /// A bf16 buffer holding `data` rounded as CUDA's `__float2bfloat16` does.
    pub fn from_f32_as_bf16(data: &[f32]) -> Buffer {
        let bits: Vec<u16> = data.iter().map(|&v| bf16_from_f32(v)).collect();
        Buffer::from_bf16_bits(&bits)
    }

    /// The values widened to f32 (F32 and Bf16 buffers).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.elem {
            Elem::Bf16 => self.as_bf16_bits().iter().map(|&b| bf16_to_f32(b)).collect(),
            _ => self.as_f32().to_vec(),
        }
    }

    /// The contents as bytes (for bit-for-bit comparisons of any type).
    pub fn bytes(&self) -> &[u8] {
        &self.raw()[GUARD..GUARD + self.len * self.elem.size()]
    }

    /// The element type.
    pub fn elem(&self) -> Elem {
        self.elem
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address kernels see for this buffer (for tables of pointers built on the host). Stable for
    /// the life of the buffer. Kernels that write through it must run while nothing else borrows the
    /// buffer.
    pub fn device_address(&self) -> u64 {
        self.data_ptr() as u64
    }

    fn data_ptr(&self) -> *const u8 {
        // SAFETY: GUARD bytes into an allocation of at least 2 GUARD bytes.
        unsafe { (self.words.as_ptr() as *const u8).add(GUARD) }
    }

    /// The data's address for a kernel argument: derived from `&mut self`, as kernels write through it.
    pub(crate) fn data_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: as above.
        unsafe { (self.words.as_mut_ptr() as *mut u8).add(GUARD) }
    }

    /// Which guard zone a kernel wrote into, if any.
    pub(crate) fn damaged_guard(&self) -> Option<&'static str> {
        let raw = self.raw();
        let data = self.len * self.elem.size();
        if raw[..GUARD].iter().any(|&b| b != CANARY) {
            Some("before its start")
        } else if raw[GUARD + data..].iter().any(|&b| b != CANARY) {
            Some("past its end")
        } else {
            None
        }
    }

    fn raw(&self) -> &[u8] {
        // SAFETY: the words' bytes; u8 has no alignment or validity requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.words.len() * WORD) }
    }

    fn raw_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusive through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.words.len() * WORD) }
    }

    fn expect(&self, elems: &[Elem]) {
        assert!(elems.contains(&self.elem), "a buffer of {:?} read as {elems:?}", self.elem);
    }
}

/// f32 -> bf16 bits exactly as CUDA's `__float2bfloat16`: round to nearest, ties to even; every NaN
/// becomes the canonical 0x7fff.
pub fn bf16_from_f32(v: f32) -> u16 {
    let u = v.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return 0x7fff;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `v` rounded to bf16 and back: the value a bf16 buffer stores for `v`.
pub fn round_bf16(v: f32) -> f32 {
    bf16_to_f32(bf16_from_f32(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_canonicalises_nan() {
        assert_eq!(bf16_from_f32(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1.0).
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f80_8000)), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up to even.
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_from_f32(f32::MAX), 0x7f80, "rounds to infinity");
        assert_eq!(bf16_from_f32(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_from_f32(-0.0), 0x8000);
        assert_eq!(bf16_from_f32(f32::NAN), 0x7fff);
        assert_eq!(bf16_from_f32(f32::from_bits(0xffc0_0001)), 0x7fff);
        assert_eq!(round_bf16(3.0), 3.0);
    }

    #[test]
    fn guards_catch_writes_outside_the_data() {
        let mut b = Buffer::from_f32(&[1.0, 2.0, 3.0]);
        assert_eq!(b.damaged_guard(), None);
        // SAFETY: one element past the end is inside the guard zone.
        unsafe { *(b.data_mut_ptr() as *mut f32).add(3) = 0.0 };
        assert_eq!(b.damaged_guard(), Some("past its end"));
        let p = Buffer::poisoned(Elem::F32, 2);
        assert!(p.as_f32().iter().all(|v| v.is_nan()));
        assert_eq!(p.device_address() % 16, 0);
    }
}
