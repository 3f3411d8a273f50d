// What the runtime's shims share about a loaded artifact: the module, and how
// a forward pass's result is handed to the Rust side (artifact.cpp, and the
// CUDA-graph library built from cuda_graph.cpp).
#pragma once

#include <torch/script.h>

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "c_strings.h"

struct VmsnArtifact {
  torch::jit::Module module;
};

namespace vmsn {

// A forward pass's tensors, in order: named for a Dict[str, Tensor] (empty
// names for a tuple's or list's elements, or a lone tensor).
using Outputs = std::vector<std::pair<std::string, at::Tensor>>;

inline Outputs flatten_outputs(const c10::IValue &out) {
  Outputs flat;
  if (out.isGenericDict()) {
    for (const auto &item : out.toGenericDict()) {
      if (!item.key().isString() || !item.value().isTensor())
        throw std::runtime_error("forward returned a dict that is not Dict[str, Tensor]");
      flat.emplace_back(item.key().toStringRef(), item.value().toTensor());
    }
  } else if (out.isTuple() || out.isList()) {
    auto elements = out.isTuple() ? out.toTupleRef().elements().vec() : out.toList().vec();
    for (const auto &e : elements) {
      if (!e.isTensor()) throw std::runtime_error("forward returned a non-tensor element");
      flat.emplace_back(std::string(), e.toTensor());
    }
  } else if (out.isTensor()) {
    flat.emplace_back(std::string(), out.toTensor());
  } else {
    throw std::runtime_error("forward returned " + out.tagKind() +
                             ", not a tensor, tuple or Dict[str, Tensor]");
  }
  return flat;
}

// Hands `outputs` over: *tensors gets a malloc'ed array of new torch::Tensor*
// (sharing storage with `outputs`), *names a malloc'ed array of malloc'ed
// names (NULL for positional outputs). Returns the count.
inline int hand_over(const Outputs &outputs, torch::Tensor ***tensors, char ***names) {
  size_t n = outputs.size();
  *tensors = static_cast<torch::Tensor **>(std::calloc(n == 0 ? 1 : n, sizeof(torch::Tensor *)));
  *names = static_cast<char **>(std::calloc(n == 0 ? 1 : n, sizeof(char *)));
  if (*tensors == nullptr || *names == nullptr) {
    std::free(*tensors);
    std::free(*names);
    throw std::bad_alloc();
  }
  for (size_t i = 0; i < n; ++i) {
    if (!outputs[i].first.empty()) (*names)[i] = copy_string(outputs[i].first);
    (*tensors)[i] = new torch::Tensor(outputs[i].second);
  }
  return static_cast<int>(n);
}

}  // namespace vmsn
