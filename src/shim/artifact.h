// What the runtime's shims share about a loaded artifact: the module, the
// rewrite that exposes the CLS token before the final norm (artifact.cpp and
// describe.cpp's classifier), and how a forward pass's result is handed to
// the Rust side (artifact.cpp, and the CUDA-graph library built from
// cuda_graph.cpp).
#pragma once

#include <torch/script.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>

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

// The extra output `expose_pre_layernorm_cls` adds.
inline const char *const kPreLayernormCls = "cls_pre_layernorm";

// Adds "cls_pre_layernorm" to the Dict[str, Tensor] that forward returns:
// the CLS token of the input of the layer norm that makes
// "last_hidden_state", i.e. of the last block's output before the final norm
// (transformers' hidden_states[-1][:, 0]), which MSN's low-shot evaluation
// fits on. A graph rewrite, so any backbone artifact serves, as compiled.
// Throws where forward does not end that way.
inline void expose_pre_layernorm_cls(torch::jit::Module &module) {
  auto graph = module.get_method("forward").graph();
  if (graph->outputs().size() != 1 || graph->outputs()[0]->node()->kind() != c10::prim::DictConstruct)
    throw std::runtime_error("forward does not build a Dict[str, Tensor]; the output before the final layer norm cannot be found");
  torch::jit::Node *dict = graph->outputs()[0]->node();
  torch::jit::Value *hidden = nullptr;
  for (size_t i = 0; i + 1 < dict->inputs().size(); i += 2) {
    auto key = torch::jit::toIValue(dict->input(i));
    if (!key || !key->isString()) continue;
    if (key->toStringRef() == kPreLayernormCls) return;  // rewritten already
    if (key->toStringRef() == "last_hidden_state") hidden = dict->input(i + 1);
  }
  if (hidden == nullptr)
    throw std::runtime_error("forward returns no last_hidden_state (a backbone artifact is needed)");
  torch::jit::Node *norm = hidden->node();
  if (norm->kind() != c10::aten::layer_norm)
    throw std::runtime_error(std::string("last_hidden_state comes from ") + norm->kind().toQualString() +
                             ", not a layer norm; the output before the final norm cannot be found");
  torch::jit::WithInsertPoint guard(dict);
  torch::jit::Value *cls = graph->insert(c10::aten::select, {norm->input(0), graph->insertConstant(1), graph->insertConstant(0)});
  dict->addInput(graph->insertConstant(std::string(kPreLayernormCls)));
  dict->addInput(cls);
}

// Inserts a prim::Constant holding `t` before `before` and returns its value.
// Graph::insertConstant refuses tensors without storage, as oneDNN's and
// oneMKL's packed weights are; a constant node takes them.
inline torch::jit::Value *insert_tensor_constant(torch::jit::Graph &graph, const at::Tensor &t,
                                                 torch::jit::Node *before) {
  torch::jit::Node *constant = graph.create(c10::prim::Constant);
  constant->t_(c10::attr::value, t);
  constant->output()->setType(c10::TensorType::get());
  constant->insertBefore(before);
  return constant->output();
}

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
