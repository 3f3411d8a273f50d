// Tracing with named inputs and several named outputs.
//
// tch's own tracing API records one output only, and a module traced with two
// or more cannot be called or saved. This shim opens a tracing state over the
// input tensors, lets ordinary tch ops record into it from Rust, and closes it
// with a Dict[str, Tensor] output, so a C++ or Python caller gets the outputs
// by name. Errors never cross the C boundary as exceptions: they come back as
// a malloc'ed message that Rust frees with vmsn_free_str.
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/jit/passes/fixup_trace_scope_blocks.h>
#include <torch/csrc/jit/passes/normalize_ops.h>
#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "quiet_warnings.h"

namespace {
char *copy_message(const std::string &message) {
  char *out = static_cast<char *>(std::malloc(message.size() + 1));
  if (out != nullptr) std::memcpy(out, message.c_str(), message.size() + 1);
  return out;
}
}  // namespace

extern "C" {

void vmsn_free_str(char *s) { std::free(s); }

// Starts tracing on this thread. Returns the module the traced method will be
// attached to, or null with *err set.
void *vmsn_trace_begin(const char *module_name, torch::Tensor **inputs,
                       const char **input_names, int ninputs, char **err) {
  try {
    if (torch::jit::tracer::isTracing())
      throw std::runtime_error("cannot nest tracing calls");
    auto module = new torch::jit::Module(module_name);
    auto state = std::make_shared<torch::jit::tracer::TracingState>();
    torch::jit::tracer::setTracingState(state);
    state->graph->insertInput(0, "self")->setType(module->_ivalue()->type());
    for (int i = 0; i < ninputs; ++i) {
      auto value = state->graph->addInput(input_names[i]);
      value->setType(torch::jit::TensorType::get());
      state->setValue(*inputs[i], value);
    }
    return module;
  } catch (const std::exception &e) {
    torch::jit::tracer::abandon();
    *err = copy_message(e.what());
  }
  return nullptr;
}

// Ends tracing, makes `forward` return Dict[str, Tensor] of the given outputs
// in the given order, and saves the module to `path` with one extra file
// (`extra_name` -> `extra_contents`) that describes it. Frees the module.
int vmsn_trace_finish_and_save(void *module_ptr, torch::Tensor **outputs,
                               const char **output_names, int noutputs,
                               const char *path, const char *extra_name,
                               const char *extra_contents, char **err) {
  auto module = static_cast<torch::jit::Module *>(module_ptr);
  try {
    auto state = torch::jit::tracer::getTracingState();
    if (state == nullptr) throw std::runtime_error("not tracing");
    auto graph = state->graph;
    std::vector<torch::jit::Value *> keys, values;
    for (int i = 0; i < noutputs; ++i) {
      values.push_back(state->getOutput(*outputs[i], i));
    }
    // Constants go after the values so that they are inserted at the end of
    // the graph, ahead of the dict node.
    for (int i = 0; i < noutputs; ++i) {
      keys.push_back(graph->insertConstant(std::string(output_names[i])));
    }
    auto dict = graph->insertNode(graph->createDict(
        c10::StringType::get(), c10::TensorType::get(), keys, values));
    graph->registerOutput(dict->output());
    torch::jit::FixupTraceScopeBlocks(graph, module);
    torch::jit::NormalizeOps(graph);
    torch::jit::tracer::setTracingState(nullptr);
    auto fn = module->_ivalue()->compilation_unit()->create_function(
        "forward", graph);
    module->type()->addMethod(fn);
    torch::jit::ExtraFilesMap extra{{extra_name, extra_contents}};
    module->save(path, extra);
    delete module;
    return 0;
  } catch (const std::exception &e) {
    torch::jit::tracer::abandon();
    delete module;
    *err = copy_message(e.what());
  }
  return 1;
}

// oneDNN's linear on dense tensors, with an optional fused post-op (`attr`
// "none" or "gelu", `algorithm` "none"/"tanh" for gelu). Called through the
// dispatcher, so an open trace records it as mkldnn::_linear_pointwise. tch
// has no binding for ops outside aten. Returns a new tensor, or null with *err.
torch::Tensor *vmsn_linear_pointwise(torch::Tensor *x, torch::Tensor *w,
                                     torch::Tensor *b, const char *attr,
                                     const char *algorithm, char **err) {
  try {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
        "mkldnn::_linear_pointwise", "");
    auto state = torch::jit::tracer::getTracingState();
    c10::IValue bias = b == nullptr ? c10::IValue() : c10::IValue(*b);
    torch::Tensor out;
    {
      // The tracer's generic fallback cannot record a Scalar?[] argument:
      // run the op untraced and record its node here instead.
      torch::jit::tracer::setTracingState(nullptr);
      torch::jit::Stack stack{*x, *w, bias, std::string(attr),
                              c10::List<std::optional<c10::Scalar>>(),
                              std::string(algorithm)};
      try {
        op.callBoxed(&stack);
      } catch (...) {
        torch::jit::tracer::setTracingState(state);
        throw;
      }
      torch::jit::tracer::setTracingState(state);
      out = stack.back().toTensor();
    }
    if (state) {
      auto graph = state->graph;
      auto *node = graph->create(
          c10::Symbol::fromQualString("mkldnn::_linear_pointwise"), 1);
      node->addInput(state->getValue(*x));
      node->addInput(state->getValue(*w));
      node->addInput(b == nullptr ? graph->insertNode(graph->createNone())->output()
                                  : state->getValue(*b));
      node->addInput(graph->insertConstant(std::string(attr)));
      node->addInput(graph->insertNode(graph->createList(
                                           c10::OptionalType::create(c10::NumberType::get()), {}))
                         ->output());
      node->addInput(graph->insertConstant(std::string(algorithm)));
      graph->insertNode(node);
      node->output()->setType(c10::TensorType::get());
      state->setValue(out, node->output());
    }
    return new torch::Tensor(out);
  } catch (const std::exception &e) {
    *err = copy_message(e.what());
  }
  return nullptr;
}

// An int8 linear as PyTorch's dynamic quantization makes it: the weight
// quantized once to int8 with one scale per output channel (symmetric, as
// torch.ao's per-channel weight observer: scale = max|w_row| / 127.5), packed
// with its f32 bias by `quantized::linear_prepack`, and the activations
// quantized per call inside `quantized::linear_dynamic` (reduce_range, as
// torch's dynamic Linear passes on x86: 7-bit activations, so no u8·s8 pair
// can saturate fbgemm's AVX2 kernels and every CPU computes the same sums).
// The packed weight becomes a constant of the trace; TorchScript saves it
// through its __getstate__ (the int8 weight, its scales and the bias) and
// packs it again at load for the CPU it runs on. Runs the op on `x` and
// records the node. Returns a new tensor, or null with *err.
torch::Tensor *vmsn_linear_dynamic_int8(torch::Tensor *x, torch::Tensor *w, torch::Tensor *b,
                                        char **err) {
  auto state = torch::jit::tracer::getTracingState();
  try {
    static auto prepack =
        c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_prepack", "");
    static auto dynamic =
        c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
    if (x->scalar_type() != at::kFloat || w->scalar_type() != at::kFloat || !w->device().is_cpu())
      throw std::runtime_error("int8 linears take f32 CPU tensors");
    // Quantizing and packing are compile-time work, not part of the trace.
    torch::jit::tracer::setTracingState(nullptr);
    vmsn::QuietQuantizedDeprecation quiet;
    at::Tensor weight = w->contiguous();
    at::Tensor scales = (weight.abs().amax({1}) / 127.5)
                            .clamp_min(std::numeric_limits<float>::epsilon())
                            .to(at::kDouble);
    at::Tensor zero_points = at::zeros({weight.size(0)}, at::kLong);
    at::Tensor qweight = at::quantize_per_channel(weight, scales, zero_points, 0, at::kQInt8);
    c10::IValue bias = b == nullptr ? c10::IValue() : c10::IValue(b->contiguous());
    torch::jit::Stack stack{qweight, bias};
    prepack.callBoxed(&stack);
    c10::IValue packed = stack.back();
    const bool reduce_range = true;
    stack = torch::jit::Stack{*x, packed, reduce_range};
    dynamic.callBoxed(&stack);
    at::Tensor out = stack.back().toTensor();
    torch::jit::tracer::setTracingState(state);
    if (state) {
      auto graph = state->graph;
      auto *node = graph->create(c10::Symbol::fromQualString("quantized::linear_dynamic"), 1);
      node->addInput(state->getValue(*x));
      node->addInput(graph->insertConstant(packed));
      node->addInput(graph->insertConstant(reduce_range));
      graph->insertNode(node);
      node->output()->setType(c10::TensorType::get());
      state->setValue(out, node->output());
    }
    return new torch::Tensor(out);
  } catch (const std::exception &e) {
    torch::jit::tracer::setTracingState(state);
    *err = copy_message(e.what());
  }
  return nullptr;
}

// Drops a trace begun with vmsn_trace_begin, after an error on the Rust side.
void vmsn_trace_abandon(void *module_ptr) {
  torch::jit::tracer::abandon();
  delete static_cast<torch::jit::Module *>(module_ptr);
}
}
