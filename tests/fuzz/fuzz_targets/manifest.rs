//! Any bytes as manifest.json: a typed error or a manifest, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vit_msn::Manifest::parse(text, std::path::Path::new("manifest.json"));
    }
});
