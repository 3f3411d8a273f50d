//! Any bytes as a `pytorch_model.bin` (a torch.save zip file), through the
//! compiler's reader: libtorch's zip reader and unpickler.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One file per process: libFuzzer runs the target in one thread.
    let path = std::env::temp_dir().join(format!("vit-msn-fuzz-{}.bin", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let _ = vit_msn_graph::weights::read_pytorch_bin(&path);
    }
});
