// Reading a `torch.save` state dict (`pytorch_model.bin`) safely: the
// archive checks of src/shim/archive_check.h first, then data.pkl unpickled
// with this reader's own record reader, so that every tensor is checked
// against the real size of the record its data came from (libtorch sizes a
// storage by the pickle's claim). tch's loadz_multi also panics (across the
// C boundary: an abort) on a tensor name that is not UTF-8; names are handed
// over as bytes. Errors come back as a malloc'ed message, never as an
// exception across the C boundary.
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/unpickler.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "archive_check.h"
#include "c_strings.h"

namespace {

// Unpickles data.pkl into (name, tensor) pairs, checking each tensor against
// the size of the record its data came from.
std::vector<std::pair<std::string, at::Tensor>> load_checked(const char *path) {
  caffe2::serialize::PyTorchStreamReader reader{std::string(path)};
  vmsn::check_archive(path, reader);
  if (!reader.hasRecord("data.pkl")) throw std::runtime_error("the archive holds no data.pkl");
  auto [pickle, pickle_size] = reader.getRecord("data.pkl");
  vmsn::RecordSizes record_sizes;
  auto read_record = [&](const std::string &key) {
    auto [data, size] = reader.getRecord("data/" + key);
    record_sizes[data.get()] = size;
    return std::move(data);
  };
  torch::jit::Unpickler unpickler(vmsn::buffer_reader(pickle.get(), pickle_size), nullptr, nullptr,
                                  read_record, c10::Device(c10::kCPU));
  c10::IValue value = unpickler.parse_ivalue();
  if (!value.isGenericDict()) throw std::runtime_error("data.pkl holds " + value.tagKind() + ", not a state dict");
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto &item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor())
      throw std::runtime_error("data.pkl is not a state dict (names to tensors)");
    const std::string &name = item.key().toStringRef();
    const at::Tensor &tensor = item.value().toTensor();
    std::string reason = vmsn::misfit(tensor, record_sizes);
    if (!reason.empty()) throw std::runtime_error("tensor `" + name + "`: its " + reason);
    tensors.emplace_back(name, tensor);
  }
  return tensors;
}

}  // namespace

extern "C" {

// Reads the state dict at `path` and calls `f(data, name, name_len, tensor)`
// for each entry, handing over a new torch::Tensor*. Returns 0, or -1 with
// *err set (nothing handed over then).
int vmsn_load_state_dict(const char *path, void *data,
                         void (*f)(void *, const char *, size_t, torch::Tensor *), char **err) {
  try {
    auto tensors = load_checked(path);
    for (const auto &[name, tensor] : tensors)
      f(data, name.data(), name.size(), new torch::Tensor(tensor));
    return 0;
  } catch (const std::exception &e) {
    *err = vmsn::copy_string(e.what());
  }
  return -1;
}
}
