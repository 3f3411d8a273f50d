//! Building the model's optional inputs from what a person types, and finding
//! the images a command line names.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// A head mask from a spec of heads to remove: `LAYER:HEADS` groups joined
/// by `;`, where HEADS is a comma list of head indices or `*` for all, and
/// LAYER is an index or `*` for every layer. `"0:1,3;5:*"` removes heads 1 and
/// 3 of layer 0 and every head of layer 5. Returns (layers, heads) of 1s and 0s.
pub fn parse_head_mask(spec: &str, layers: i64, heads: i64) -> Result<Tensor> {
    let bad = |m: String| Error::input("head_mask", m);
    let mut mask = vec![1.0f32; (layers * heads) as usize];
    let index = |s: &str, limit: i64, what: &str| -> Result<Vec<i64>> {
        let s = s.trim();
        if s == "*" {
            return Ok((0..limit).collect());
        }
        s.split(',')
            .map(|p| {
                let p = p.trim();
                match p.parse::<i64>() {
                    Ok(i) if (0..limit).contains(&i) => Ok(i),
                    _ => Err(bad(format!("`{p}` is not a {what} index in 0..{limit}"))),
                }
            })
            .collect()
    };
    for group in spec.split(';').map(str::trim).filter(|g| !g.is_empty()) {
        let (layer, head_list) = group
            .split_once(':')
            .ok_or_else(|| bad(format!("`{group}` is not LAYER:HEADS (e.g. 0:1,3 or 5:*)")))?;
        for l in index(layer, layers, "layer")? {
            for h in index(head_list, heads, "head")? {
                mask[(l * heads + h) as usize] = 0.0;
            }
        }
    }
    Ok(Tensor::from_slice(&mask).view([layers, heads]))
}

/// Masks round(ratio · patches) patches of each image, chosen at random from
/// `seed`, so the same seed masks the same patches.
pub fn random_mask(batch: i64, patches: i64, ratio: f64, seed: u64) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(Error::input(
            "bool_masked_pos",
            format!("mask ratio {ratio} is not in [0, 1]"),
        ));
    }
    let count = (ratio * patches as f64).round() as i64;
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut mask = vec![false; (batch * patches) as usize];
    for b in 0..batch {
        // Partial Fisher–Yates with splitmix64: no dependence on libtorch's generator.
        let mut order: Vec<i64> = (0..patches).collect();
        for i in 0..count {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let j = i + (z % (patches - i) as u64) as i64;
            order.swap(i as usize, j as usize);
            mask[(b * patches + order[i as usize]) as usize] = true;
        }
    }
    Ok(Tensor::from_slice(&mask).view([batch, patches]))
}

/// The files named, with folders walked (sorted by name, recursively) for
/// image files. A folder with no images is an error.
pub fn collect_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let before = out.len();
            let root = path.canonicalize().map_err(|e| Error::io(path, e))?;
            walk(path, &root, &mut HashSet::new(), &mut out)?;
            if out.len() == before {
                return Err(Error::file(
                    path,
                    "the folder holds no images (jpg, png, webp, bmp, gif, tiff)",
                ));
            }
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

/// Follows symlinked folders, but never into one already walked or into an
/// ancestor of `root` (a `self -> .` or `up -> ..` link would never end).
fn walk(
    dir: &Path,
    root: &Path,
    seen: &mut HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let real = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if (real != root && root.starts_with(&real)) || !seen.insert(real) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, root, seen, out)?;
        } else if crate::image::is_image_path(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Writes a 2-D f32 tensor as a NumPy `.npy` file (format 1.0), atomically.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    let shape = t.size();
    let values =
        Vec::<f32>::try_from(t.flatten(0, -1)).map_err(|e| Error::file(path, e.to_string()))?;
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let dims = if dims.len() == 1 {
        format!("{},", dims[0])
    } else {
        dims.join(", ")
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + length (2) + header + newline, padded to 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    crate::fsutil::write_atomic(path, &bytes)
}
