//! Image preprocessing parity: `vit_msn::image` against transformers 4.46.3's
//! ViTImageProcessor on Pillow-decoded images (fixtures written by
//! tests/fixtures/make_image_fixtures.py), and every refusal.
//!
//! Run with `--nocapture` to see the measured differences per image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;
use tch::{Kind, Tensor};
use vit_msn::image::{
    is_image_path, load_image, preprocess_image, preprocess_path, DecodedImage, Preprocessing,
};
use vit_msn::tensors::read_safetensors;
use vit_msn::Error;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

static GENERATE: Mutex<()> = Mutex::new(());

/// The generated image fixtures; generated with the project's venv when
/// missing (`make fixtures` does the same), or a loud failure.
fn fixtures() -> PathBuf {
    let dir = std::env::var_os("VIT_MSN_IMAGE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("tests/fixtures/generated-images"));
    let _guard = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    if !dir.join("COMPLETE").exists() {
        let python = root().join(".venv/bin/python");
        let _ = std::fs::remove_dir_all(&dir);
        let status = Command::new(&python)
            .arg(root().join("tests/fixtures/make_image_fixtures.py"))
            .arg(&dir)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "image fixtures are missing from {} and {} cannot run (`make fixtures`): {e}",
                    dir.display(),
                    python.display()
                )
            });
        assert!(
            status.success(),
            "image fixture generation failed; run `make fixtures` (needs pillow and scikit-image in .venv)"
        );
        std::fs::write(dir.join("COMPLETE"), "").expect("write fixture stamp");
    }
    dir
}

fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

fn spec() -> (PathBuf, Value) {
    let dir = fixtures();
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("read cases.json");
    (dir, serde_json::from_str(&text).expect("parse cases.json"))
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    read_safetensors(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .collect()
}

/// The parity class of a fixture image, which sets its bound.
fn class(image: &Value) -> &'static str {
    let lossy = image["lossy"].as_bool().expect("lossy");
    match (image["format"].as_str().expect("format"), lossy) {
        ("JPEG", _) => "jpeg",
        ("WEBP", true) => "webp-lossy",
        _ => "lossless",
    }
}

/// (max, mean) |a − b| in f64.
fn diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs();
    (
        d.max().double_value(&[]),
        d.mean(Kind::Double).double_value(&[]),
    )
}

/// Bounds held per class, in 8-bit levels: (max, mean) |diff| of the
/// decoded pixels, and of pixel_values divided by the case's level (see
/// [`level`]; for the MSN config one level is at most 1/255/0.225 ≈ 0.0174).
struct Bound {
    decoded: (f64, f64),
    levels: (f64, f64),
}

fn bound(class: &str) -> Bound {
    match class {
        // PNG, BMP, GIF, TIFF, lossless WebP: the same pixels as Pillow, and
        // the same resize and float arithmetic as transformers: bit-exact.
        // Lossy WebP: image-webp decodes exactly as Pillow's libwebp here.
        "lossless" | "webp-lossy" => Bound {
            decoded: (0.0, 0.0),
            levels: (0.0, 0.0),
        },
        // JPEG is decoded with libjpeg-turbo's code (mozjpeg crate) at
        // Pillow's settings (ISLOW IDCT, fancy upsampling; CMYK via Pillow's
        // cmyk2rgb): bit-exact too.
        "jpeg" => Bound {
            decoded: (0.0, 0.0),
            levels: (0.0, 0.0),
        },
        other => panic!("unknown class {other}"),
    }
}

/// The value of one 8-bit level in a case's pixel_values (largest over channels).
fn level(pp: &Preprocessing) -> f64 {
    let scale = if pp.do_rescale {
        pp.rescale_factor.abs()
    } else {
        1.0
    };
    let min_std = if pp.do_normalize {
        pp.image_std
            .iter()
            .fold(f64::INFINITY, |m, s| m.min(s.abs()))
    } else {
        1.0
    };
    scale / min_std
}

#[test]
fn decoded_pixels_match_pillow() {
    let (dir, spec) = spec();
    let decoded = tensors(&dir.join("decoded.safetensors"));
    let mut worst: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    let mut failures = Vec::new();
    let images = spec["images"].as_array().expect("images");
    assert!(images.len() >= 40, "too few fixture images");
    for image in images {
        let name = image["name"].as_str().expect("name");
        let path = dir.join(image["file"].as_str().expect("file"));
        let class = class(image);
        for (channels, key) in [(3, "rgb"), (1, "l")] {
            let img = load_image(&path, channels).unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = Tensor::from_slice(img.pixels()).reshape([
                i64::from(img.height()),
                i64::from(img.width()),
                channels,
            ]);
            let want = &decoded[&format!("{name}:{key}")];
            let (max, mean) = diff(&got, want);
            eprintln!("decoded {name:32} {key:3} [{class:10}] max {max:5.1} mean {mean:.4} levels");
            let w = worst.entry(class).or_insert((0.0, 0.0));
            *w = (w.0.max(max), w.1.max(mean));
            let b = bound(class).decoded;
            if max > b.0 || mean > b.1 {
                failures.push(format!("{name}:{key} max {max} mean {mean} > {b:?}"));
            }
        }
    }
    eprintln!("decoded worst per class (max, mean levels): {worst:?}");
    assert!(
        failures.is_empty(),
        "decoded pixels out of bounds:\n{}",
        failures.join("\n")
    );
}

#[test]
fn pixel_values_match_transformers() {
    let (dir, spec) = spec();
    let images: BTreeMap<&str, &Value> = spec["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| (i["name"].as_str().expect("name"), i))
        .collect();
    let mut worst: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in spec["cases"].as_array().expect("cases") {
        let case_name = case["name"].as_str().expect("case name");
        let pp = Preprocessing::from_json(&case["config"])
            .unwrap_or_else(|e| panic!("{case_name}: {e}"));
        let saved =
            Preprocessing::from_json(&case["saved"]).unwrap_or_else(|e| panic!("{case_name}: {e}"));
        assert_eq!(pp, saved, "{case_name}: config and saved config differ");
        assert_eq!(
            Preprocessing::from_json(&pp.to_json()).ok(),
            Some(pp.clone()),
            "{case_name}: to_json"
        );
        let channels = case["num_channels"].as_i64().expect("num_channels");
        let reference = tensors(&dir.join(case["file"].as_str().expect("file")));
        let lvl = level(&pp);
        for name in case["images"].as_array().expect("images") {
            let name = name.as_str().expect("image name");
            let image = images[name];
            let path = dir.join(image["file"].as_str().expect("file"));
            let got = preprocess_path(&path, &pp, channels)
                .unwrap_or_else(|e| panic!("{case_name}/{name}: {e}"));
            assert_eq!(got.kind(), Kind::Float);
            let want = &reference[name];
            let (max, mean) = diff(&got, want);
            let class = class(image);
            eprintln!(
                "{case_name:22} {name:32} [{class:10}] max {max:.3e} mean {mean:.3e} ({:.2} / {:.4} levels)",
                max / lvl,
                mean / lvl
            );
            let w = worst
                .entry(format!("{case_name}/{class}"))
                .or_insert((0.0, 0.0));
            *w = (w.0.max(max), w.1.max(mean));
            let b = bound(class).levels;
            if max > b.0 * lvl * (1.0 + 1e-6) || mean > b.1 * lvl {
                failures.push(format!(
                    "{case_name}/{name}: max {max:e} mean {mean:e} > {b:?} levels of {lvl:e}"
                ));
            }
            checked += 1;
        }
    }
    for (k, (max, mean)) in &worst {
        eprintln!("pixel_values worst {k:36} max {max:.4e} mean {mean:.4e}");
    }
    assert!(checked >= 250, "only {checked} comparisons");
    assert!(
        failures.is_empty(),
        "pixel_values out of bounds:\n{}",
        failures.join("\n")
    );
}

#[test]
fn msn_default_is_the_saved_msn_config() {
    let (_, spec) = spec();
    let case = spec["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == "msn_default")
        .expect("msn_default case");
    assert_eq!(
        Preprocessing::from_json(&case["config"]).expect("msn config"),
        Preprocessing::vit_msn_default()
    );
}

#[test]
fn resize_is_bit_exact_with_pillow() {
    let (dir, spec) = spec();
    let reference = tensors(&dir.join("resize.safetensors"));
    let grid = spec["resize"].as_array().expect("resize grid");
    assert!(grid.len() >= 300, "resize grid too small");
    let mut failures = Vec::new();
    let mut loaded: BTreeMap<String, DecodedImage> = BTreeMap::new();
    for r in grid {
        let file = r["image"].as_str().expect("image");
        let want = &reference[r["key"].as_str().expect("key")];
        let channels = want.size()[2];
        let img = loaded.entry(file.to_string()).or_insert_with(|| {
            load_image(&dir.join(file), channels).unwrap_or_else(|e| panic!("{e}"))
        });
        let (w, h) = (
            r["width"].as_u64().expect("w") as u32,
            r["height"].as_u64().expect("h") as u32,
        );
        let resample = r["resample"].as_u64().expect("resample") as u32;
        let got = img.resize(w, h, resample).unwrap_or_else(|e| panic!("{e}"));
        let got = Tensor::from_slice(got.pixels()).reshape([i64::from(h), i64::from(w), channels]);
        let (max, mean) = diff(&got, want);
        if max != 0.0 {
            failures.push(format!("{}: max {max} mean {mean}", r["key"]));
        }
    }
    eprintln!(
        "resize grid: {} resizes, {} differ",
        grid.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "resize differs from Pillow:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------- refusals

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A PNG header claiming width×height, with one tiny stored-deflate IDAT:
/// a few bytes on disk however large the claim.
fn png_claiming(width: u32, height: u32, bit_depth: u8, color_type: u8) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    let raw = [0u8; 16];
    let mut z = vec![0x78, 0x01, 0x01];
    z.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    z.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
    z.extend_from_slice(&raw);
    z.extend_from_slice(&((raw.len() as u32) << 16 | 1).to_be_bytes()); // adler32 of zeros
    png_chunk(&mut out, b"IDAT", &z);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// The error for `path`, checked to be an `Error::Image` naming the file.
fn refused(path: &Path, channels: i64) -> String {
    let err = match load_image(path, channels) {
        Ok(img) => panic!(
            "{} was accepted ({}×{}), expected a refusal",
            path.display(),
            img.width(),
            img.height()
        ),
        Err(e) => e,
    };
    assert!(
        matches!(err, Error::Image { .. }),
        "not an image error: {err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name the file: {msg}"
    );
    let via_path = preprocess_path(path, &Preprocessing::vit_msn_default(), channels)
        .err()
        .map(|e| e.to_string());
    assert_eq!(via_path.as_deref(), Some(msg.as_str()));
    eprintln!("refused: {msg}");
    msg
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test file");
    path
}

/// Refused from the header, before decoding: the message is the pixel-limit
/// check's (a decoder running out of data would say "truncated" instead).
#[test]
fn refuses_decompression_bombs_before_decoding() {
    let dir = scratch("image-bombs");
    for (name, w, h, depth, ctype, needle) in [
        ("bomb_50000.png", 50000, 50000, 8, 2, "limit"),
        ("bomb_13400.png", 13400, 13400, 8, 0, "limit"),
        ("rgba16_16384.png", 16384, 16384, 16, 6, "limit"),
    ] {
        let path = write(&dir, name, &png_claiming(w, h, depth, ctype));
        assert!(std::fs::metadata(&path).expect("stat").len() < 200);
        let msg = refused(&path, 3);
        assert!(msg.to_lowercase().contains(needle), "{name}: {msg}");
    }
    // The same claim in other formats goes through the decoders' own limits.
    let gif: &[u8] = b"GIF89a\x50\xc3\x50\xc3\x80\x00\x00\x00\x00\x00\xff\xff\xff\
        \x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b";
    let mut bmp = b"BM".to_vec();
    for v in [58u32, 0, 54, 40, 50000, 50000] {
        bmp.extend_from_slice(&v.to_le_bytes());
    }
    bmp.extend_from_slice(&1u16.to_le_bytes());
    bmp.extend_from_slice(&24u16.to_le_bytes());
    bmp.extend_from_slice(&[0; 28]);
    for (name, bytes) in [("bomb_50000.gif", gif), ("bomb_50000.bmp", &bmp[..])] {
        let path = write(&dir, name, bytes);
        let msg = refused(&path, 3);
        assert!(msg.contains("limit"), "{name}: {msg}");
    }
}

#[test]
fn refuses_truncated_and_corrupt_files() {
    let (fixtures, _) = spec();
    let dir = scratch("image-truncated");
    for (src, keep) in [
        ("jpeg_astronaut_420.jpg", 0.6),
        ("jpeg_rocket_progressive.jpg", 0.5),
        ("jpeg_chelsea_444.jpeg", 0.05),
        ("png_coffee_rgb.png", 0.5),
        ("png_coffee_rgb.png", 0.02),
        ("png_camera_l.png", 0.9),
        ("webp_chelsea_lossy.webp", 0.5),
        ("webp_coffee_lossless.webp", 0.5),
        ("gif_chelsea.gif", 0.5),
        ("bmp_coffee_rgb.bmp", 0.5),
        ("tiff_rocket_rgb.tif", 0.5),
        ("tiff_coffee_lzw.tiff", 0.5),
    ] {
        let bytes = std::fs::read(fixtures.join("images").join(src)).expect("read fixture");
        let cut = ((bytes.len() as f64) * keep) as usize;
        let path = write(&dir, &format!("{keep}_{src}"), &bytes[..cut]);
        refused(&path, 3);
    }
    // Not images at all, or an image format outside the six.
    let text = write(&dir, "notes.jpg", b"this is not an image, just text\n");
    assert!(refused(&text, 3).contains("not a recognised image"));
    let empty = write(&dir, "empty.png", b"");
    assert!(refused(&empty, 3).contains("empty"));
    let pgm = write(&dir, "gray.png", b"P5 2 2 255\n\x00\x10\x20\x30");
    assert!(refused(&pgm, 1).contains("not supported"));
    // A PNG signature with garbage after it.
    let mut garbage = b"\x89PNG\r\n\x1a\n".to_vec();
    garbage.extend_from_slice(&[0x55; 64]);
    refused(&write(&dir, "garbage.png", &garbage), 3);
}

#[test]
fn refuses_zero_sized_images() {
    let dir = scratch("image-zero");
    refused(&write(&dir, "zero_w.png", &png_claiming(0, 10, 8, 2)), 3);
    refused(&write(&dir, "zero_h.png", &png_claiming(10, 0, 8, 0)), 1);
    // GIF89a with a 0×0 screen and a 0×0 frame.
    let gif: &[u8] = b"GIF89a\x00\x00\x00\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff\
        \x2c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x02\x44\x01\x00\x3b";
    refused(&write(&dir, "zero.gif", gif), 3);
    // BMP (BITMAPINFOHEADER, 24-bit) 0 pixels wide.
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&58u32.to_le_bytes());
    bmp.extend_from_slice(&[0, 0, 0, 0]);
    bmp.extend_from_slice(&54u32.to_le_bytes());
    bmp.extend_from_slice(&40u32.to_le_bytes());
    bmp.extend_from_slice(&0i32.to_le_bytes());
    bmp.extend_from_slice(&1i32.to_le_bytes());
    bmp.extend_from_slice(&1u16.to_le_bytes());
    bmp.extend_from_slice(&24u16.to_le_bytes());
    bmp.extend_from_slice(&[0; 24]);
    bmp.extend_from_slice(&[0; 4]);
    refused(&write(&dir, "zero.bmp", &bmp), 3);
}

#[test]
fn refuses_unreadable_paths_and_bad_channel_counts() {
    let dir = scratch("image-unreadable");
    let missing = dir.join("no-such-image.png");
    assert!(refused(&missing, 3).contains("cannot read"));
    assert!(refused(&dir, 3).contains("directory"));
    let photo = root().join("src/cli/demo_photos/chelsea.jpg");
    for channels in [0, 2, 4] {
        assert!(refused(&photo, channels).contains("channels"));
    }
}

#[test]
fn preprocess_checks_stats_against_channels() {
    let img = DecodedImage::from_raw(2, 2, 3, vec![7; 12], "<memory>").expect("raw image");
    let mut pp = Preprocessing::vit_msn_default();
    pp.image_mean = vec![0.5, 0.5];
    let err = preprocess_image(&img, &pp).expect_err("2 means for 3 channels");
    assert!(err.to_string().contains("image_mean"), "{err}");
    // A single value is used for every channel, as transformers does for a scalar.
    pp.image_mean = vec![0.5];
    let t = preprocess_image(&img, &pp).expect("scalar mean");
    assert_eq!(t.size(), [3, 224, 224]);
    assert!(DecodedImage::from_raw(2, 2, 3, vec![0; 11], "x").is_err());
    assert!(DecodedImage::from_raw(0, 2, 3, vec![], "x").is_err());
    assert!(DecodedImage::from_raw(1, 1, 2, vec![0; 2], "x").is_err());
}

#[test]
fn preprocessor_config_parsing() {
    let parse = |s: &str| Preprocessing::from_json(&serde_json::from_str(s).expect("json"));
    let d = parse("{}").expect("empty config");
    assert_eq!((d.height, d.width, d.resample), (224, 224, 2));
    assert_eq!(
        d.image_mean,
        vec![0.5; 3],
        "ViTImageProcessor's own default mean"
    );
    assert_eq!(
        parse(r#"{"size": 384}"#).map(|p| (p.height, p.width)).ok(),
        Some((384, 384))
    );
    assert_eq!(
        parse(r#"{"size": [160, 192]}"#)
            .map(|p| (p.height, p.width))
            .ok(),
        Some((160, 192))
    );
    assert_eq!(
        parse(r#"{"size": {"height": 160, "width": 192}}"#)
            .map(|p| (p.height, p.width))
            .ok(),
        Some((160, 192))
    );
    for (bad, field) in [
        (r#"{"size": {"shortest_edge": 224}}"#, "size"),
        (r#"{"size": 0}"#, "size"),
        (r#"{"size": "224"}"#, "size"),
        (r#"{"size": {"height": 224, "width": -1}}"#, "size.width"),
        (r#"{"resample": 9}"#, "resample"),
        (r#"{"resample": "bilinear"}"#, "resample"),
        (r#"{"do_resize": "yes"}"#, "do_resize"),
        (r#"{"rescale_factor": "x"}"#, "rescale_factor"),
        (r#"{"image_mean": []}"#, "image_mean"),
        (r#"{"image_mean": [0.5, "a", 0.5]}"#, "image_mean"),
        (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "image_std"),
        (
            r#"{"image_processor_type": "ConvNextImageProcessor"}"#,
            "image_processor_type",
        ),
        (r#"[1, 2]"#, "object"),
    ] {
        let err = parse(bad).expect_err(bad).to_string();
        assert!(err.contains(field), "{bad}: {err}");
    }
    let pp = Preprocessing::vit_msn_default();
    assert_eq!(Preprocessing::from_json(&pp.to_json()).ok(), Some(pp));
}

#[test]
fn image_paths_by_extension() {
    for yes in [
        "a.jpg",
        "b.JPEG",
        "c.png",
        "d.WebP",
        "e.bmp",
        "f.gif",
        "g.tif",
        "h.TIFF",
        "dir/x.y.png",
    ] {
        assert!(is_image_path(Path::new(yes)), "{yes}");
    }
    for no in [
        "a.txt",
        "b",
        "c.jpg.bak",
        "d.heic",
        "e.avif",
        ".png",
        "f.exr",
    ] {
        assert!(!is_image_path(Path::new(no)), "{no}");
    }
}

#[test]
fn committed_photos_are_small_and_decode() {
    let dir = root().join("src/cli/demo_photos");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("photos folder") {
        let path = entry.expect("entry").path();
        if !is_image_path(&path) {
            continue;
        }
        assert!(
            std::fs::metadata(&path).expect("stat").len() < 100_000,
            "{}",
            path.display()
        );
        let t = preprocess_path(&path, &Preprocessing::vit_msn_default(), 3)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.size(), [3, 224, 224]);
        n += 1;
    }
    assert!((4..=6).contains(&n), "{n} photos");
    assert!(dir.join("chelsea.jpg").is_file() && dir.join("coffee.jpg").is_file());
}
