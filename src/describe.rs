//! What a TorchScript file says about itself (forward schema, and the
//! description vit-msn stores inside its artifacts).

use std::ffi::{c_char, c_int, CString};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::artifact::{take_error, take_string};
use crate::error::{Error, Result};

pub use vit_msn_format::{ArtifactDescription, ARTIFACT_EXTRA_FILE};

extern "C" {
    fn vmsn_rt_describe(
        path: *const c_char,
        extra_name: *const c_char,
        schema: *mut *mut c_char,
        extra: *mut *mut c_char,
        err: *mut *mut c_char,
    ) -> c_int;
}

pub struct ModuleDescription {
    /// e.g. `forward(__torch__.VitMsn self, Tensor pixel_values, ...) -> Dict(str, Tensor)`.
    pub forward_schema: String,
    /// The artifact's own description, for files vit-msn wrote.
    pub vit_msn: Option<ArtifactDescription>,
}

/// A shim string, or "" for none.
fn take(s: *mut c_char) -> String {
    take_string(s).unwrap_or_default()
}

/// Loads the file on the CPU and reads its forward schema.
pub fn describe(path: &Path) -> Result<ModuleDescription> {
    // Not a FIFO or a folder: libtorch would block on one, or misreport it.
    crate::fsutil::check_regular_file(path)?;
    let bad = |m: String| Error::Artifact {
        path: path.display().to_string(),
        message: m,
    };
    let c_path = CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| bad("path contains NUL".into()))?;
    let c_extra = CString::new(ARTIFACT_EXTRA_FILE).map_err(|_| bad("bad extra name".into()))?;
    let (mut schema, mut extra, mut err) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    // SAFETY: valid NUL-terminated inputs and out-pointers for the duration of the call.
    let rc = unsafe {
        vmsn_rt_describe(
            c_path.as_ptr(),
            c_extra.as_ptr(),
            &mut schema,
            &mut extra,
            &mut err,
        )
    };
    if rc != 0 {
        return Err(bad(take_error(err)));
    }
    let forward_schema = take(schema);
    let extra = take(extra);
    let vit_msn = if extra.is_empty() {
        None
    } else {
        serde_json::from_str(&extra).ok()
    };
    Ok(ModuleDescription {
        forward_schema,
        vit_msn,
    })
}

/// The `extra/vit_msn.json` of an open TorchScript file, read straight from
/// the zip archive the file is (libtorch stores entries uncompressed), so
/// loading a bundle can compare it with the manifest without loading the
/// module a second time. None when the file has none or is not such a zip.
pub fn embedded_description(file: &File) -> Option<ArtifactDescription> {
    let len = file.metadata().ok()?.len();
    let read = |offset: u64, n: u64| -> Option<Vec<u8>> {
        let mut buf = vec![0; usize::try_from(n).ok()?];
        file.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    };
    // The end-of-central-directory record: 22 bytes, then a comment of up
    // to 64 KiB; a zip64 locator (20 bytes) may precede it.
    let tail_len = len.min(22 + 0xFFFF + 20);
    let tail = read(len - tail_len, tail_len)?;
    let eocd = tail.windows(4).rposition(|w| w == b"PK\x05\x06")?;
    let (mut cd_size, mut cd_offset) = (
        u64::from(le32(&tail, eocd + 12)?),
        u64::from(le32(&tail, eocd + 16)?),
    );
    if eocd >= 20 && tail.get(eocd - 20..eocd - 16)? == b"PK\x06\x07" {
        let record = read(le64(&tail, eocd - 12)?, 56)?;
        if record.get(..4)? == b"PK\x06\x06" {
            (cd_size, cd_offset) = (le64(&record, 40)?, le64(&record, 48)?);
        }
    }
    // A TorchScript archive's directory is a few KiB; bound the read.
    if cd_size > 16 << 20 {
        return None;
    }
    let cd = read(cd_offset, cd_size)?;
    let wanted = format!("/extra/{ARTIFACT_EXTRA_FILE}");
    let mut p = 0;
    while cd.get(p..p + 4)? == b"PK\x01\x02" {
        let name_len = usize::from(le16(&cd, p + 28)?);
        let extra_len = usize::from(le16(&cd, p + 30)?);
        let comment_len = usize::from(le16(&cd, p + 32)?);
        let name = cd.get(p + 46..p + 46 + name_len)?;
        if name.ends_with(wanted.as_bytes()) {
            let (method, size) = (le16(&cd, p + 10)?, le32(&cd, p + 20)?);
            let local = u64::from(le32(&cd, p + 42)?);
            // Stored and small, as libtorch writes it; anything else is not ours.
            if method != 0 || size > 1 << 20 || local == 0xFFFF_FFFF {
                return None;
            }
            let header = read(local, 30)?;
            if header.get(..4)? != b"PK\x03\x04" {
                return None;
            }
            let skip = 30 + u64::from(le16(&header, 26)?) + u64::from(le16(&header, 28)?);
            let data = read(local + skip, u64::from(size))?;
            return serde_json::from_slice(&data).ok();
        }
        p += 46 + name_len + extra_len + comment_len;
    }
    None
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
