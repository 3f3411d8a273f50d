// Compiles the tracing shim (shim/trace.cpp) and the state-dict reader
// (shim/state_dict.cpp) against the libtorch that
// torch-sys found, and gives this crate's test and example binaries a RUNPATH
// to it.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/trace.cpp");
    println!("cargo:rerun-if-changed=shim/state_dict.cpp");
    println!("cargo:rerun-if-changed=../src/shim/archive_check.h");
    println!("cargo:rerun-if-changed=../src/shim/quiet_warnings.h");
    // Set by torch-sys (`links = "tch"`): the folder holding libtorch*.so.
    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB"),
    );
    let root = lib
        .parent()
        .expect("libtorch lib folder has a parent")
        .to_path_buf();
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // The archive checks shared with the runtime.
        .include("../src/shim")
        .file("shim/trace.cpp")
        .file("shim/state_dict.cpp")
        .compile("vit_msn_trace");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
