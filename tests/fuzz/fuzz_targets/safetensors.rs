//! The `safetensors` fuzz target; its body is ../targets/safetensors.rs, which
//! tests/fuzz_regressions.rs also runs on the seeds and regressions.
#![no_main]

#[path = "../targets/safetensors.rs"]
mod target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| target::run(data));
