//! Decoded images: 8-bit pixels, height x width x channels (HWC), 1 (grayscale) or 3 (RGB) channels.

/// An owned 8-bit image, pixels in HWC order (row after row, channels interleaved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    /// Rows of pixels (at least 1 for an image made by [`Image::new`] or decoded from a record).
    pub height: u32,
    /// Pixels per row.
    pub width: u32,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: u8,
    /// `height * width * channels` bytes.
    pub pixels: Vec<u8>,
}

impl Image {
    /// A borrowed view of this image.
    pub fn view(&self) -> ImageView<'_> {
        ImageView {
            height: self.height as usize,
            width: self.width as usize,
            channels: self.channels as usize,
            pixels: &self.pixels,
        }
    }

    /// Builds an image, checking that the pixel count matches the shape: `None` unless `channels` is 1 or
    /// 3, both sides are non-zero and `pixels` holds exactly `height * width * channels` bytes.
    pub fn new(height: u32, width: u32, channels: u8, pixels: Vec<u8>) -> Option<Image> {
        let ok = (channels == 1 || channels == 3)
            && height > 0
            && width > 0
            && pixels.len() as u64 == height as u64 * width as u64 * channels as u64;
        ok.then_some(Image { height, width, channels, pixels })
    }
}

/// A borrowed 8-bit HWC image: what the transforms read (see [`Image::view`]).
#[derive(Clone, Copy, Debug)]
pub struct ImageView<'a> {
    /// Rows of pixels.
    pub height: usize,
    /// Pixels per row.
    pub width: usize,
    /// 1 (grayscale) or 3 (RGB), interleaved.
    pub channels: usize,
    /// `height * width * channels` bytes, row after row.
    pub pixels: &'a [u8],
}
