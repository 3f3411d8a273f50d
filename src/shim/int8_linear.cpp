// `vmsn::int8_linear`: an int8 artifact's `quantized::linear_dynamic` with its
// GEMM on oneDNN instead of fbgemm, for inputs of at least `min_rows` rows
// (smaller ones run the op as compiled). The activation is quantized exactly
// as fbgemm's linear_dynamic quantizes it (the same min/max, the same
// ChooseQuantizationParams, fbgemm's own QuantizeAvx2), only split across
// the intra-op threads (build.rs compiles the shims with OpenMP, or
// at::parallel_for would run on one), where fbgemm finds the min/max on one;
// the integer sums are then the same, and the outputs differ only in how the
// f32 dequantization rounds. On AMD Zen 3 (AVX2, no VNNI) oneDNN's u8·s8 GEMM is
// faster than fbgemm's at batch 8 (docs/performance.md). The op lives only
// in a loaded module's graph (the runtime's load-time rewrite); artifacts on
// disk keep `quantized::linear_dynamic`.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/cpu/QuantUtils.h>
#include <fbgemm/QuantUtilsAvx2.h>
#include <torch/library.h>
#include <torch/script.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "artifact.h"
#include "int8_linear.h"

namespace {

// Elements per task when splitting the min/max and quantization passes.
constexpr int64_t kGrain = 1 << 15;

// A registered op, looked up once per call site (the forward calls these).
c10::OperatorHandle op(const char *name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// Calls `handle` with `args`; returns its outputs.
torch::jit::Stack call_all(const c10::OperatorHandle &handle, std::vector<c10::IValue> args) {
  torch::jit::Stack stack(std::move(args));
  handle.callBoxed(&stack);
  return stack;
}

c10::IValue call(const c10::OperatorHandle &handle, std::vector<c10::IValue> args) {
  return call_all(handle, std::move(args)).at(0);
}

std::pair<float, float> min_max(const float *x, int64_t n) {
  int tasks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain)));
  std::vector<float> lo(tasks), hi(tasks);
  int64_t per = (n + tasks - 1) / tasks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t from = t * per, to = std::min(n, from + per);
      fbgemm::FindMinMax(x + from, &lo[t], &hi[t], std::max<int64_t>(0, to - from));
    }
  });
  float mn = lo[0], mx = hi[0];
  for (int t = 1; t < tasks; ++t) {
    mn = std::min(mn, lo[t]);
    mx = std::max(mx, hi[t]);
  }
  return {mn, mx};
}

at::Tensor int8_linear(const at::Tensor &input, const c10::IValue &fbgemm_weight, const at::Tensor &weight,
                       const at::Tensor &w_scales, const at::Tensor &w_zero_points,
                       const std::optional<at::Tensor> &bias, bool reduce_range, int64_t min_rows) {
  int64_t k = input.dim() >= 2 ? input.size(-1) : 0;
  int64_t rows = k > 0 ? input.numel() / k : 0;
  if (rows < min_rows || rows == 0 || input.scalar_type() != at::kFloat || !input.device().is_cpu()) {
    static const auto fbgemm = op("quantized::linear_dynamic");
    return call(fbgemm, {input, fbgemm_weight, reduce_range}).toTensor();
  }
  at::Tensor x = input.contiguous();
  const float *src = x.const_data_ptr<float>();
  int64_t n = x.numel();
  auto [mn, mx] = min_max(src, n);
  // As linear_dynamic: 8-bit unsigned, 7 bits with reduce_range.
  auto q = quant_utils::ChooseQuantizationParams(mn, mx, 0, 255, false, false, reduce_range);
  fbgemm::TensorQuantizationParams params{};
  params.scale = q.scale;
  params.zero_point = q.zero_point;
  params.precision = 8;
  at::Tensor qx = at::empty(x.sizes(), x.options().dtype(at::kByte));
  uint8_t *dst = qx.data_ptr<uint8_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    fbgemm::QuantizeAvx2<uint8_t, true>(src + begin, dst + begin, end - begin, params);
  });
  c10::List<std::optional<at::Scalar>> no_args;
  no_args.push_back(std::nullopt);
  c10::IValue b = bias.has_value() ? c10::IValue(*bias) : c10::IValue();
  static const auto qlinear = op("onednn::qlinear_pointwise");
  return call(qlinear,
              {qx, static_cast<double>(q.scale), static_cast<int64_t>(q.zero_point), weight, w_scales,
               w_zero_points, b, 1.0, static_cast<int64_t>(0), c10::ScalarType::Float, std::string("none"),
               no_args, std::string("")})
      .toTensor();
}

void int8_linear_boxed(const c10::OperatorHandle &, torch::jit::Stack *stack) {
  constexpr size_t n = 8;
  auto arg = [&](size_t i) -> c10::IValue & { return torch::jit::peek(*stack, i, n); };
  std::optional<at::Tensor> bias;
  if (!arg(5).isNone()) bias = arg(5).toTensor();
  at::Tensor y = int8_linear(arg(0).toTensor(), arg(1), arg(2).toTensor(), arg(3).toTensor(), arg(4).toTensor(),
                             bias, arg(6).toBool(), arg(7).toInt());
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, std::move(y));
}

}  // namespace

namespace vmsn {

void register_int8_linear() {
  static std::unique_ptr<torch::Library> lib = [] {
    auto l = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "vmsn", std::nullopt, __FILE__, __LINE__);
    l->def("int8_linear(Tensor x, Any fbgemm_weight, Tensor weight, Tensor w_scales, Tensor w_zero_points, "
           "Tensor? bias, bool reduce_range, int min_rows) -> Tensor",
           torch::CppFunction::makeFromBoxedFunction<&int8_linear_boxed>());
    return l;
  }();
}

}  // namespace vmsn

extern "C" {

// Rewrites every `quantized::linear_dynamic` whose packed weight is a
// constant into `vmsn::int8_linear`, with the weight also packed by oneDNN
// (`onednn::qlinear_prepack`, for inputs of `pack_rows` rows) from the same
// int8 values and scales. Inputs of fewer than `min_rows` rows still run
// fbgemm's op on the original packed weight. CPU only; nothing is rewritten
// on a CPU without AVX2. Returns how many nodes were rewritten, or -1 with
// *err set.
int vmsn_rt_artifact_onednn_int8_linears(VmsnArtifact *a, int64_t pack_rows, int64_t min_rows, char **err) {
  try {
    // fbgemm's quantization below is AVX2 code; without AVX2 fbgemm's own op
    // refuses to run, so leave it to do that.
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    vmsn::register_int8_linear();
    auto graph = a->module.get_method("forward").graph();
    static const auto dynamic = c10::Symbol::fromQualString("quantized::linear_dynamic");
    static const auto ours = c10::Symbol::fromQualString("vmsn::int8_linear");
    std::vector<torch::jit::Node *> found;
    for (torch::jit::Node *node : graph->nodes()) {
      if (node->kind() != dynamic || node->inputs().size() != 3) continue;
      if (node->input(1)->node()->kind() != c10::prim::Constant) continue;
      if (!torch::jit::toIValue(node->input(2))) continue;  // reduce_range must be a constant
      found.push_back(node);
    }
    int rewritten = 0;
    for (torch::jit::Node *node : found) {
      auto unpacked = call_all(op("quantized::linear_unpack"), {*torch::jit::toIValue(node->input(1))});
      at::Tensor qweight = unpacked.at(0).toTensor();
      c10::IValue bias = unpacked.at(1);
      int64_t n = qweight.size(0), k = qweight.size(1);
      at::Tensor scales;
      if (qweight.qscheme() == c10::kPerChannelAffine || qweight.qscheme() == c10::kPerChannelSymmetric) {
        if (qweight.q_per_channel_zero_points().ne(0).any().item<bool>()) continue;
        scales = qweight.q_per_channel_scales().to(at::kFloat);
      } else {
        if (qweight.q_zero_point() != 0) continue;
        scales = at::full({n}, qweight.q_scale(), at::kFloat);
      }
      at::Tensor zero_points = at::zeros({n}, at::kLong);
      at::Tensor packed = call(op("onednn::qlinear_prepack"),
                               {qweight.int_repr(), c10::IValue(std::vector<int64_t>{pack_rows, k})})
                              .toTensor();
      torch::jit::Value *packed_value = vmsn::insert_tensor_constant(*graph, packed, node);
      torch::jit::WithInsertPoint guard(node);
      torch::jit::Value *b = bias.isNone() ? graph->insertConstant(c10::IValue())
                                           : graph->insertConstant(bias.toTensor().contiguous());
      torch::jit::Value *y = graph->insert(
          ours, {node->input(0), node->input(1), packed_value, graph->insertConstant(scales),
                 graph->insertConstant(zero_points), b, node->input(2), graph->insertConstant(min_rows)});
      y->setType(node->output()->type());
      node->output()->replaceAllUsesWith(y);
      node->destroy();
      ++rewritten;
    }
    return rewritten;
  } catch (const std::exception &e) {
    vmsn::set_error(err, e);
  }
  return -1;
}
}
