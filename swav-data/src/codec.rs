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

pub(crate) fn jpeg_options(channels: u8, strict: bool) -> zune_core::options::DecoderOptions {
    let space =
        if channels == 1 { zune_core::colorspace::ColorSpace::Luma } else { zune_core::colorspace::ColorSpace::RGB };
    zune_core::options::DecoderOptions::default()
        .set_strict_mode(strict)
        .set_max_width(JPEG_MAX_SIDE)
        .set_max_height(JPEG_MAX_SIDE)
        .jpeg_set_out_colorspace(space)
}

/// Decodes a JPEG into `out` (resized to fit) with `channels` output channels; returns (height, width).
pub(crate) fn decode_jpeg_into(
    bytes: &[u8],
    channels: u8,
    strict: bool,
    out: &mut Vec<u8>,
) -> Result<(u32, u32), String> {
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        jpeg_options(channels, strict),
    );
    dec.decode_headers().map_err(|e| format!("{e:?}"))?;
    let (w, h) = dec.dimensions().ok_or("no dimensions in the JPEG header")?;
    let n = dec.output_buffer_size().ok_or("JPEG dimensions overflow")?;
    out.resize(n, 0);
    dec.decode_into(out).map_err(|e| format!("{e:?}"))?;
    Ok((h as u32, w as u32))
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
    pub fn new() -> Self {
        RecordDecoder { zstd: None }
    }

    /// Decodes `payload` into `out.pixels`, checking that the result has the shape the record declares.
    pub(crate) fn decode(
        &mut self,
        codec: Codec,
        payload: &[u8],
        height: u32,
        width: u32,
        channels: u8,
        out: &mut Image,
    ) -> Result<(), String> {
        let expected = height as usize * width as usize * channels as usize;
        match codec {
            Codec::RawZstd => {
                if self.zstd.is_none() {
                    self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                }
                let z = self.zstd.as_mut().expect("created above");
                out.pixels.resize(expected, 0);
                let n = z
                    .decompress_to_buffer(payload, out.pixels.as_mut_slice())
                    .map_err(|e| format!("zstd payload does not decode to {expected} bytes: {e}"))?;
                if n != expected {
                    return Err(format!("zstd payload decodes to {n} bytes, expected {expected}"));
                }
            }
            Codec::Jpeg => {
                let (h, w) = decode_jpeg_into(payload, channels, true, &mut out.pixels)
                    .map_err(|e| format!("JPEG payload does not decode: {e}"))?;
                if (h, w) != (height, width) {
                    return Err(format!("JPEG payload is {w}x{h}, the record says {width}x{height}"));
                }
            }
        }
        out.height = height;
        out.width = width;
        out.channels = channels;
        Ok(())
    }
}
