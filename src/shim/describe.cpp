// What a TorchScript file says about itself: its forward schema and, for
// artifacts written by vit-msn, the extra file that describes them. tch has no
// binding for either. Errors come back as a malloc'ed message, never as an
// exception across the C boundary.
#include <torch/script.h>

#include <string>

#include "archive_check.h"
#include "artifact.h"
#include "c_strings.h"

using vmsn::copy_string;
using vmsn::set_error;

extern "C" {

void vmsn_rt_free_str(char *s) { std::free(s); }

// Loads `path` on the CPU. On success returns 0 and sets *schema to the
// forward schema and *extra to the contents of `extra_name` (empty if the
// file has none). On failure returns 1 and sets *err.
int vmsn_rt_describe(const char *path, const char *extra_name, char **schema,
                     char **extra, char **err) {
  try {
    torch::jit::ExtraFilesMap files{{extra_name, ""}};
    vmsn::check_torchscript(path);
    auto module = torch::jit::load(path, c10::Device(c10::kCPU), files);
    auto method = module.find_method("forward");
    if (!method) throw std::runtime_error("the module has no forward method");
    std::ostringstream s;
    s << method->function().getSchema();
    *schema = copy_string(s.str());
    *extra = copy_string(files[extra_name]);
    return 0;
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return 1;
}

// A classifier made of a backbone artifact and a linear head on its CLS token
// (L2-normalised), as one TorchScript module: forward(pixel_values,
// bool_masked_pos, head_mask) -> Dict[str, Tensor] with "logits" =
// scale * normalize(cls) @ weight.T + bias. The backbone is kept as a
// submodule, so the file loads in C++ and Python like any artifact.
// `features` 1 is MSN's low-shot evaluation instead: the CLS token before the
// final layer norm (vmsn::expose_pre_layernorm_cls), centred on its own mean,
// then L2-normalised (cyanure's preprocess(centering, normalize)).
int vmsn_rt_compose_classifier(const char *backbone_path, torch::Tensor *weight,
                               torch::Tensor *bias, double scale, int features,
                               const char *out_path, const char *extra_name,
                               const char *extra_contents, char **err) {
  try {
    vmsn::check_torchscript(backbone_path);
    auto backbone = torch::jit::load(backbone_path, c10::Device(c10::kCPU));
    if (features == 1) vmsn::expose_pre_layernorm_cls(backbone);
    torch::jit::Module m("VitMsnFewShot");
    m.register_module("backbone", backbone);
    m.register_buffer("weight", *weight);
    m.register_buffer("bias", *bias);
    m.register_attribute("scale", c10::FloatType::get(), scale);
    if (features == 1) {
      m.define(R"JIT(
def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor, head_mask: Tensor) -> Dict[str, Tensor]:
    out = self.backbone.forward(pixel_values, bool_masked_pos, head_mask)
    cls = out["cls_pre_layernorm"].to(self.weight.dtype)
    cls = cls - cls.mean(-1, True)
    cls = cls / cls.norm(2, -1, True).clamp_min(1e-12)
    logits = torch.matmul(cls, self.weight.t()) * self.scale + self.bias
    return {"logits": logits}
)JIT");
    } else {
      m.define(R"JIT(
def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor, head_mask: Tensor) -> Dict[str, Tensor]:
    out = self.backbone.forward(pixel_values, bool_masked_pos, head_mask)
    cls = out["last_hidden_state"].select(1, 0).to(self.weight.dtype)
    cls = cls / cls.norm(2, -1, True).clamp_min(1e-12)
    logits = torch.matmul(cls, self.weight.t()) * self.scale + self.bias
    return {"logits": logits}
)JIT");
    }
    torch::jit::ExtraFilesMap extra{{extra_name, extra_contents}};
    m.save(out_path, extra);
    return 0;
  } catch (const std::exception &e) {
    set_error(err, e);
  }
  return 1;
}
}
