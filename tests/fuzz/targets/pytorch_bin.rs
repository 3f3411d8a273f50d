//! Any bytes as a `pytorch_model.bin` (a torch.save zip file), through the
//! compiler's reader: libtorch's zip reader and unpickler.

/// One input: an error is fine, a panic, abort or hang is what fuzzing finds.
pub fn run(data: &[u8]) {
    // One file per process: libFuzzer runs the target in one thread, and
    // tests/fuzz_regressions.rs runs each target's inputs one after another.
    let path = std::env::temp_dir().join(format!("vit-msn-fuzz-{}.bin", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let _ = vit_msn_graph::weights::read_pytorch_bin(&path);
    }
    let _ = std::fs::remove_file(&path);
}
