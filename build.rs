// The vit-msn binary (and this package's tests and benches) must start without
// LD_LIBRARY_PATH: give them a RUNPATH to libtorch. libtorch_cuda is left out
// of NEEDED on purpose (the linker's --as-needed drops it, since no symbol of
// it is referenced): `device::load_cuda_support` loads it when CUDA is asked
// for, so CPU runs do not carry the CUDA libraries. Also compiles the
// runtime's small C++ shims (src/shim/), and, where libtorch has CUDA
// support and the CUDA headers are installed, the CUDA-graph library
// (src/shim/cuda_graph.cpp), which the runtime loads only when asked to.
use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=src/shim/describe.cpp");
    println!("cargo:rerun-if-changed=src/shim/artifact.cpp");
    println!("cargo:rerun-if-changed=src/shim/int8_linear.cpp");
    println!("cargo:rerun-if-changed=src/shim/int8_linear.h");
    println!("cargo:rerun-if-changed=src/shim/c_strings.h");
    println!("cargo:rerun-if-changed=src/shim/quiet_warnings.h");
    println!("cargo:rerun-if-changed=src/shim/artifact.h");
    println!("cargo:rerun-if-changed=src/shim/archive_check.h");
    println!("cargo:rerun-if-changed=src/shim/cuda_graph.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB"),
    );
    let root = lib.parent().expect("libtorch lib folder has a parent");
    let mut shims = cc::Build::new();
    // at::parallel_for is a header template: without OpenMP the shims' loops
    // (the int8 linears' activation quantization) would run on one thread. With
    // it they join libtorch's own OpenMP runtime, the libgomp beside it.
    match libtorch_openmp(&lib) {
        Some(gomp) => {
            shims.flag("-fopenmp");
            println!("cargo:rustc-link-search=native={}", lib.display());
            println!("cargo:rustc-link-lib=dylib:+verbatim={gomp}");
        }
        None => println!(
            "cargo:warning=no libgomp beside libtorch in {}: the shims' loops run on one thread",
            lib.display()
        ),
    }
    shims
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
        .file("src/shim/int8_linear.cpp")
        .compile("vit_msn_describe");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // src/mkl.rs: oneMKL's vendor check, answered by the executable (-u
    // keeps the functions from being dropped, the export makes them win
    // over libtorch_cpu's own).
    for symbol in ["mkl_serv_intel_cpu", "mkl_serv_intel_cpu_true"] {
        println!("cargo:rustc-link-arg=-Wl,-u,{symbol}");
        println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol={symbol}");
    }
    build_cuda_graphs_library(&lib, root);
}

/// The file name of the OpenMP runtime libtorch links (`libgomp.so.1` in
/// the PyPI wheel, `libgomp-<hash>.so.1` in the zips), if it is in `lib`.
fn libtorch_openmp(lib: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("libgomp") && n.contains(".so"))
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Builds `libvit_msn_cuda_graphs.so` into OUT_DIR and tells the runtime
/// where it is (`VIT_MSN_CUDA_GRAPHS_LIB`). A separate library, because it
/// must link libtorch_cuda, which the binary does not (see above). Skipped,
/// with a warning, where libtorch has no CUDA support or the CUDA runtime
/// headers are missing (the Makefile installs them: nvidia-cuda-crt beside
/// the wheel's nvidia-cuda-runtime); the runtime then says CUDA graphs are
/// not available in this build.
fn build_cuda_graphs_library(lib: &Path, root: &Path) {
    if !lib.join("libtorch_cuda.so").exists() {
        println!(
            "cargo:warning=no CUDA graphs: libtorch in {} has no CUDA support",
            lib.display()
        );
        return;
    }
    let Some(cuda_include) = cuda_include_dir(root) else {
        println!(
            "cargo:warning=no CUDA graphs: CUDA headers (cuda_runtime_api.h and crt/host_config.h) not found beside libtorch or in $CUDA_HOME/include"
        );
        return;
    };
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let so = out.join("libvit_msn_cuda_graphs.so");
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let status = compiler
        .to_command()
        .args(["-shared", "-fPIC", "-O2", "-w", "-std=c++17"])
        .args(["-D_GLIBCXX_USE_CXX11_ABI=1", "-DGLOG_USE_GLOG_EXPORT"])
        .arg(format!("-I{}", root.join("include").display()))
        .arg(format!(
            "-I{}",
            root.join("include/torch/csrc/api/include").display()
        ))
        .arg(format!("-I{}", cuda_include.display()))
        .arg("src/shim/cuda_graph.cpp")
        .arg("-o")
        .arg(&so)
        .arg(format!("-L{}", lib.display()))
        .args([
            "-Wl,--no-as-needed",
            "-ltorch_cuda",
            "-lc10_cuda",
            "-ltorch_cpu",
            "-lc10",
        ])
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status();
    match status {
        Ok(s) if s.success() => {
            println!("cargo:rustc-env=VIT_MSN_CUDA_GRAPHS_LIB={}", so.display());
        }
        other => panic!("building src/shim/cuda_graph.cpp failed: {other:?}"),
    }
}

/// `$CUDA_HOME/include`, or the `nvidia/*/include` folder the PyPI wheel's
/// CUDA packages install beside torch, if it has what cuda_runtime.h needs.
fn cuda_include_dir(torch_root: &Path) -> Option<PathBuf> {
    let complete =
        |d: &Path| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_config.h").exists();
    let from_env = env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    // torch_root may be a symlink to site-packages/torch.
    let nvidia = std::fs::canonicalize(torch_root)
        .ok()
        .and_then(|t| t.parent().map(|site| site.join("nvidia")));
    if let Some(nvidia) = &nvidia {
        // Headers installed there later (pip) rebuild the library.
        println!("cargo:rerun-if-changed={}", nvidia.display());
    }
    let beside_torch = nvidia
        .and_then(|nvidia| std::fs::read_dir(nvidia).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("include")));
    from_env
        .into_iter()
        .chain(beside_torch)
        .find(|d| complete(d))
}
