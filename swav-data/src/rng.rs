//! The loader's random streams. Every random decision comes from a [`SplitMix64`] keyed by
//! (seed, epoch, index, stream), never from a generator shared between threads, so the batches do not
//! depend on the number of workers or on scheduling. The generator itself is swav-core's.

pub use swav_core::rng::SplitMix64;

/// Stream tag of the per-epoch shuffle (the crop streams use the crop number, which is far smaller).
pub const SHUFFLE_STREAM: u64 = 0x5348_5546_464C_4521;

/// The generator of one crop of one sample: key (seed, epoch, index, crop).
pub fn for_crop(seed: u64, epoch: u64, index: u64, crop: u64) -> SplitMix64 {
    SplitMix64::from_key(&[seed, epoch, index, crop])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_streams_differ_by_every_key_part() {
        let first = |s, e, i, c| for_crop(s, e, i, c).next_u64();
        let base = first(0, 0, 0, 0);
        assert_ne!(base, first(1, 0, 0, 0));
        assert_ne!(base, first(0, 1, 0, 0));
        assert_ne!(base, first(0, 0, 1, 0));
        assert_ne!(base, first(0, 0, 0, 1));
        assert_eq!(base, first(0, 0, 0, 0));
    }
}
