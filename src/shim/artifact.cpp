// A loaded artifact for the runtime: load, an optional load-time rewrite that
// prepacks the oneDNN linear weights, and forward. tch's CModule can do load
// and forward, but gives no access to the graph, which the rewrite needs.
// Errors come back as a malloc'ed first line, never as an exception across
// the C boundary.
#include <ATen/Context.h>
#include <torch/script.h>
#include <torch/csrc/jit/ir/ir.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "archive_check.h"
#include "artifact.h"
#include "quiet_warnings.h"

using vmsn::set_error;

extern "C" {

// `device`: -1 for the CPU, N for cuda:N (tch's encoding).
VmsnArtifact *vmsn_rt_artifact_load(const char *path, int device, char **err) {
  try {
    c10::Device d = device < 0 ? c10::Device(c10::kCPU)
                               : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device));
    if (d.is_cuda()) {
      // f32 artifacts promise f32 results: no TF32 in cuDNN convolutions
      // (libtorch allows it by default) nor in cuBLAS matmuls.
      at::globalContext().setAllowTF32CuDNN(false);
      at::globalContext().setFloat32MatmulPrecision("highest");
    }
    vmsn::QuietQuantizedDeprecation quiet;
    vmsn::check_torchscript(path);
    auto artifact = new VmsnArtifact{torch::jit::load(path, d)};
    artifact->module.eval();
    return artifact;
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return nullptr;
}

void vmsn_rt_artifact_free(VmsnArtifact *a) { delete a; }

// Replaces the weight of every `mkldnn::_linear_pointwise` whose weight is a
// dense CPU constant with that weight reordered once into oneDNN's blocked
// layout for `rows` input rows (what `mkldnn::_reorder_linear_weight` does
// when inductor freezes a model). Without it oneDNN reorders the weight on
// every call. The packed tensors cannot be saved, which is why this runs at
// load time and not in the compiler. Returns how many weights were packed,
// or -1 with *err set.
int vmsn_rt_artifact_prepack_linears(VmsnArtifact *a, int64_t rows, char **err) {
  try {
    auto graph = a->module.get_method("forward").graph();
    static const auto linear = c10::Symbol::fromQualString("mkldnn::_linear_pointwise");
    auto reorder = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                       .typed<at::Tensor(const at::Tensor &, std::optional<int64_t>)>();
    int packed = 0;
    for (torch::jit::Node *node : graph->nodes()) {
      if (node->kind() != linear || node->inputs().size() < 2) continue;
      torch::jit::Value *w = node->input(1);
      if (w->node()->kind() != c10::prim::Constant) continue;
      auto value = torch::jit::toIValue(w);
      if (!value || !value->isTensor()) continue;
      const at::Tensor &weight = value->toTensor();
      if (!weight.device().is_cpu() || weight.is_mkldnn() || weight.dim() != 2) continue;
      torch::jit::Node *dense = w->node();
      node->replaceInput(1, vmsn::insert_tensor_constant(*graph, reorder.call(weight, rows), dense));
      // Free each dense weight at once, so the weights are never all held twice.
      if (!w->hasUses()) dense->destroy();
      ++packed;
    }
    return packed;
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return -1;
}

// Rewrites every `mkldnn::_linear_pointwise` without a post-op whose weight
// is a dense f32 CPU constant into `mkl::_mkl_linear`, with the weight packed
// once by oneMKL (`cblas_sgemm_pack`, through `mkl::_mkl_reorder_linear_weight`)
// for inputs of `rows` rows. A call with another row count runs ATen's linear
// on the dense weight, which the node keeps. On AVX2, with oneMKL's AVX2
// kernels in effect (src/mkl.rs), the packed sgemm is faster than oneDNN's
// prepacked linear at batch 1 (docs/performance.md). Run it after
// split_gelu_post_ops, in place of prepack_linears. Returns how many nodes
// were rewritten, or -1 with *err set.
int vmsn_rt_artifact_mkl_linears(VmsnArtifact *a, int64_t rows, char **err) {
  try {
    auto graph = a->module.get_method("forward").graph();
    static const auto pointwise = c10::Symbol::fromQualString("mkldnn::_linear_pointwise");
    static const auto mkl_linear = c10::Symbol::fromQualString("mkl::_mkl_linear");
    auto pack = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("mkl::_mkl_reorder_linear_weight", "")
                    .typed<at::Tensor(const at::Tensor &, int64_t)>();
    std::vector<torch::jit::Node *> found;
    for (torch::jit::Node *node : graph->nodes()) {
      if (node->kind() != pointwise || node->inputs().size() != 6) continue;
      auto attr = torch::jit::toIValue(node->input(3));
      if (!attr || !attr->isString() || attr->toStringRef() != "none") continue;
      torch::jit::Value *w = node->input(1);
      if (w->node()->kind() != c10::prim::Constant) continue;
      auto value = torch::jit::toIValue(w);
      if (!value || !value->isTensor()) continue;
      const at::Tensor &weight = value->toTensor();
      if (!weight.device().is_cpu() || weight.is_mkldnn() || weight.dim() != 2 ||
          weight.scalar_type() != at::kFloat)
        continue;
      found.push_back(node);
    }
    for (torch::jit::Node *node : found) {
      at::Tensor packed = pack.call(torch::jit::toIValue(node->input(1))->toTensor(), rows);
      torch::jit::Value *packed_value = vmsn::insert_tensor_constant(*graph, packed, node);
      torch::jit::WithInsertPoint guard(node);
      torch::jit::Value *y = graph->insert(
          mkl_linear, {node->input(0), packed_value, node->input(1), node->input(2), graph->insertConstant(rows)});
      y->setType(node->output()->type());
      node->output()->replaceAllUsesWith(y);
      node->destroy();
    }
    return static_cast<int>(found.size());
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return -1;
}

// Rewrites every `mkldnn::_linear_pointwise` into `aten::linear`, followed by
// `aten::gelu` where the node fused one: the same arithmetic through ATen's
// GEMM, which runs on every CPU, for a CPU on which oneDNN has no kernel for
// the artifact's dtype. Returns how many nodes were rewritten, or -1 with
// *err set (a post-op other than none or gelu, which vit-msn never writes).
int vmsn_rt_artifact_unfuse_onednn_linears(VmsnArtifact *a, char **err) {
  try {
    auto graph = a->module.get_method("forward").graph();
    static const auto pointwise = c10::Symbol::fromQualString("mkldnn::_linear_pointwise");
    std::vector<torch::jit::Node *> found;
    for (torch::jit::Node *node : graph->nodes())
      if (node->kind() == pointwise) found.push_back(node);
    for (torch::jit::Node *node : found) {
      // (input, weight, bias, attr, scalars, algorithm)
      if (node->inputs().size() != 6) throw std::runtime_error("unexpected _linear_pointwise schema");
      auto attr = torch::jit::toIValue(node->input(3));
      auto algorithm = torch::jit::toIValue(node->input(5));
      if (!attr || !attr->isString()) throw std::runtime_error("_linear_pointwise with a non-constant post-op");
      const std::string op = attr->toStringRef();
      if (op != "none" && op != "gelu")
        throw std::runtime_error("oneDNN linear with post-op `" + op + "` has no fallback");
      torch::jit::WithInsertPoint guard(node);
      torch::jit::Value *y = graph->insert(c10::aten::linear, {node->input(0), node->input(1), node->input(2)});
      if (op == "gelu") {
        std::string approximate = "none";
        if (algorithm && algorithm->isString() && algorithm->toStringRef() == "tanh") approximate = "tanh";
        y = graph->insert(c10::aten::gelu, {y}, {torch::jit::NamedValue("approximate", approximate)});
      }
      y->setType(node->output()->type());
      node->output()->replaceAllUsesWith(y);
      node->destroy();
    }
    return static_cast<int>(found.size());
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return -1;
}

// Rewrites every `mkldnn::_linear_pointwise` with a GELU post-op into the
// same oneDNN linear without one, followed by an in-place `aten::gelu_` on
// its fresh output. On AVX2 oneDNN's GELU post-op costs about three times
// what ATen's separate pass does (measured in docs/performance.md). Run it
// before prepack_linears. Returns how many nodes were split, or -1 with *err
// set.
int vmsn_rt_artifact_split_gelu_post_ops(VmsnArtifact *a, char **err) {
  try {
    auto graph = a->module.get_method("forward").graph();
    static const auto pointwise = c10::Symbol::fromQualString("mkldnn::_linear_pointwise");
    static const auto gelu_ = c10::Symbol::fromQualString("aten::gelu_");
    std::vector<torch::jit::Node *> found;
    for (torch::jit::Node *node : graph->nodes()) {
      if (node->kind() != pointwise || node->inputs().size() != 6) continue;
      auto attr = torch::jit::toIValue(node->input(3));
      if (attr && attr->isString() && attr->toStringRef() == "gelu") found.push_back(node);
    }
    for (torch::jit::Node *node : found) {
      auto algorithm = torch::jit::toIValue(node->input(5));
      std::string approximate = "none";
      if (algorithm && algorithm->isString() && algorithm->toStringRef() == "tanh") approximate = "tanh";
      torch::jit::WithInsertPoint at_linear(node);
      node->replaceInput(3, graph->insertConstant(std::string("none")));
      node->replaceInput(5, graph->insertConstant(std::string("")));
      torch::jit::WithInsertPoint after(node->next());
      torch::jit::Value *y = node->output();
      // Every use but the new gelu_ itself reads its result instead.
      torch::jit::Value *activated =
          graph->insert(gelu_, {y}, {torch::jit::NamedValue("approximate", approximate)});
      activated->setType(y->type());
      y->replaceAllUsesAfterNodeWith(activated->node(), activated);
    }
    return static_cast<int>(found.size());
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return -1;
}

// vmsn::expose_pre_layernorm_cls on a loaded artifact. Returns 0, or 1
// with *err set.
int vmsn_rt_artifact_expose_pre_layernorm_cls(VmsnArtifact *a, char **err) {
  try {
    vmsn::expose_pre_layernorm_cls(a->module);
    return 0;
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return 1;
}

// Runs forward without autograd. On success returns the number of outputs and
// sets *tensors (malloc'ed array of new torch::Tensor*) and *names (malloc'ed
// array of malloc'ed strings; NULL entries for positional outputs): a
// Dict[str, Tensor] gives its items, a tuple or list of tensors its elements,
// a tensor itself. On failure returns -1 with *err set.
int vmsn_rt_artifact_forward(VmsnArtifact *a, torch::Tensor **inputs, int n_inputs,
                             torch::Tensor ***tensors, char ***names, char **err) {
  try {
    torch::NoGradGuard no_grad;
    std::vector<c10::IValue> args;
    for (int i = 0; i < n_inputs; ++i) args.emplace_back(*inputs[i]);
    c10::IValue out = a->module.forward(std::move(args));
    return vmsn::hand_over(vmsn::flatten_outputs(out), tensors, names);
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return -1;
}

void vmsn_rt_free_ptr_array(void **array) { std::free(array); }
}
