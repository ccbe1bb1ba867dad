//! Record payload codecs: `raw-zstd` (zstd-compressed 8-bit pixels, lossless, the default) and `jpeg`
//! (JPEG bytes: the original file when it was a JPEG kept at its size, otherwise re-encoded), and the
//! reusable decoder that the loader's workers keep (no allocation per image once warm).

use serde::{Deserialize, Serialize};

use crate::image::Image;

/// How a record's pixels are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Codec {
    /// zstd-compressed HWC u8 pixels: lossless, fast to decode.
    RawZstd,
    /// A JPEG file (smaller, lossy unless the input JPEG is stored unchanged).
    Jpeg,
}

impl Codec {
    pub(crate) fn id(self) -> u8 {
        match self {
            Codec::RawZstd => 1,
            Codec::Jpeg => 2,
        }
    }

    pub(crate) fn from_id(id: u8) -> Option<Codec> {
        match id {
            1 => Some(Codec::RawZstd),
            2 => Some(Codec::Jpeg),
            _ => None,
        }
    }

    /// The name used on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Codec::RawZstd => "raw-zstd",
            Codec::Jpeg => "jpeg",
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw-zstd" => Ok(Codec::RawZstd),
            "jpeg" => Ok(Codec::Jpeg),
            _ => Err(format!("unknown codec `{s}` (expected raw-zstd or jpeg)")),
        }
    }
}

/// Largest JPEG side the decoders accept (the format's own limit).
pub(crate) const JPEG_MAX_SIDE: usize = 65_535;

/// Largest side of an image a record may hold, whatever its codec: the JPEG limit, applied to all so that
/// a shard never holds an image one of the codecs could not.
pub(crate) const MAX_SIDE: u32 = 65_535;

/// Largest pixel count of one image (`MAX_SIDE` squared): the ceiling of `--max-pixels` and of the
/// manifest's `max_pixels`, so that a pixel count times 3 channels always fits the arithmetic.
pub(crate) const MAX_PIXELS: u64 = MAX_SIDE as u64 * MAX_SIDE as u64;

/// The most bytes one byte of a zstd frame can decompress to: a block header (3 bytes) and one byte of
/// an RLE block give at most 128 KiB. A record claiming more than this per payload byte is lying.
const ZSTD_MAX_RATIO: u64 = 32_768;

/// The most pixels one byte of a JPEG can describe: every 8x8 block of the first component needs at
/// least one bit (a Huffman code is at least one bit long), so at most 64 x 8 pixels per byte.
const JPEG_MAX_PIXELS_PER_BYTE: u64 = 512;

pub(crate) fn jpeg_options(channels: u8, strict: bool) -> zune_core::options::DecoderOptions {
    let space =
        if channels == 1 { zune_core::colorspace::ColorSpace::Luma } else { zune_core::colorspace::ColorSpace::RGB };
    zune_core::options::DecoderOptions::default()
        .set_strict_mode(strict)
        .set_max_width(JPEG_MAX_SIDE)
        .set_max_height(JPEG_MAX_SIDE)
        .jpeg_set_out_colorspace(space)
}

/// Whether a JPEG of `len` bytes can describe a `height x width` image (see `JPEG_MAX_PIXELS_PER_BYTE`).
/// Exotic but valid files (a first component subsampled against another) may describe more; preprocess
/// re-encodes those instead of storing them, so that every record it writes passes this check.
pub(crate) fn jpeg_size_is_plausible(len: usize, height: u32, width: u32) -> bool {
    height as u64 * width as u64 <= len as u64 * JPEG_MAX_PIXELS_PER_BYTE
}

/// Empties `buf` and makes room for `n` bytes, failing (instead of aborting) when the memory is not there.
/// Nothing is written, so untouched pages of a big reservation cost no physical memory.
pub(crate) fn reserve(buf: &mut Vec<u8>, n: usize, what: &str) -> Result<(), String> {
    buf.clear();
    buf.try_reserve_exact(n).map_err(|_| format!("cannot allocate {n} bytes for {what}"))
}

/// Decodes a JPEG into `out` with `channels` output channels; returns (height, width). When `expect` is
/// given (the (height, width) a record claims), a header with other dimensions is refused before any
/// pixel memory is allocated.
pub(crate) fn decode_jpeg_into(
    bytes: &[u8],
    channels: u8,
    strict: bool,
    expect: Option<(u32, u32)>,
    out: &mut Vec<u8>,
) -> Result<(u32, u32), String> {
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        jpeg_options(channels, strict),
    );
    dec.decode_headers().map_err(|e| format!("{e:?}"))?;
    let (w, h) = dec.dimensions().ok_or("no dimensions in the JPEG header")?;
    let (h, w) = (h as u32, w as u32);
    if let Some((eh, ew)) = expect {
        if (h, w) != (eh, ew) {
            return Err(format!("the JPEG is {w}x{h}, the record says {ew}x{eh}"));
        }
    }
    let n = dec.output_buffer_size().ok_or("JPEG dimensions overflow")?;
    reserve(out, n, "the JPEG's pixels")?;
    out.resize(n, 0);
    dec.decode_into(out).map_err(|e| format!("{e:?}"))?;
    Ok((h, w))
}

/// The byte count of a `height x width x channels` image, refusing shapes no record may hold.
pub(crate) fn image_len(height: u32, width: u32, channels: u8, max_pixels: u64) -> Result<usize, String> {
    if height == 0 || width == 0 || !(channels == 1 || channels == 3) {
        return Err(format!("impossible shape {width}x{height}x{channels}"));
    }
    if height > MAX_SIDE || width > MAX_SIDE {
        return Err(format!("claims a {width}x{height} image, but no side may exceed {MAX_SIDE} pixels"));
    }
    let pixels = height as u64 * width as u64;
    if pixels > max_pixels {
        return Err(format!(
            "claims a {width}x{height} image ({pixels} pixels), more than the dataset's limit of {max_pixels} pixels"
        ));
    }
    usize::try_from(pixels * channels as u64)
        .map_err(|_| format!("a {width}x{height}x{channels} image does not fit this machine's memory"))
}

/// Encodes 8-bit pixels for a record.
pub(crate) fn encode(codec: Codec, img: &Image, zstd_level: i32, jpeg_quality: u8) -> Result<Vec<u8>, String> {
    match codec {
        Codec::RawZstd => zstd::bulk::compress(&img.pixels, zstd_level).map_err(|e| e.to_string()),
        Codec::Jpeg => {
            let mut out = Vec::new();
            let color = if img.channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, jpeg_quality)
                .encode(&img.pixels, img.width, img.height, color)
                .map_err(|e| e.to_string())?;
            Ok(out)
        }
    }
}

/// Checks that a raw-zstd payload is exactly one zstd frame announcing `expected` bytes, a size its
/// length can produce: what makes the claimed shape safe to allocate.
fn check_zstd_frame(payload: &[u8], expected: usize, (h, w, c): (u32, u32, u8)) -> Result<(), String> {
    use zstd::zstd_safe;
    let frame = zstd_safe::find_frame_compressed_size(payload)
        .map_err(|_| format!("the zstd payload ({} bytes) is not a complete zstd frame", payload.len()))?;
    if frame != payload.len() {
        return Err(format!("the zstd payload holds {} bytes after its frame", payload.len() - frame));
    }
    match zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n == expected as u64 => {}
        Ok(Some(n)) => {
            return Err(format!("the zstd frame announces {n} bytes but a {w}x{h}x{c} image has {expected}"));
        }
        Ok(None) => {
            return Err("the zstd frame does not announce its decompressed size (preprocess always writes it)".into())
        }
        Err(_) => return Err("the zstd frame header is corrupt".into()),
    }
    if expected as u64 > payload.len() as u64 * ZSTD_MAX_RATIO {
        return Err(format!(
            "claims {expected} bytes of pixels, more than a zstd frame of {} bytes can hold",
            payload.len()
        ));
    }
    Ok(())
}

/// Reusable decoding state of one thread (a zstd context). Decoded pixels go into the caller's reusable
/// buffer; the JPEG decoder still allocates its own working buffers for each image.
pub struct RecordDecoder {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Default for RecordDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordDecoder {
    /// A decoder with no state yet: the zstd context is created on the first raw-zstd record. Pass it
    /// to [`crate::Dataset::read_into`] again and again to decode without allocating.
    pub fn new() -> Self {
        RecordDecoder { zstd: None }
    }

    /// Decodes `payload` into `out.pixels`, checking that the result has the shape the record declares.
    /// Claims are checked against the payload before memory is allocated for them: the byte count must
    /// be the one the zstd frame announces (and one its size can produce), or the JPEG header must
    /// state the record's dimensions; `max_pixels` caps what any record may claim.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode(
        &mut self,
        codec: Codec,
        payload: &[u8],
        height: u32,
        width: u32,
        channels: u8,
        max_pixels: u64,
        out: &mut Image,
    ) -> Result<(), String> {
        let expected = image_len(height, width, channels, max_pixels)?;
        match codec {
            Codec::RawZstd => {
                check_zstd_frame(payload, expected, (height, width, channels))?;
                if self.zstd.is_none() {
                    self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                }
                let z = self.zstd.as_mut().expect("created above");
                reserve(&mut out.pixels, expected, "its pixels")?;
                let n = z
                    .decompress_to_buffer(payload, &mut out.pixels)
                    .map_err(|e| format!("zstd payload does not decode to {expected} bytes: {e}"))?;
                if n != expected {
                    out.pixels.clear();
                    return Err(format!("zstd payload decodes to {n} bytes, expected {expected}"));
                }
            }
            Codec::Jpeg => {
                if !jpeg_size_is_plausible(payload.len(), height, width) {
                    return Err(format!(
                        "claims a {width}x{height} image, but a JPEG of {} bytes cannot describe more than {} pixels",
                        payload.len(),
                        payload.len() as u64 * JPEG_MAX_PIXELS_PER_BYTE
                    ));
                }
                decode_jpeg_into(payload, channels, true, Some((height, width)), &mut out.pixels)
                    .map_err(|e| format!("JPEG payload does not decode: {e}"))?;
            }
        }
        out.height = height;
        out.width = width;
        out.channels = channels;
        Ok(())
    }
}
