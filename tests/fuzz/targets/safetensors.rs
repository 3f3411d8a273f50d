//! Any bytes as a safetensors file, through both readers (the runtime's
//! inputs and the compiler's weights).

/// One input: an error is fine, a panic, abort or hang is what fuzzing finds.
pub fn run(data: &[u8]) {
    let path = std::path::Path::new("fuzz.safetensors");
    let _ = vit_msn::tensors::parse_safetensors(data, path);
    let _ = vit_msn_graph::weights::read_safetensors(path, data);
}
