//! Any bytes as a safetensors file, through both readers (the runtime's
//! inputs and the compiler's weights).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    let _ = vit_msn::tensors::parse_safetensors(data, path);
    let _ = vit_msn_graph::weights::read_safetensors(path, data);
});
