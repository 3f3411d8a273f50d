//! The `pytorch_bin` fuzz target; its body is ../targets/pytorch_bin.rs, which
//! tests/fuzz_regressions.rs also runs on the seeds and regressions.
#![no_main]

#[path = "../targets/pytorch_bin.rs"]
mod target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| target::run(data));
