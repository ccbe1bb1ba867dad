//! Decoding one input file into an 8-bit image, refusing what must not be imported: empty files,
//! non-images, corrupt or truncated data, and dimensions beyond the pixel limit (checked from the header
//! before any pixel memory is allocated, so a decompression bomb costs nothing).
//!
//! JPEG goes through zune-jpeg in strict mode, because a lenient JPEG decoder returns truncated files as
//! grey-filled images; the other formats go through the `image` crate with allocation limits.
//! Colour types: grayscale (with or without alpha, 8 or 16 bits) becomes 1 channel; everything else
//! becomes RGB (alpha dropped, 16 bits reduced to 8), like PIL's `convert("RGB")`.

use std::io::{Cursor, Read};
use std::path::Path;

use crate::augment::resample::{Resampler, Window};
use crate::codec;
use crate::image::Image;

/// Largest input file read (bigger files are skipped).
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 31;

pub(crate) struct Decoded {
    pub image: Image,
    /// True when the input is a JPEG (its bytes may then be stored unchanged).
    pub is_jpeg: bool,
}

/// Reads and decodes `path`; `Err` is the reason to skip it. `bytes` receives the file contents.
pub(crate) fn decode_file(path: &Path, max_pixels: u64, bytes: &mut Vec<u8>) -> Result<Decoded, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("unreadable: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() == 0 {
        return Err("empty file (0 bytes)".into());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("file too large ({} bytes, the limit is {MAX_FILE_BYTES})", meta.len()));
    }
    bytes.clear();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES).read_to_end(bytes))
        .map_err(|e| format!("unreadable: {e}"))?;
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    decode_bytes(bytes, max_pixels)
}

fn check_dims(w: u64, h: u64, max_pixels: u64) -> Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("image has zero size ({w}x{h})"));
    }
    if w * h > max_pixels {
        return Err(format!(
            "dimensions {w}x{h} exceed the limit of {max_pixels} pixels (possible decompression bomb); raise --max-pixels to import it"
        ));
    }
    Ok(())
}

/// Decodes an in-memory file.
pub(crate) fn decode_bytes(bytes: &[u8], max_pixels: u64) -> Result<Decoded, String> {
    let format = image::guess_format(bytes).map_err(|_| "not an image (unrecognised format)".to_string())?;
    if format == image::ImageFormat::Jpeg {
        return decode_jpeg(bytes, max_pixels);
    }
    let reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader.into_dimensions().map_err(|e| format!("corrupt image header: {e}"))?;
    check_dims(w as u64, h as u64, max_pixels)?;
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Enough for the decoded image at 16 bits x 4 channels, plus slack for the decoder.
    limits.max_alloc = Some(w as u64 * h as u64 * 8 + (64 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("corrupt or truncated image: {e}"))?;
    let image = if img.color().has_color() {
        let rgb = img.into_rgb8();
        Image { height: rgb.height(), width: rgb.width(), channels: 3, pixels: rgb.into_raw() }
    } else {
        let l = img.into_luma8();
        Image { height: l.height(), width: l.width(), channels: 1, pixels: l.into_raw() }
    };
    Ok(Decoded { image, is_jpeg: false })
}

fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<Decoded, String> {
    let opts = codec::jpeg_options(3, true);
    let mut probe = zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(bytes), opts);
    probe.decode_headers().map_err(|e| format!("corrupt JPEG header: {e:?}"))?;
    let (w, h) = probe.dimensions().ok_or("corrupt JPEG header: no dimensions")?;
    check_dims(w as u64, h as u64, max_pixels)?;
    let gray = probe.input_colorspace() == Some(zune_core::colorspace::ColorSpace::Luma);
    let channels = if gray { 1 } else { 3 };
    let mut pixels = Vec::new();
    let (hh, ww) = codec::decode_jpeg_into(bytes, channels, true, None, &mut pixels)
        .map_err(|e| format!("corrupt or truncated JPEG: {e}"))?;
    Ok(Decoded { image: Image { height: hh, width: ww, channels, pixels }, is_jpeg: true })
}

/// Reduces the shorter side to `short` (torchvision's `Resize(short)` size rule, PIL's antialiased
/// bilinear filter, rounded to 8 bits); images already that small are returned unchanged (`None`).
pub(crate) fn shrink(img: &Image, short: u32, resampler: &mut Resampler) -> Option<Image> {
    let (h, w) = (img.height as usize, img.width as usize);
    let s = short as usize;
    if h.min(w) <= s {
        return None;
    }
    let (oh, ow) = if w <= h {
        (((s as f64 * h as f64 / w as f64) as usize).max(1), s)
    } else {
        (s, ((s as f64 * w as f64 / h as f64) as usize).max(1))
    };
    let c = img.channels as usize;
    let mut out = vec![0.0f32; oh * ow * c];
    resampler.resample(img.view(), (0, 0, h, w), (oh, ow), Window { y0: 0, x0: 0, h: oh, w: ow }, false, 1.0, &mut out);
    let pixels = out.iter().map(|&v| v.round().clamp(0.0, 255.0) as u8).collect();
    Some(Image { height: oh as u32, width: ow as u32, channels: img.channels, pixels })
}
