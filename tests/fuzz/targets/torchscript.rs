//! TorchScript artifacts with one record changed, through every loader of
//! the runtime: `describe`, bare files (`run --artifact`) and bundles.
//!
//! Flipping bytes of a whole archive mostly breaks its CRCs, and libtorch
//! stops at the first one. So the input is a record of a small compiled
//! artifact (seeds/torchscript_base.pt, a 1-layer classifier at 8x8): its
//! first byte picks the record (high bit set: remove it instead), the rest
//! is the record's new content, and the archive is rebuilt with valid CRCs.
//! Each bundle gets a manifest whose sha256 matches, as a hostile bundle
//! would have. What must hold: an error or a result, never a panic, abort
//! or hang.

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};
use vit_msn::bare::BareArtifact;
use vit_msn::bundle::LoadOptions;
use vit_msn::{Bundle, Device};

const BASE: &[u8] = include_bytes!("../seeds/torchscript_base.pt");
const MANIFEST: &str = include_str!("../seeds/torchscript_manifest.json");

fn records() -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(Cursor::new(BASE)).expect("base archive");
    (0..archive.len())
        .map(|i| {
            let mut file = archive.by_index(i).expect("base record");
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).expect("base record bytes");
            (file.name().to_string(), bytes)
        })
        .collect()
}

fn rebuild(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in records {
        writer
            .start_file(name.as_str(), stored)
            .expect("zip record");
        writer.write_all(bytes).expect("zip bytes");
    }
    writer.finish().expect("zip finish").into_inner()
}

/// One input: an error is fine, a panic, abort or hang is what fuzzing finds.
pub fn run(data: &[u8]) {
    let Some((&pick, content)) = data.split_first() else {
        return;
    };
    let mut records = records();
    let index = usize::from(pick & 0x7f) % records.len();
    if pick & 0x80 != 0 {
        records.remove(index);
    } else {
        records[index].1 = content.to_vec();
    }
    let archive = rebuild(&records);

    // One folder per process: libFuzzer runs the target in one thread, and
    // tests/fuzz_regressions.rs runs each target's inputs one after another.
    let dir = std::env::temp_dir().join(format!("vit-msn-fuzz-ts-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    load_all(&dir, &archive);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `archive` and its manifest into `dir` and loads it every way.
fn load_all(dir: &Path, archive: &[u8]) {
    let file: PathBuf = dir.join("model_8x8.pt");
    let base_sha = format!("{:x}", Sha256::digest(BASE));
    let sha = format!("{:x}", Sha256::digest(archive));
    if std::fs::write(&file, archive).is_err()
        || std::fs::write(dir.join("manifest.json"), MANIFEST.replace(&base_sha, &sha)).is_err()
    {
        return;
    }

    let pixels = Tensor::rand([2, 3, 8, 8], (Kind::Float, tch::Device::Cpu));
    let _ = vit_msn::describe::describe(&file);
    if let Ok(bare) = BareArtifact::load(&file) {
        let _ = bare.forward(&pixels, None, None);
    }
    if let Ok(bundle) = Bundle::load_with(dir, Device::Cpu, &LoadOptions::default()) {
        let _ = bundle.forward(&pixels, None, None);
    }
}
