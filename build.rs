// The vit-msn binary (and this package's tests and benches) must start without
// LD_LIBRARY_PATH: give them a RUNPATH to libtorch. libtorch_cuda is left out
// of NEEDED on purpose (the linker's --as-needed drops it, since no symbol of
// it is referenced): `device::load_cuda_support` loads it when CUDA is asked
// for, so CPU runs do not carry the CUDA libraries. Also compiles the
// runtime's small C++ shims (src/shim/).
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/shim/describe.cpp");
    println!("cargo:rerun-if-changed=src/shim/artifact.cpp");
    println!("cargo:rerun-if-changed=src/shim/c_strings.h");
    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB"),
    );
    let root = lib.parent().expect("libtorch lib folder has a parent");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/shim/describe.cpp")
        .file("src/shim/artifact.cpp")
        .compile("vit_msn_describe");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
