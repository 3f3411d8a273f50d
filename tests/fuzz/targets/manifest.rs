//! Any bytes as manifest.json: a typed error or a manifest, never a panic.

/// One input: an error is fine, a panic, abort or hang is what fuzzing finds.
pub fn run(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vit_msn::Manifest::parse(text, std::path::Path::new("manifest.json"));
    }
}
