# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# Each target bootstraps libtorch (PyTorch 2.13.0 from PyPI, in .venv) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BOOTSTRAP := $(VENV)/.vit-msn-bootstrap
FIXTURES := tests/fixtures/generated
# torch provides libtorch for tch 0.26; transformers is the reference the tests compare against.
# pillow and scikit-image: the image fixtures (Pillow decodes and resizes for ViTImageProcessor;
# scikit-image ships the public-domain / CC0 photographs).
IMAGE_PIP_PACKAGES := pillow==13.0.0 scikit-image==0.26.0
# The CUDA runtime headers' crt/ folder, which the wheel's nvidia-cuda-runtime lacks: build.rs
# compiles the CUDA-graph library (src/shim/cuda_graph.cpp) against them. Headers only.
CUDA_HEADER_PACKAGES := nvidia-cuda-crt==13.0.88
CUDA_HEADERS := $(VENV)/.vit-msn-cuda-headers
# tritonclient: the real client `make serve-test` drives `vit-msn serve` with.
SERVE_PIP_PACKAGES := tritonclient[http]==2.73.0
# torchvision: the reference for MSN's low-shot preprocessing (tests/lowshot_msn.rs); installed
# with --no-deps, as it pins the torch above.
TORCHVISION_PIP_PACKAGE := torchvision==0.28.0
PIP_PACKAGES := torch==2.13.0 transformers==4.46.3 safetensors==0.8.0 numpy scikit-learn $(IMAGE_PIP_PACKAGES) $(CUDA_HEADER_PACKAGES) $(SERVE_PIP_PACKAGES)
IMAGE_FIXTURES := tests/fixtures/generated-images
SWEEP_ARGS ?= --cases 30

.PHONY: libtorch demo test fixtures bench side-by-side startup soak sweep shapes fuzz interop serve-test serve-bench python python-test ray-bench gpu-check clean

libtorch: $(BOOTSTRAP) $(CUDA_HEADERS)

# A venv bootstrapped before the headers were on the list gets them here.
$(CUDA_HEADERS): | $(BOOTSTRAP)
	$(VENV)/bin/pip install $(CUDA_HEADER_PACKAGES)
	touch $@

$(BOOTSTRAP):
	@echo "==> bootstrap: PyPI torch 2.13.0 into $(VENV) (about 4.7 GB, once)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --progress-bar on pip
	$(VENV)/bin/pip install --progress-bar on $(PIP_PACKAGES)
	$(VENV)/bin/pip install --no-deps $(TORCHVISION_PIP_PACKAGE)
	ln -sfn "$$($(PY) -c 'import os, torch; print(os.path.relpath(os.path.dirname(torch.__file__)))')" .libtorch
	test -f .libtorch/lib/libtorch.so
	touch $@

demo: libtorch
	cargo build --release
	./target/release/vit-msn demo

# A venv bootstrapped before these were on the list gets them here.
$(FIXTURES)/COMPLETE: tests/fixtures/make_fixtures.py tests/bounds.json | $(BOOTSTRAP)
	$(PY) -c 'import PIL, sklearn' 2>/dev/null || $(VENV)/bin/pip install $(IMAGE_PIP_PACKAGES) scikit-learn
	rm -rf $(FIXTURES)
	$(PY) tests/fixtures/make_fixtures.py $(FIXTURES)
	touch $@

$(IMAGE_FIXTURES)/COMPLETE: tests/fixtures/make_image_fixtures.py $(wildcard src/cli/demo_photos/*) | $(BOOTSTRAP)
	$(PY) -c 'import PIL, skimage' 2>/dev/null || $(VENV)/bin/pip install $(IMAGE_PIP_PACKAGES)
	rm -rf $(IMAGE_FIXTURES)
	$(PY) tests/fixtures/make_image_fixtures.py $(IMAGE_FIXTURES)
	touch $@

fixtures: $(FIXTURES)/COMPLETE $(IMAGE_FIXTURES)/COMPLETE

# Run under these, any x86-64 machine computes as an AVX2-only CPU (AMD Zen 3) does:
# oneDNN, ATen, fbgemm (the int8 linears) and oneMKL (src/mkl.rs) capped at AVX2.
AVX2_ONLY := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

# The last line sums up every test binary's results: "test: N passed, N failed".
# The parity and int8 suites run twice: on this CPU, and as on an AVX2-only one.
test: libtorch fixtures
	$(PY) -c 'import torchvision' 2>/dev/null || $(VENV)/bin/pip install --no-deps $(TORCHVISION_PIP_PACKAGE)
	mkdir -p target; set -o pipefail; cargo test --workspace 2>&1 | tee target/test.log
	@echo "==> parity as on an AVX2-only CPU ($(AVX2_ONLY))"
	set -o pipefail; $(AVX2_ONLY) cargo test --test parity --test int8 2>&1 | tee -a target/test.log
	@echo "==> published shapes (small, base) in f32, f16 and bf16, every output, here and as on AVX2 (log in target/shapes.log)"
	rm -f target/shapes.log; for d in f32 f16 bf16; do \
	  $(PY) tests/sweep/published_shapes.py --only small,base --dtype $$d --all-outputs \
	    --modes native,native-avx2,avx2 --bin target/debug/vit-msn >> target/shapes.log 2>&1 \
	    || { tail -n 40 target/shapes.log; exit 1; }; \
	done
	@grep -E "shapes within" target/shapes.log | tail -n 3
	$(MAKE) interop
	$(MAKE) serve-test
	$(MAKE) python-test
	@echo "==> random-config parity sweep (tests/sweep/config_sweep.py, log in target/sweep.log)"
	$(PY) tests/sweep/config_sweep.py $(SWEEP_ARGS) --bin target/debug/vit-msn > target/sweep.log 2>&1 \
		|| { tail -n 40 target/sweep.log; exit 1; }
	@tail -n 5 target/sweep.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "test: %d passed, %d failed\n", p, f }' target/test.log

bench: libtorch
	cargo bench --bench forward

# 2,000 forward passes in one process; fails if RSS grows over 5% after warm-up.
soak: libtorch fixtures
	cargo test --release --test soak -- --ignored --nocapture

# Random model configs against transformers (tests/sweep/config_sweep.py; `make test` runs it
# too, on the debug build); exits 1 on any flagged case. SWEEP_ARGS="--cases 100 --seed 7" for more.
sweep: libtorch
	cargo build --release
	$(PY) tests/sweep/config_sweep.py $(SWEEP_ARGS)

# The published checkpoints' shapes (small, base, large, base-4, large-7) with
# random weights against transformers; about 2.5 minutes. `make test` runs small
# and base.
shapes: libtorch
	cargo build --release
	$(PY) tests/sweep/published_shapes.py $(SHAPES_ARGS)

# Each cargo-fuzz target (tests/fuzz) for FUZZ_SECONDS. cargo fuzz wants nightly
# flags: RUSTC_BOOTSTRAP lets the stable toolchain take them; no sanitizer (the
# targets are Rust over libtorch, and the point is panics and aborts); an input
# that runs over 60 s counts as a hang. A run starts from the committed seeds
# (tests/fuzz/seeds/<target>) and past failures (tests/fuzz/regressions/<target>);
# libFuzzer writes what it finds into the first folder, tests/fuzz/corpus/<target>,
# a working corpus that git ignores. `cargo test --test fuzz_regressions` replays
# the seeds and regressions without cargo fuzz.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := manifest config safetensors pytorch_bin masks image torchscript
fuzz: libtorch
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
	cd tests/fuzz && for t in $(FUZZ_TARGETS); do \
	  echo "==> fuzz $$t for $(FUZZ_SECONDS) s"; \
	  mkdir -p corpus/$$t; \
	  dirs="$$PWD/corpus/$$t $$PWD/seeds/$$t"; \
	  if [ -d regressions/$$t ]; then dirs="$$dirs $$PWD/regressions/$$t"; fi; \
	  LD_LIBRARY_PATH=$(CURDIR)/.libtorch/lib RUSTC_BOOTSTRAP=1 cargo fuzz run -s none --fuzz-dir . $$t $$dirs -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -timeout=60 || exit 1; \
	done

# The C++ consumer (examples/cpp) built with CMake against the wheel's libtorch,
# compared with the Rust runtime and transformers. Installs cmake if missing.
interop: libtorch fixtures
	command -v cmake >/dev/null || (apt-get update && apt-get install -y cmake)
	cargo build
	bash examples/cpp/check.sh

# Every stack on the same weights in one run (needs onnxruntime, onnx and openvino, installed here on demand).
side-by-side: libtorch
	cargo build --release
	$(PY) -c 'import onnxruntime, onnx, openvino' 2>/dev/null || \
	  $(VENV)/bin/pip install onnxruntime==1.32.0 onnx==1.23.2 openvino==2026.4.1
	$(PY) benches/side_by_side.py

# Cold start and peak RSS of one-photo classification vs Python + transformers.
startup: demo
	$(PY) benches/startup.py

# `vit-msn serve` on 127.0.0.1 driven by tritonclient and raw HTTP (tests/serve/test_serve.py):
# protocol, parity, concurrency, batching, hot swap, hostile requests, SIGTERM.
serve-test: libtorch
	$(PY) -c 'import tritonclient.http' 2>/dev/null || $(VENV)/bin/pip install '$(SERVE_PIP_PACKAGES)'
	cargo build
	$(PY) tests/serve/test_serve.py --bin target/debug/vit-msn

# Throughput and latency of `vit-msn serve` against FastAPI + uvicorn + torch.jit.load
# (benches/serve.py; installs fastapi and uvicorn on demand).
serve-bench: libtorch
	$(PY) -c 'import tritonclient.http' 2>/dev/null || $(VENV)/bin/pip install '$(SERVE_PIP_PACKAGES)'
	$(PY) -c 'import fastapi, uvicorn' 2>/dev/null || $(VENV)/bin/pip install fastapi uvicorn
	cargo build --release
	$(PY) benches/serve.py --bin target/release/vit-msn

# The Python package (python/vit_msn, installed editable) and Ray Data into .venv; again only
# when python/pyproject.toml changes. No build isolation: the venv's setuptools builds it offline.
RAY_PIP_PACKAGES := ray[data]==2.60.0 pytest==9.2.0
PYTHON_STAMP := $(VENV)/.vit-msn-python
python: $(PYTHON_STAMP)

$(PYTHON_STAMP): python/pyproject.toml | $(BOOTSTRAP)
	$(PY) -c 'import setuptools' 2>/dev/null || $(VENV)/bin/pip install setuptools
	$(VENV)/bin/pip install --no-build-isolation -e ./python $(foreach p,$(RAY_PIP_PACKAGES),'$(p)')
	$(PY) -c 'import vit_msn, vit_msn.ray, ray.data'
	touch $@

# vit_msn and vit_msn.ray (tests/python) against the debug binary, on a local Ray of 2 CPUs; a few minutes.
python-test: python fixtures
	cargo build
	$(PY) -m pytest -q tests/python

# Images/s of python -m vit_msn.ray with 1 and 2 actors against one `vit-msn run`, same images, one run.
ray-bench: python
	cargo build --release
	$(PY) benches/ray_bench.py --bin target/release/vit-msn

# Builds a binary against PyTorch 2.11.0 / tch 0.24 for the GPU machines (tests/gpu/build.sh; tests/gpu/check.sh runs there).
gpu-check:
	bash tests/gpu/build.sh

clean:
	cargo clean
	rm -rf $(FIXTURES)
