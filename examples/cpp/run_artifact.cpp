// Loads a vit-msn artifact and runs it with a mask and a head mask:
//   run_artifact MODEL.pt IN.pt OUT.pt
// IN.pt holds pixel_values, bool_masked_pos and head_mask (torch.save'd or
// written by vit-msn as TorchScript tensors, see tests/interop.rs); OUT.pt gets
// the outputs, by name, as a dict saved with torch::pickle_save.
#include <torch/script.h>

#include <fstream>
#include <iostream>

int main(int argc, char **argv) {
  if (argc != 4) {
    std::cerr << "usage: run_artifact MODEL.pt INPUTS.pt OUTPUTS.pt\n";
    return 2;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    model.eval();
    // The inputs, saved from Python as a TorchScript module's attributes.
    torch::jit::Module inputs = torch::jit::load(argv[2]);
    auto pixel_values = inputs.attr("pixel_values").toTensor();
    auto bool_masked_pos = inputs.attr("bool_masked_pos").toTensor();
    auto head_mask = inputs.attr("head_mask").toTensor();

    torch::NoGradGuard no_grad;
    auto out = model.forward({pixel_values, bool_masked_pos, head_mask}).toGenericDict();
    c10::Dict<std::string, torch::Tensor> result;
    for (const auto &item : out) {
      auto name = item.key().toStringRef();
      auto tensor = item.value().toTensor();
      std::cout << name << " " << tensor.sizes() << "\n";
      result.insert(name, tensor);
    }
    auto bytes = torch::jit::pickle_save(result);
    std::ofstream(argv[3], std::ios::binary).write(bytes.data(), bytes.size());
  } catch (const std::exception &e) {
    std::cerr << "error: " << std::string(e.what()).substr(0, std::string(e.what()).find('\n')) << "\n";
    return 1;
  }
  return 0;
}
