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
#include <string>

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

// Drops a trace begun with vmsn_trace_begin, after an error on the Rust side.
void vmsn_trace_abandon(void *module_ptr) {
  torch::jit::tracer::abandon();
  delete static_cast<torch::jit::Module *>(module_ptr);
}
}
