// The vit-msn binary (and this package's tests and benches) must start without
// LD_LIBRARY_PATH and must find CUDA where a GPU exists: give them a RUNPATH to
// libtorch, and keep libtorch_cuda as NEEDED even though no symbol of it is
// referenced directly (it registers the CUDA kernels when loaded).
use std::env;
use std::path::PathBuf;

fn main() {
    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB"),
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
