// CUDA graphs for the runtime: one artifact's forward at one input shape,
// captured once and replayed, so a small batch costs one graph launch instead
// of a kernel launch (and a TorchScript interpreter step) per op. Built by
// build.rs as its own shared library, linked against libtorch_cuda: the
// runtime loads it with dlopen only when CUDA graphs are asked for, after
// libtorch_cuda itself (see src/cuda_graph.rs). Errors come back as a
// malloc'ed message, never as an exception across the C boundary.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/script.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "artifact.h"

using vmsn::set_error;

struct VmsnCudaGraph {
  // Declared first, so destroyed last: the outputs live in its memory pool.
  at::cuda::CUDAGraph graph;
  // The graph reads its inputs from, and writes its outputs to, these
  // tensors on every replay.
  std::vector<at::Tensor> inputs;
  vmsn::Outputs outputs;
};

namespace {

std::string shape_of(const at::Tensor &t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

}  // namespace

extern "C" {

// Captures `a`'s forward on `inputs` (all on one CUDA device; their shapes and
// dtypes are fixed from here on). The forward first runs `warmup` times on
// the capture stream, so that the graph executor's profiling runs, cuBLAS's
// workspace for that stream and any lazily compiled kernel all happen before
// the capture, which may hold none of them. Returns NULL with *err set.
VmsnCudaGraph *vmsn_cg_capture(VmsnArtifact *a, torch::Tensor **inputs, int n_inputs, int warmup,
                               char **err) {
  try {
    if (n_inputs < 1) throw std::runtime_error("a CUDA graph needs at least one input");
    c10::Device device = inputs[0]->device();
    auto captured = std::make_unique<VmsnCudaGraph>();
    for (int i = 0; i < n_inputs; ++i) {
      if (inputs[i]->device() != device)
        throw std::runtime_error("CUDA graph inputs must all be on one CUDA device, found " +
                                 inputs[i]->device().str() + " and " + device.str());
      captured->inputs.push_back(inputs[i]->clone());
    }
    if (!device.is_cuda())
      throw std::runtime_error("CUDA graphs need inputs on a CUDA device, found " + device.str());
    torch::NoGradGuard no_grad;
    c10::cuda::CUDAGuard device_guard(device);
    std::vector<c10::IValue> args(captured->inputs.begin(), captured->inputs.end());
    // Capture cannot happen on the legacy default stream.
    c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device.index());
    c10::cuda::device_synchronize();
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      for (int i = 0; i < warmup; ++i) a->module.forward(args);
    }
    c10::cuda::device_synchronize();
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      captured->graph.capture_begin();
      c10::IValue out;
      try {
        out = a->module.forward(args);
      } catch (...) {
        // End the capture, whatever state it is in, before reporting why.
        try {
          captured->graph.capture_end();
        } catch (...) {
        }
        throw;
      }
      captured->graph.capture_end();
      captured->outputs = vmsn::flatten_outputs(out);
    }
    c10::cuda::device_synchronize();
    return captured.release();
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return nullptr;
}

// Copies `inputs` into the graph's inputs (same count, shapes and dtypes as
// at capture; any device), replays it on the current stream and hands over
// the graph's outputs as artifact.cpp's forward does. The outputs share
// storage with the graph's: the next replay overwrites them, so the caller
// copies them out first and never replays `g` from two threads at once.
int vmsn_cg_replay(VmsnCudaGraph *g, torch::Tensor **inputs, int n_inputs,
                   torch::Tensor ***tensors, char ***names, char **err) {
  try {
    if (static_cast<size_t>(n_inputs) != g->inputs.size())
      throw std::runtime_error("the CUDA graph was captured with " +
                               std::to_string(g->inputs.size()) + " inputs, given " +
                               std::to_string(n_inputs));
    for (int i = 0; i < n_inputs; ++i) {
      const at::Tensor &want = g->inputs[i];
      const at::Tensor &given = *inputs[i];
      if (given.sizes() != want.sizes() || given.scalar_type() != want.scalar_type())
        throw std::runtime_error("CUDA graph input " + std::to_string(i) + " was captured as " +
                                 shape_of(want) + " " + c10::toString(want.scalar_type()) +
                                 ", given " + shape_of(given) + " " +
                                 c10::toString(given.scalar_type()));
    }
    c10::cuda::CUDAGuard device_guard(g->inputs[0].device());
    for (int i = 0; i < n_inputs; ++i) g->inputs[i].copy_(*inputs[i]);
    g->graph.replay();
    return vmsn::hand_over(g->outputs, tensors, names);
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return -1;
}

void vmsn_cg_free(VmsnCudaGraph *g) { delete g; }
}
