//! Images to `pixel_values`, as transformers 4.46.3's `ViTImageProcessor`
//! computes them from `PIL.Image.open(path).convert("RGB")` (or
//! `convert("L")` for one-channel models).
//!
//! The pipeline, step by step, with the arithmetic of each reference:
//!
//! 1. Decode (JPEG, PNG, WebP, BMP, GIF first frame, TIFF) with the `image`
//!    crate, refusing from the header, before decoding, what Pillow refuses
//!    as a decompression bomb (more than 2 × 89,478,485 pixels), and under a
//!    1.5 GiB limit on the decoders' allocations;
//!    JPEG pixels come from libjpeg-turbo's code (the `mozjpeg` crate, built
//!    from source without SIMD) at Pillow's settings.
//! 2. Convert to 8-bit RGB or L the way Pillow 13 does: grey replicated,
//!    palettes expanded, alpha dropped (not composited); a 16-bit grey PNG or
//!    TIFF ("I;16") is clamped to 255, 16-bit colour and grey+alpha keep the
//!    high byte; L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16.
//! 3. Resize straight to height×width with Pillow's resampling
//!    (`Resample.c`): separable, the filter widened by the scale factor when
//!    shrinking, 22-bit fixed-point coefficients, rounded and clamped to 8
//!    bits after each pass; horizontal pass first unless the height shrinks
//!    by more than twice as many pixels as the width (Pillow 13's order);
//!    nearest neighbour as Pillow's affine scale (`Geometry.c`).
//! 4. Rescale in f64 then cast to f32 (`image.astype(float64) * scale`), and
//!    normalize in f32 (`(image - mean) / std`), channels first.
//!
//! With [`Preprocessing::shortest_edge`] set, step 3 is torchvision's
//! `Resize(shortest_edge)` then `CenterCrop((height, width))` on the PIL
//! image instead (MSN's evaluation), the same Pillow resize; torchvision's
//! `ToTensor` divides by 255 in f32, which gives the same f32 as the f64
//! rescale for every 8-bit value.
//!
//! For JPEG (4:2:0, 4:2:2, 4:4:4, progressive, grey, CMYK), PNG, BMP, GIF,
//! TIFF and WebP (lossy included: image-webp decodes as libwebp does) the
//! result is bit-identical to transformers + Pillow 13.0.0;
//! `tests/image_parity.rs` checks it.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};
use serde_json::{json, Map, Value};
use tch::Tensor;

use crate::error::{Error, Result};

/// Pillow 13's `Image.MAX_IMAGE_PIXELS`. Pillow only warns above it and
/// raises `DecompressionBombError` above twice it, whatever the shape (a
/// 17000×8 strip is fine); [`max_pixels_error`] applies the same rule.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;
/// Largest allocation the decoders may make, in bytes: the largest image
/// Pillow decodes (2 × MAX_IMAGE_PIXELS) at 8 bytes a pixel (16-bit RGBA)
/// fits, so nothing Pillow reads is refused here.
pub const MAX_DECODER_ALLOC: u64 = 3 << 29;
/// Largest image file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Largest `size` a preprocessor config may ask for: the largest side a
/// bundle may be compiled for.
pub use vit_msn_format::bounds::MAX_SIDE as MAX_TARGET_SIDE;

/// The extensions [`is_image_path`] accepts (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

const IMAGENET_DEFAULT_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_DEFAULT_STD: [f64; 3] = [0.229, 0.224, 0.225];
/// `image_processor_type` of the torchvision form: Resize + CenterCrop,
/// which no transformers processor computes exactly (their crop offset
/// floors where torchvision rounds half to even).
const TORCHVISION: &str = "torchvision";
/// ViTImageProcessor's own defaults (`IMAGENET_STANDARD_MEAN/STD`).
const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];

/// The settings of a `ViTImageProcessor` (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessing {
    pub do_resize: bool,
    pub height: u32,
    pub width: u32,
    /// PIL filter code: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box,
    /// 5 hamming (all six are reproduced).
    pub resample: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    /// One value per channel, or a single value used for every channel.
    pub image_mean: Vec<f64>,
    pub image_std: Vec<f64>,
    /// torchvision's `Resize(shortest_edge)` + `CenterCrop((height, width))`
    /// instead of resizing straight to height×width: the shorter side
    /// resized to this, the longer in proportion (truncated), then the centre
    /// cut out. MSN's low-shot evaluation uses 256 and 224. Needs `do_resize`
    /// and a crop no larger than it.
    pub shortest_edge: Option<u32>,
}

impl Preprocessing {
    /// What the ViT-MSN checkpoints (facebook/vit-msn-*) save: 224×224,
    /// bilinear, 1/255, ImageNet mean and std.
    pub fn vit_msn_default() -> Self {
        Preprocessing {
            do_resize: true,
            height: 224,
            width: 224,
            resample: 2,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: IMAGENET_DEFAULT_MEAN.to_vec(),
            image_std: IMAGENET_DEFAULT_STD.to_vec(),
            shortest_edge: None,
        }
    }

    /// MSN's `logistic_eval.py`: torchvision `Resize(resize)` (bilinear),
    /// `CenterCrop(crop)`, `ToTensor`, ImageNet `Normalize` (256 and 224 there).
    pub fn msn_eval(resize: u32, crop: u32) -> Result<Self> {
        let pp = Preprocessing {
            height: crop,
            width: crop,
            shortest_edge: Some(resize),
            ..Self::vit_msn_default()
        };
        pp.check_crop()?;
        Ok(pp)
    }

    /// The torchvision form's own rule: a crop inside the resized image
    /// (torchvision would pad a larger one with zeros).
    fn check_crop(&self) -> Result<()> {
        let Some(edge) = self.shortest_edge else {
            return Ok(());
        };
        if !(1..=MAX_TARGET_SIDE).contains(&edge) {
            return Err(config_error(
                "resize",
                format!("expected an integer in 1..={MAX_TARGET_SIDE}, got {edge}"),
            ));
        }
        if !self.do_resize {
            return Err(config_error("do_resize", "must be true with `resize`"));
        }
        if self.height > edge || self.width > edge {
            return Err(config_error(
                "crop_size",
                format!(
                    "{}x{} does not fit inside the shorter side resized to {edge}",
                    self.height, self.width
                ),
            ));
        }
        Ok(())
    }

    /// Reads a `preprocessor_config.json`. Keys it lacks (or that are null,
    /// for `size`, `image_mean`, `image_std`) take ViTImageProcessor's
    /// defaults, which differ from [`Preprocessing::vit_msn_default`] in the
    /// mean and std (0.5). `size` may be `{"height", "width"}`, an integer or
    /// `[height, width]`. A processor type other than ViT is refused, but
    /// for the torchvision form that [`Preprocessing::to_json`] writes for
    /// [`Preprocessing::shortest_edge`].
    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| config_error("", "expected a JSON object"))?;
        let mut torchvision = false;
        for key in ["image_processor_type", "feature_extractor_type"] {
            if let Some(t) = obj.get(key) {
                let name = t
                    .as_str()
                    .ok_or_else(|| config_error(key, "expected a string"))?;
                if key == "image_processor_type" && name == TORCHVISION {
                    torchvision = true;
                    continue;
                }
                if !name.starts_with("ViT") || name.contains("Hybrid") {
                    return Err(config_error(
                        key,
                        format!("`{name}` is not supported (only ViTImageProcessor / ViTFeatureExtractor)"),
                    ));
                }
            }
        }
        if torchvision {
            return Self::from_torchvision_json(obj);
        }
        let (height, width) = parse_size(obj.get("size"))?;
        let resample = parse_resample(obj)?;
        let rescale_factor = parse_rescale_factor(obj)?;
        let pp = Preprocessing {
            do_resize: get_bool(obj, "do_resize")?,
            height,
            width,
            resample,
            do_rescale: get_bool(obj, "do_rescale")?,
            rescale_factor,
            do_normalize: get_bool(obj, "do_normalize")?,
            image_mean: get_stats(obj, "image_mean", &IMAGENET_STANDARD_MEAN)?,
            image_std: get_stats(obj, "image_std", &IMAGENET_STANDARD_STD)?,
            shortest_edge: None,
        };
        pp.check_std()?;
        Ok(pp)
    }

    /// The torchvision form ([`Preprocessing::to_json`] writes it for
    /// `shortest_edge`): `resize` (an integer), `crop_size` (as ViT's
    /// `size`), and ViT's other keys, the mean and std defaulting to
    /// ImageNet's (MSN's).
    fn from_torchvision_json(obj: &Map<String, Value>) -> Result<Self> {
        if obj.contains_key("size") {
            return Err(config_error(
                "size",
                "the torchvision form takes `resize` and `crop_size`, not `size`",
            ));
        }
        let edge = match obj.get("resize") {
            Some(v) => parse_side(v, "resize")?,
            None => {
                return Err(config_error(
                    "resize",
                    "is missing (the shorter side's size)",
                ))
            }
        };
        let (height, width) = match obj.get("crop_size") {
            Some(v) => parse_size(Some(v)).map_err(|_| {
                config_error(
                    "crop_size",
                    format!("expected {{\"height\": h, \"width\": w}}, an integer or [h, w] in 1..={MAX_TARGET_SIDE}, got {v}"),
                )
            })?,
            None => return Err(config_error("crop_size", "is missing")),
        };
        let pp = Preprocessing {
            do_resize: get_bool(obj, "do_resize")?,
            height,
            width,
            resample: parse_resample(obj)?,
            do_rescale: get_bool(obj, "do_rescale")?,
            rescale_factor: parse_rescale_factor(obj)?,
            do_normalize: get_bool(obj, "do_normalize")?,
            image_mean: get_stats(obj, "image_mean", &IMAGENET_DEFAULT_MEAN)?,
            image_std: get_stats(obj, "image_std", &IMAGENET_DEFAULT_STD)?,
            shortest_edge: Some(edge),
        };
        pp.check_std()?;
        pp.check_crop()?;
        Ok(pp)
    }

    fn check_std(&self) -> Result<()> {
        if let Some(i) = self.image_std.iter().position(|&s| s == 0.0) {
            return Err(config_error("image_std", format!("element {i} is 0")));
        }
        Ok(())
    }
}

fn parse_resample(obj: &Map<String, Value>) -> Result<u32> {
    Ok(match obj.get("resample") {
        None => 2,
        Some(r) => {
            let code = r.as_u64().ok_or_else(|| {
                config_error(
                    "resample",
                    format!("expected a PIL filter code 0..=5, got {r}"),
                )
            })?;
            if code > 5 {
                return Err(config_error(
                        "resample",
                        format!("unknown PIL filter code {code} (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"),
                    ));
            }
            code as u32
        }
    })
}

fn parse_rescale_factor(obj: &Map<String, Value>) -> Result<f64> {
    Ok(match obj.get("rescale_factor") {
        None => 1.0 / 255.0,
        Some(r) => match r.as_f64() {
            Some(f) if f.is_finite() => f,
            _ => {
                return Err(config_error(
                    "rescale_factor",
                    format!("expected a finite number, got {r}"),
                ))
            }
        },
    })
}

impl Preprocessing {
    /// The config as `save_pretrained` writes it (the torchvision form with
    /// `shortest_edge`); [`Preprocessing::from_json`] reads it back unchanged.
    pub fn to_json(&self) -> Value {
        if let Some(edge) = self.shortest_edge {
            return json!({
                "image_processor_type": TORCHVISION,
                "do_resize": self.do_resize,
                "resize": edge,
                "crop_size": {"height": self.height, "width": self.width},
                "resample": self.resample,
                "do_rescale": self.do_rescale,
                "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize,
                "image_mean": self.image_mean,
                "image_std": self.image_std,
            });
        }
        json!({
            "image_processor_type": "ViTImageProcessor",
            "do_resize": self.do_resize,
            "size": {"height": self.height, "width": self.width},
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        })
    }

    /// The (channels, height, width) that `preprocess_image` returns for an
    /// image of `width`×`height`.
    pub fn output_size(&self, channels: i64, width: u32, height: u32) -> (i64, i64, i64) {
        if self.do_resize {
            (channels, i64::from(self.height), i64::from(self.width))
        } else {
            (channels, i64::from(height), i64::from(width))
        }
    }
}

fn config_error(field: &str, message: impl std::fmt::Display) -> Error {
    let message = if field.is_empty() {
        message.to_string()
    } else {
        format!("`{field}`: {message}")
    };
    Error::File {
        path: "preprocessor_config.json".into(),
        message,
    }
}

fn get_bool(obj: &Map<String, Value>, key: &str) -> Result<bool> {
    match obj.get(key) {
        None => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(config_error(
            key,
            format!("expected true or false, got {other}"),
        )),
    }
}

fn get_stats(obj: &Map<String, Value>, key: &str, default: &[f64]) -> Result<Vec<f64>> {
    let finite = |v: &Value| v.as_f64().filter(|f| f.is_finite());
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default.to_vec()),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(config_error(key, "is an empty list"));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    finite(v).ok_or_else(|| {
                        config_error(key, format!("element {i} is not a finite number: {v}"))
                    })
                })
                .collect()
        }
        Some(v) => finite(v).map(|f| vec![f]).ok_or_else(|| {
            config_error(
                key,
                format!("expected a number or a list of numbers, got {v}"),
            )
        }),
    }
}

fn parse_side(v: &Value, field: &str) -> Result<u32> {
    match v.as_u64() {
        Some(n) if n >= 1 && n <= u64::from(MAX_TARGET_SIDE) => Ok(n as u32),
        _ => Err(config_error(
            field,
            format!("expected an integer in 1..={MAX_TARGET_SIDE}, got {v}"),
        )),
    }
}

fn parse_size(v: Option<&Value>) -> Result<(u32, u32)> {
    match v {
        None | Some(Value::Null) => Ok((224, 224)),
        Some(Value::Object(m)) => {
            let side = |k: &str| -> Result<u32> {
                let v = m.get(k).ok_or_else(|| {
                    let keys: Vec<&str> = m.keys().map(String::as_str).collect();
                    config_error(
                        "size",
                        format!("must have `height` and `width` (ViTImageProcessor resizes to a fixed size), got keys {keys:?}"),
                    )
                })?;
                parse_side(v, &format!("size.{k}"))
            };
            Ok((side("height")?, side("width")?))
        }
        Some(Value::Array(a)) if a.len() == 2 => {
            Ok((parse_side(&a[0], "size[0]")?, parse_side(&a[1], "size[1]")?))
        }
        Some(n @ Value::Number(_)) => {
            let s = parse_side(n, "size")?;
            Ok((s, s))
        }
        Some(other) => Err(config_error(
            "size",
            format!("expected {{\"height\": h, \"width\": w}}, an integer or [h, w], got {other}"),
        )),
    }
}

/// A decoded image: 8-bit RGB (3 channels) or L (1 channel), row-major,
/// channels interleaved.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedImage {
    width: u32,
    height: u32,
    channels: u8,
    pixels: Vec<u8>,
    source: String,
}

impl DecodedImage {
    /// An image from raw interleaved pixels; `source` names it in errors.
    pub fn from_raw(
        width: u32,
        height: u32,
        channels: u8,
        pixels: Vec<u8>,
        source: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let fail = |message: String| Error::Image {
            path: source.clone(),
            message,
        };
        if channels != 1 && channels != 3 {
            return Err(fail(format!(
                "{channels} channels; expected 1 (L) or 3 (RGB)"
            )));
        }
        if width == 0 || height == 0 {
            return Err(fail(format!("image is empty ({width}×{height} pixels)")));
        }
        let expected = (width as usize)
            .checked_mul(height as usize)
            .and_then(|n| n.checked_mul(channels as usize));
        if expected != Some(pixels.len()) {
            return Err(fail(format!(
                "{} bytes of pixels for {width}×{height}×{channels}",
                pixels.len()
            )));
        }
        Ok(DecodedImage {
            width,
            height,
            channels,
            pixels,
            source,
        })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// 1 (L) or 3 (RGB).
    pub fn channels(&self) -> u8 {
        self.channels
    }

    /// Interleaved pixels, `height × width × channels` bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// The file (or label) the image came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The image resized to `width`×`height` with PIL filter `resample`, as
    /// Pillow's `Image.resize` computes it for an 8-bit image.
    pub fn resize(&self, width: u32, height: u32, resample: u32) -> Result<DecodedImage> {
        if width == 0 || height == 0 {
            return Err(self.error(format!("cannot resize to {width}×{height}")));
        }
        let pixels = if width == self.width && height == self.height {
            self.pixels.clone()
        } else if resample == 0 {
            resize_nearest(self, width, height)
        } else {
            let filter = Filter::from_code(resample)
                .ok_or_else(|| self.error(format!("unknown PIL resample filter {resample}")))?;
            resize_separable(self, width, height, filter)
        };
        Ok(DecodedImage {
            width,
            height,
            channels: self.channels,
            pixels,
            source: self.source.clone(),
        })
    }

    /// The centre `width`×`height` of the image, as torchvision's
    /// `CenterCrop` places it (offsets rounded half to even, as Python's
    /// `round`); a crop larger than the image is an error.
    pub fn center_crop(&self, width: u32, height: u32) -> Result<DecodedImage> {
        if width == 0 || height == 0 || width > self.width || height > self.height {
            return Err(self.error(format!(
                "cannot cut {width}×{height} out of {}×{}",
                self.width, self.height
            )));
        }
        let offset =
            |size: u32, crop: u32| (f64::from(size - crop) / 2.0).round_ties_even() as usize;
        let (left, top) = (offset(self.width, width), offset(self.height, height));
        let c = self.channels as usize;
        let row = self.width as usize * c;
        let mut pixels = Vec::with_capacity(width as usize * height as usize * c);
        for y in top..top + height as usize {
            let start = y * row + left * c;
            pixels.extend_from_slice(&self.pixels[start..start + width as usize * c]);
        }
        Ok(DecodedImage {
            width,
            height,
            channels: self.channels,
            pixels,
            source: self.source.clone(),
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Image {
            path: self.source.clone(),
            message: message.into(),
        }
    }
}

/// True when the path's extension is one of [`IMAGE_EXTENSIONS`].
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
        .unwrap_or(false)
}

fn image_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Image {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Decodes an image file into 8-bit RGB (`num_channels` 3) or L (1), exactly
/// as Pillow's `Image.open(path).convert("RGB")` / `.convert("L")`.
pub fn load_image(path: &Path, num_channels: i64) -> Result<DecodedImage> {
    if num_channels != 1 && num_channels != 3 {
        return Err(image_error(
            path,
            format!("the model takes {num_channels} channels; images can feed 1 (L) or 3 (RGB)"),
        ));
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| image_error(path, format!("cannot read image: {e}")))?;
    if meta.is_dir() {
        return Err(image_error(path, "is a directory, not an image"));
    }
    if !meta.is_file() {
        // A FIFO or a device would block the read, or never end it.
        return Err(image_error(path, "not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(image_error(
            path,
            format!(
                "file is {} bytes; images over {MAX_FILE_BYTES} bytes are refused",
                meta.len()
            ),
        ));
    }
    let bytes =
        std::fs::read(path).map_err(|e| image_error(path, format!("cannot read image: {e}")))?;
    decode_bytes(&bytes, path, num_channels)
}

/// Which 8-bit mode Pillow reads a file into, as far as it matters here.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Base {
    Gray,
    Rgb,
}

/// Decodes an image held in memory, as `load_image` does a file; `path` names
/// it in errors.
pub fn decode_bytes(bytes: &[u8], path: &Path, num_channels: i64) -> Result<DecodedImage> {
    if bytes.is_empty() {
        return Err(image_error(path, "file is empty, not an image"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_error(path, format!("cannot read image: {e}")))?;
    let format = match reader.format() {
        Some(
            f @ (ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Bmp
            | ImageFormat::Gif
            | ImageFormat::Tiff),
        ) => f,
        Some(f) => {
            return Err(image_error(
                path,
                format!("{f:?} images are not supported (JPEG, PNG, WebP, BMP, GIF or TIFF)"),
            ))
        }
        None => {
            return Err(image_error(
                path,
                "not a recognised image (expected JPEG, PNG, WebP, BMP, GIF or TIFF)",
            ))
        }
    };
    // No per-side limit (Pillow has none): the pixel count is checked from
    // the header below; the allocation limit guards what the decoders do.
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODER_ALLOC);
    reader.limits(limits);
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes).map_err(|m| image_error(path, m))?;
    }
    let png = (format == ImageFormat::Png)
        .then(|| png_header(bytes))
        .flatten();
    if let Some(ihdr) = png {
        if ihdr.width == 0 || ihdr.height == 0 {
            return Err(image_error(
                path,
                format!("image is empty ({}×{} pixels)", ihdr.width, ihdr.height),
            ));
        }
        // Before the png crate sees the header at all.
        if let Some(m) = max_pixels_error(ihdr.width, ihdr.height) {
            return Err(image_error(path, m));
        }
    }
    let decoder = reader
        .into_decoder()
        .map_err(|e| image_error(path, describe(format, &e)))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(image_error(
            path,
            format!("image is empty ({w}×{h} pixels)"),
        ));
    }
    // The decoders have read only the header so far.
    if let Some(m) = max_pixels_error(w, h) {
        return Err(image_error(path, m));
    }
    if decoder.total_bytes() > MAX_DECODER_ALLOC {
        return Err(image_error(
            path,
            format!(
                "refusing to decode: {w}×{h} {:?} needs {} MiB (limit {} MiB)",
                decoder.color_type(),
                decoder.total_bytes() >> 20,
                MAX_DECODER_ALLOC >> 20
            ),
        ));
    }
    let (base, pixels) = if format == ImageFormat::Jpeg {
        drop(decoder);
        decode_jpeg_libjpeg(bytes, (w, h)).map_err(|m| image_error(path, m))?
    } else {
        let img = DynamicImage::from_decoder(decoder)
            .map_err(|e| image_error(path, describe(format, &e)))?;
        to_pil_8bit(img, png.map(|h| h.color_type)).map_err(|m| image_error(path, m))?
    };
    let (w, h) = (pixels.1, pixels.2);
    let data = match (base, num_channels) {
        (Base::Gray, 1) | (Base::Rgb, 3) => pixels.0,
        (Base::Gray, _) => pixels.0.iter().flat_map(|&v| [v, v, v]).collect(),
        (Base::Rgb, _) => pixels.0.chunks_exact(3).map(luminance).collect(),
    };
    DecodedImage::from_raw(w, h, num_channels as u8, data, path.display().to_string())
}

/// The fields of a PNG's IHDR chunk that matter here.
#[derive(Debug, Clone, Copy)]
struct PngHeader {
    width: u32,
    height: u32,
    color_type: u8,
}

fn png_header(bytes: &[u8]) -> Option<PngHeader> {
    let be = |i: usize| -> Option<u32> {
        Some(u32::from_be_bytes(bytes.get(i..i + 4)?.try_into().ok()?))
    };
    (bytes.get(12..16)? == b"IHDR").then_some(())?;
    Some(PngHeader {
        width: be(16)?,
        height: be(20)?,
        color_type: *bytes.get(25)?,
    })
}

/// Pillow's decompression-bomb rule (`Image._decompression_bomb_check`):
/// more than `2 * MAX_IMAGE_PIXELS` pixels is refused, in its words.
fn max_pixels_error(width: u32, height: u32) -> Option<String> {
    let pixels = u64::from(width.max(1)) * u64::from(height.max(1));
    let limit = 2 * MAX_IMAGE_PIXELS;
    (pixels > limit).then(|| {
        format!(
            "refusing to decode a {width}×{height} image: {pixels} pixels exceeds the limit of {limit} pixels (Pillow's decompression-bomb limit)"
        )
    })
}

fn describe(format: ImageFormat, e: &ImageError) -> String {
    let name = format!("{format:?}").to_uppercase();
    match e {
        ImageError::Limits(l) => format!(
            "refusing to decode: {l} (limit: {} MiB of decoder allocations)",
            MAX_DECODER_ALLOC >> 20
        ),
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("cannot decode {name}: the file is truncated ({io})")
        }
        ImageError::Unsupported(u) => format!("cannot decode {name}: unsupported: {u}"),
        other => format!("cannot decode {name} (corrupt or truncated file?): {other}"),
    }
}

/// Pillow refuses a JPEG whose entropy-coded data stops early ("image file
/// is truncated"); libjpeg only warns and pads such a file with grey. A complete JPEG
/// has its EOI marker (FF D9) after its last start-of-scan (FF DA); inside
/// scan data a 0xFF is always followed by 0x00 or a restart marker.
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    let last = |marker: u8| {
        bytes
            .windows(2)
            .rposition(|w| w[0] == 0xFF && w[1] == marker)
    };
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) if eoi > sos => Ok(()),
        (None, _) => Err("cannot decode JPEG: no image data (start of scan missing; truncated file?)".into()),
        _ => Err("cannot decode JPEG: the file is truncated (no end-of-image marker after the last scan)".into()),
    }
}

/// Decodes a JPEG exactly as Pillow does: with libjpeg-turbo's code (as
/// bundled by mozjpeg, built without SIMD, whose output is bit-identical) at
/// its defaults (`JDCT_ISLOW`, fancy upsampling). Grey stays grey, other
/// 3-channel images convert to RGB in libjpeg, and CMYK/YCCK images are read
/// as Adobe-inverted CMYK and converted to RGB as Pillow's `cmyk2rgb` does.
/// `expected` is the size the header check already accepted.
fn decode_jpeg_libjpeg(
    bytes: &[u8],
    expected: (u32, u32),
) -> std::result::Result<(Base, Pixels), String> {
    use mozjpeg::{ColorSpace, ColorSpaceExt, Decompress};
    let run = || -> std::io::Result<(Base, Vec<u8>, usize, usize)> {
        let dec = Decompress::new_mem(bytes)?;
        let (w, h) = dec.size();
        if (w, h) != (expected.0 as usize, expected.1 as usize) {
            return Err(std::io::Error::other(format!(
                "header says {w}×{h}, expected {}×{}",
                expected.0, expected.1
            )));
        }
        let (base, out) = match dec.color_space() {
            ColorSpace::JCS_GRAYSCALE => (Base::Gray, ColorSpace::JCS_GRAYSCALE),
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => (Base::Rgb, ColorSpace::JCS_CMYK),
            _ => (Base::Rgb, ColorSpace::JCS_RGB),
        };
        let mut started = dec.to_colorspace(out)?;
        let data: Vec<u8> = started.read_scanlines()?;
        let channels = started.color_space().num_components();
        started.finish()?;
        if data.len() != w * h * channels {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let data = if out == ColorSpace::JCS_CMYK {
            data.chunks_exact(4)
                .flat_map(cmyk_inverted_to_rgb)
                .collect()
        } else {
            data
        };
        Ok((base, data, w, h))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok((base, data, w, h))) => Ok((base, (data, w as u32, h as u32))),
        Ok(Err(e)) => Err(format!(
            "cannot decode JPEG (corrupt or truncated file?): {e}"
        )),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into());
            Err(format!(
                "cannot decode JPEG (corrupt or truncated file?): {msg}"
            ))
        }
    }
}

/// Pillow's JPEG `CMYK;I` unpacking followed by `cmyk2rgb` (Convert.c).
fn cmyk_inverted_to_rgb(raw: &[u8]) -> [u8; 3] {
    let nk = i32::from(raw[3]); // 255 − (255 − raw k)
    let channel = |v: u8| {
        let c = 255 - i32::from(v);
        let t = c * nk + 128;
        let m = ((t >> 8) + t) >> 8;
        (nk - m).clamp(0, 255) as u8
    };
    [channel(raw[0]), channel(raw[1]), channel(raw[2])]
}

/// ITU-R 601-2 luma as Pillow computes it (`L24` in Convert.c).
fn luminance(rgb: &[u8]) -> u8 {
    let l =
        u32::from(rgb[0]) * 19595 + u32::from(rgb[1]) * 38470 + u32::from(rgb[2]) * 7471 + 0x8000;
    (l >> 16) as u8
}

type Pixels = (Vec<u8>, u32, u32);

/// Pillow's 8-bit view of a decoded image: grey ("L", "LA" without alpha,
/// "I;16" clamped, "1") or RGB ("RGB", "RGBA" without alpha, "P" expanded).
fn to_pil_8bit(
    img: DynamicImage,
    png_color_type: Option<u8>,
) -> std::result::Result<(Base, Pixels), String> {
    let (w, h) = (img.width(), img.height());
    let clamp16 = |v: u16| v.min(255) as u8;
    let high = |v: u16| (v >> 8) as u8;
    Ok(match img {
        DynamicImage::ImageLuma8(b) => (Base::Gray, (b.into_raw(), w, h)),
        DynamicImage::ImageLumaA8(b) => (
            Base::Gray,
            (b.into_raw().chunks_exact(2).map(|p| p[0]).collect(), w, h),
        ),
        DynamicImage::ImageRgb8(b) => (Base::Rgb, (b.into_raw(), w, h)),
        DynamicImage::ImageRgba8(b) => (
            Base::Rgb,
            (
                b.into_raw()
                    .chunks_exact(4)
                    .flat_map(|p| [p[0], p[1], p[2]])
                    .collect(),
                w,
                h,
            ),
        ),
        // Pillow reads 16-bit grey as "I;16" and converts it to 8 bits by
        // clamping at 255, even when a tRNS chunk made it grey+alpha here.
        DynamicImage::ImageLuma16(b) => (
            Base::Gray,
            (b.into_raw().into_iter().map(clamp16).collect(), w, h),
        ),
        DynamicImage::ImageLumaA16(b) => {
            // A PNG of colour type 4 (grey+alpha) Pillow reads as "LA;16B":
            // high bytes. Colour type 0 with tRNS stays "I;16": clamped.
            let f = if png_color_type == Some(0) {
                clamp16
            } else {
                high
            };
            (
                Base::Gray,
                (
                    b.into_raw().chunks_exact(2).map(|p| f(p[0])).collect(),
                    w,
                    h,
                ),
            )
        }
        DynamicImage::ImageRgb16(b) => (
            Base::Rgb,
            (b.into_raw().into_iter().map(high).collect(), w, h),
        ),
        DynamicImage::ImageRgba16(b) => (
            Base::Rgb,
            (
                b.into_raw()
                    .chunks_exact(4)
                    .flat_map(|p| [high(p[0]), high(p[1]), high(p[2])])
                    .collect(),
                w,
                h,
            ),
        ),
        other => {
            return Err(format!(
                "unsupported pixel format {:?} (floating-point images are not supported)",
                other.color()
            ))
        }
    })
}

/// Pillow's resampling filters (`Resample.c`), by PIL code.
#[derive(Debug, Clone, Copy)]
enum Filter {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    fn from_code(code: u32) -> Option<Filter> {
        Some(match code {
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // The constants are C `float` literals (0.54f, 0.46f).
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point bits of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output pixel's window: first input index, and a fixed-point weight
/// per input pixel from there.
struct Window {
    start: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
fn coefficients(in_size: u32, out_size: u32, filter: Filter) -> Vec<Window> {
    // The box is kept as C floats: (float)in_size - 0.0f, then widened.
    let scale = f64::from(in_size as f32) / f64::from(out_size);
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (f64::from(xx) + 0.5) * scale;
            // C `(int)` truncates toward zero before the clamp.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let raw: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter.eval((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 {
                        (-0.5 + scaled) as i32
                    } else {
                        (0.5 + scaled) as i32
                    }
                })
                .collect();
            Window {
                start: xmin as usize,
                weights,
            }
        })
        .collect()
}

/// Rounds and clamps a fixed-point sum to 8 bits (Pillow's `clip8`).
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `ImagingResample` for 8-bit images: two separable passes, each
/// rounding to 8 bits, a pass skipped when its size does not change.
/// Pillow 13 runs the vertical pass first when the height shrinks by more
/// than twice as many pixels as the width (`ImagingResampleInner`), else the
/// horizontal pass first; the order changes the rounding, so it is kept.
fn resize_separable(img: &DecodedImage, out_w: u32, out_h: u32, filter: Filter) -> Vec<u8> {
    let c = img.channels as usize;
    let (in_w, in_h) = (i64::from(img.width), i64::from(img.height));
    let vertical_first =
        i64::from(out_h) < in_h && in_h - i64::from(out_h) > 2 * (in_w - i64::from(out_w));
    let horiz = (out_w != img.width).then(|| coefficients(img.width, out_w, filter));
    let vert = (out_h != img.height).then(|| coefficients(img.height, out_h, filter));
    let (w, h) = (img.width as usize, img.height as usize);
    match (horiz, vert) {
        (None, None) => img.pixels.clone(),
        (Some(hz), None) => pass_horizontal(&img.pixels, w, c, &hz),
        (None, Some(vt)) => pass_vertical(&img.pixels, w * c, 0, &vt),
        (Some(hz), Some(vt)) if vertical_first => {
            pass_horizontal(&pass_vertical(&img.pixels, w * c, 0, &vt), w, c, &hz)
        }
        (Some(hz), Some(vt)) => {
            // Only the rows the vertical pass reads go through the horizontal one.
            let first = vt.first().map(|v| v.start).unwrap_or(0);
            let last = vt
                .last()
                .map(|v| v.start + v.weights.len())
                .unwrap_or(h)
                .max(first);
            let rows = &img.pixels[first * w * c..last * w * c];
            pass_vertical(
                &pass_horizontal(rows, w, c, &hz),
                out_w as usize * c,
                first,
                &vt,
            )
        }
    }
}

/// Resamples every row of `src` (rows of `w` pixels of `c` channels).
fn pass_horizontal(src: &[u8], w: usize, c: usize, windows: &[Window]) -> Vec<u8> {
    let round = 1i32 << (PRECISION_BITS - 1);
    let ow = windows.len();
    let mut out = vec![0u8; src.len() / (w * c) * ow * c];
    for (row, dst) in src.chunks_exact(w * c).zip(out.chunks_exact_mut(ow * c)) {
        for (win, px) in windows.iter().zip(dst.chunks_exact_mut(c)) {
            let taps = &row[win.start * c..(win.start + win.weights.len()) * c];
            for (ch, o) in px.iter_mut().enumerate() {
                let mut acc = round;
                for (&k, p) in win.weights.iter().zip(taps.chunks_exact(c)) {
                    acc += i32::from(p[ch]) * k;
                }
                *o = clip8(acc);
            }
        }
    }
    out
}

/// Resamples columns: output row `i` mixes rows `windows[i].start - offset ..`
/// of `src` (rows of `stride` bytes).
fn pass_vertical(src: &[u8], stride: usize, offset: usize, windows: &[Window]) -> Vec<u8> {
    let round = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; windows.len() * stride];
    for (win, dst) in windows.iter().zip(out.chunks_exact_mut(stride)) {
        let base = (win.start - offset) * stride;
        for (x, o) in dst.iter_mut().enumerate() {
            let mut acc = round;
            for (i, &k) in win.weights.iter().enumerate() {
                acc += i32::from(src[base + i * stride + x]) * k;
            }
            *o = clip8(acc);
        }
    }
    out
}

/// Source index per output index for Pillow's nearest-neighbour scale
/// (`ImagingScaleAffine`): the position advances by repeated addition.
fn nearest_indices(in_size: u32, out_size: u32) -> Vec<Option<usize>> {
    let step = f64::from(in_size as f32) / f64::from(out_size);
    let mut pos = step * 0.5;
    (0..out_size)
        .map(|_| {
            let i = if pos < 0.0 { -1 } else { pos as i64 };
            pos += step;
            (i >= 0 && i < i64::from(in_size)).then_some(i as usize)
        })
        .collect()
}

fn resize_nearest(img: &DecodedImage, out_w: u32, out_h: u32) -> Vec<u8> {
    let c = img.channels as usize;
    let xs = nearest_indices(img.width, out_w);
    let ys = nearest_indices(img.height, out_h);
    let mut out = vec![0u8; out_w as usize * out_h as usize * c];
    for (y, dst) in ys.iter().zip(out.chunks_exact_mut(out_w as usize * c)) {
        let Some(y) = *y else { continue };
        let src = &img.pixels[y * img.width as usize * c..(y + 1) * img.width as usize * c];
        for (x, px) in xs.iter().zip(dst.chunks_exact_mut(c)) {
            if let Some(x) = *x {
                px.copy_from_slice(&src[x * c..(x + 1) * c]);
            }
        }
    }
    out
}

/// The (width, height) torchvision's `Resize(edge)` gives the image: the
/// shorter side `edge`, the longer `int(edge * long / short)`. A size whose
/// pixels would be more than Pillow decodes (a very long strip) is refused.
fn shortest_edge_size(img: &DecodedImage, edge: u32) -> Result<(u32, u32)> {
    let (w, h) = (img.width, img.height);
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    // Python's float arithmetic: the product is exact, the division rounded once.
    let new_long = (f64::from(edge) * f64::from(long) / f64::from(short)).trunc();
    if new_long * f64::from(edge) > 2.0 * MAX_IMAGE_PIXELS as f64 {
        return Err(img.error(format!(
            "resizing its shorter side to {edge} makes the longer {new_long} pixels, over the limit of {} pixels",
            2 * MAX_IMAGE_PIXELS
        )));
    }
    let new_long = new_long as u32;
    Ok(if w <= h {
        (edge, new_long)
    } else {
        (new_long, edge)
    })
}

/// `pixel_values` (C, H, W), f32, for one decoded image.
pub fn preprocess_image(img: &DecodedImage, pp: &Preprocessing) -> Result<Tensor> {
    let (values, [c, h, w]) = preprocess_image_values(img, pp)?;
    Tensor::f_from_slice(&values)
        .and_then(|t| t.f_reshape([c, h, w]))
        .map_err(|e| img.error(format!("cannot build pixel_values: {e}")))
}

/// [`preprocess_image`]'s values, row-major (C, H, W), and that shape,
/// without libtorch: a server builds its batch's tensor on one thread.
pub fn preprocess_image_values(
    img: &DecodedImage,
    pp: &Preprocessing,
) -> Result<(Vec<f32>, [i64; 3])> {
    let c = img.channels as usize;
    let stats = |v: &[f64], name: &str| -> Result<Vec<f32>> {
        match v.len() {
            1 => Ok(vec![v[0] as f32; c]),
            n if n == c => Ok(v.iter().map(|&x| x as f32).collect()),
            n => Err(img.error(format!(
                "{name} has {n} values for a {c}-channel image (model config num_channels = {c})"
            ))),
        }
    };
    let (mean, std) = if pp.do_normalize {
        (
            stats(&pp.image_mean, "image_mean")?,
            stats(&pp.image_std, "image_std")?,
        )
    } else {
        (vec![0.0; c], vec![1.0; c])
    };
    let resized;
    let img = if let (true, Some(edge)) = (pp.do_resize, pp.shortest_edge) {
        let (w, h) = shortest_edge_size(img, edge)?;
        resized = img
            .resize(w, h, pp.resample)?
            .center_crop(pp.width, pp.height)?;
        &resized
    } else if pp.do_resize {
        resized = img.resize(pp.width, pp.height, pp.resample)?;
        &resized
    } else {
        img
    };
    let (w, h) = (img.width as usize, img.height as usize);
    let mut out = vec![0f32; c * h * w];
    for (i, px) in img.pixels.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            // transformers: rescale in float64, cast to float32; normalize in float32.
            let mut x = if pp.do_rescale {
                (f64::from(v) * pp.rescale_factor) as f32
            } else {
                f32::from(v)
            };
            if pp.do_normalize {
                x = (x - mean[ch]) / std[ch];
            }
            out[ch * h * w + i] = x;
        }
    }
    Ok((out, [c as i64, h as i64, w as i64]))
}

/// [`load_image`] then [`preprocess_image`].
pub fn preprocess_path(path: &Path, pp: &Preprocessing, num_channels: i64) -> Result<Tensor> {
    preprocess_image(&load_image(path, num_channels)?, pp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luminance_matches_pillow_formula() {
        assert_eq!(luminance(&[255, 255, 255]), 255);
        assert_eq!(luminance(&[0, 0, 0]), 0);
        assert_eq!(luminance(&[255, 0, 0]), 76);
        assert_eq!(luminance(&[0, 255, 0]), 150);
        assert_eq!(luminance(&[0, 0, 255]), 29);
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(512, 224), (100, 224), (7, 3), (1, 5)] {
            for f in [
                Filter::Bilinear,
                Filter::Bicubic,
                Filter::Lanczos,
                Filter::Box,
                Filter::Hamming,
            ] {
                for w in coefficients(i, o, f) {
                    let s: i64 = w.weights.iter().map(|&k| i64::from(k)).sum();
                    assert!(
                        (s - (1 << PRECISION_BITS)).abs() <= w.weights.len() as i64,
                        "{i}->{o} {f:?}: {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn json_round_trip() {
        let pp = Preprocessing {
            height: 160,
            width: 192,
            resample: 3,
            ..Preprocessing::vit_msn_default()
        };
        assert_eq!(Preprocessing::from_json(&pp.to_json()).ok(), Some(pp));
        let msn = Preprocessing::msn_eval(256, 224).unwrap();
        assert_eq!(msn.to_json()["image_processor_type"], "torchvision");
        assert_eq!(Preprocessing::from_json(&msn.to_json()).ok(), Some(msn));
    }

    #[test]
    fn torchvision_form_refusals() {
        assert!(Preprocessing::msn_eval(200, 224).is_err());
        for bad in [
            json!({"image_processor_type": "torchvision", "crop_size": 224}),
            json!({"image_processor_type": "torchvision", "resize": 256}),
            json!({"image_processor_type": "torchvision", "resize": 256, "crop_size": 300}),
            json!({"image_processor_type": "torchvision", "resize": 256, "crop_size": 224, "size": 224}),
            json!({"image_processor_type": "torchvision", "resize": 256, "crop_size": 224, "do_resize": false}),
        ] {
            assert!(Preprocessing::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn center_crop_rounds_half_to_even_as_python() {
        // 7 columns, crop 4: offset round(1.5) = 2; 6 rows, crop 5: round(0.5) = 0.
        let px: Vec<u8> = (0..42).collect();
        let img = DecodedImage::from_raw(7, 6, 1, px, "t").unwrap();
        let c = img.center_crop(4, 5).unwrap();
        assert_eq!(&c.pixels()[..4], &[2, 3, 4, 5]);
        assert_eq!(c.pixels()[4], 9);
        assert!(img.center_crop(8, 1).is_err());
        // torchvision's Resize(4) of 7x6: the shorter side 6 -> 4, the longer int(4*7/6) = 4.
        assert_eq!(shortest_edge_size(&img, 4).unwrap(), (4, 4));
        assert_eq!(shortest_edge_size(&img, 12).unwrap(), (14, 12));
    }
}
