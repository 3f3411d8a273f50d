//! The fuzz targets' inputs that once broke them (tests/fuzz/regressions/)
//! and their seeds (tests/fuzz/seeds/), each through the target's own body
//! (tests/fuzz/targets/<target>.rs, which the cargo-fuzz binaries wrap).
//! As when fuzzing, an input passes when it returns: an error is fine, a
//! panic fails the test (naming the file), an abort or segfault fails the
//! whole test binary.

mod common;

#[path = "fuzz/targets/config.rs"]
mod config;
#[path = "fuzz/targets/image.rs"]
mod image;
#[path = "fuzz/targets/manifest.rs"]
mod manifest;
#[path = "fuzz/targets/masks.rs"]
mod masks;
#[path = "fuzz/targets/pytorch_bin.rs"]
mod pytorch_bin;
#[path = "fuzz/targets/safetensors.rs"]
mod safetensors;
#[path = "fuzz/targets/torchscript.rs"]
mod torchscript;

/// Runs `run` on every file of tests/fuzz/regressions/<target> (if any)
/// and tests/fuzz/seeds/<target>, one after another: the bodies of
/// pytorch_bin and torchscript write one scratch file per process.
fn replay(target: &str, run: fn(&[u8])) {
    let fuzz = common::root().join("tests").join("fuzz");
    let mut count = 0;
    for (kind, required) in [("regressions", false), ("seeds", true)] {
        let dir = fuzz.join(kind).join(target);
        if !required && !dir.exists() {
            continue;
        }
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} panicked", file.display());
            count += 1;
        }
    }
    assert!(count > 0, "no inputs for the {target} fuzz target");
}

#[test]
fn manifest_inputs() {
    replay("manifest", manifest::run);
}

#[test]
fn config_inputs() {
    replay("config", config::run);
}

#[test]
fn safetensors_inputs() {
    replay("safetensors", safetensors::run);
}

#[test]
fn pytorch_bin_inputs() {
    replay("pytorch_bin", pytorch_bin::run);
}

#[test]
fn masks_inputs() {
    replay("masks", masks::run);
}

#[test]
fn image_inputs() {
    replay("image", image::run);
}

#[test]
fn torchscript_inputs() {
    replay("torchscript", torchscript::run);
}
