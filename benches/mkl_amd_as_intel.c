/* The answer src/mkl.rs gives oneMKL's vendor check, for a Python process:
 * preloaded, it lets oneMKL inside libtorch take its AVX2/AVX-512 kernels on
 * an AMD CPU, as the vit-msn executables do (docs/performance.md).
 *   cc -shared -fPIC -O2 benches/mkl_amd_as_intel.c -o /tmp/libmkl_amd_as_intel.so
 *   LD_PRELOAD=/tmp/libmkl_amd_as_intel.so .venv/bin/python benches/op_profile.py --single-ops
 * Unlike src/mkl.rs it answers "Intel" on any CPU: preload it on AMD only. */
int mkl_serv_intel_cpu(void) { return 1; }
int mkl_serv_intel_cpu_true(void) { return 1; }
