// Checks on a PyTorch zip archive (torch.save or TorchScript) before libtorch
// trusts it, shared by the runtime (TorchScript artifacts) and the compiler
// (graph/shim/state_dict.cpp, pytorch_model.bin). libtorch's readers trust the
// file, and a few hostile bytes go a long way:
// - a memo index in a pickle (LONG_BINPUT 2000000000) makes the unpickler
//   grow its memo table to that size (over 20 GB resident from a 2 KB file);
//   every pickle is walked first, and refused when an index exceeds its
//   length (a pickler numbers its memo entries from 0, one per PUT);
// - a record whose stated size exceeds the whole file is refused;
// - a tensor stated larger than the record that holds its data is read past
//   the buffer when touched (a segfault): libtorch sizes each storage by the
//   pickle's claim, not by its record. `fits_record` is the check; callers
//   unpickle with their own record reader to learn each record's real size.
// Every check throws std::runtime_error with the reason.
#pragma once

#include <c10/core/CPUAllocator.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/serialization/unpickler.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>

namespace vmsn {

// Walks a pickle's opcodes (protocols 0 to 5) without building anything, and
// throws when a memo index exceeds the pickle's length, or the pickle is
// truncated or holds an unknown opcode.
inline void check_pickle(const std::string &name, const uint8_t *p, size_t n) {
  size_t i = 0;
  auto need = [&](size_t k) {
    if (n - i < k) throw std::runtime_error(name + " is truncated");
  };
  auto little = [&](size_t k) {
    need(k);
    uint64_t v = 0;
    for (size_t b = 0; b < k; ++b) v |= static_cast<uint64_t>(p[i + b]) << (8 * b);
    i += k;
    return v;
  };
  auto skip = [&](uint64_t k) {
    if (k > n - i) throw std::runtime_error(name + " is truncated");
    i += static_cast<size_t>(k);
  };
  auto line = [&]() {
    size_t start = i;
    while (i < n && p[i] != '\n') ++i;
    if (i == n) throw std::runtime_error(name + " is truncated");
    ++i;
    return std::string(reinterpret_cast<const char *>(p + start), i - start - 1);
  };
  auto memo_index = [&](uint64_t index) {
    if (index > n)
      throw std::runtime_error(name + ": memo index " + std::to_string(index) +
                               " is beyond anything a pickle of " + std::to_string(n) +
                               " bytes numbers");
  };
  while (i < n) {
    uint8_t op = p[i++];
    switch (op) {
      case '.':  // STOP
        return;
      case 'q': case 'h':  // BINPUT, BINGET: one-byte index
        little(1);
        break;
      case 'r': case 'j':  // LONG_BINPUT, LONG_BINGET
        memo_index(little(4));
        break;
      case 'p': case 'g': {  // PUT, GET: a decimal line
        std::string text = line();
        uint64_t index = 0;
        for (char c : text) {
          if (c < '0' || c > '9') throw std::runtime_error(name + ": bad memo index");
          if (index > n) break;
          index = index * 10 + static_cast<uint64_t>(c - '0');
        }
        memo_index(index);
        break;
      }
      case 0x80: case 'K': case 'U': case 'C': case 0x82: case 0x8c:
        // PROTO, BININT1, EXT1; SHORT_BINSTRING, SHORT_BINBYTES, SHORT_BINUNICODE
        if (op == 'U' || op == 'C' || op == 0x8c) skip(little(1));
        else little(1);
        break;
      case 'M': case 0x83:  // BININT2, EXT2
        little(2);
        break;
      case 'J': case 0x84:  // BININT, EXT4
        little(4);
        break;
      case 'G': case 0x95:  // BINFLOAT, FRAME
        little(8);
        break;
      case 0x8a:  // LONG1
        skip(little(1));
        break;
      case 0x8b: case 'T': case 'B': case 'X':  // LONG4, BINSTRING, BINBYTES, BINUNICODE
        skip(little(4));
        break;
      case 0x8d: case 0x8e: case 0x96:  // BINUNICODE8, BINBYTES8, BYTEARRAY8
        skip(little(8));
        break;
      case 'c': case 'i':  // GLOBAL, INST: two lines
        line();
        line();
        break;
      case 'I': case 'L': case 'F': case 'S': case 'V': case 'P':  // text arguments
        line();
        break;
      case '(': case ')': case ']': case '}': case 'a': case 'e': case 's': case 'u':
      case 't': case '0': case '1': case '2': case 'R': case 'b': case 'Q': case 'N':
      case 'l': case 'd': case 'o': case 0x81: case 0x85: case 0x86: case 0x87:
      case 0x88: case 0x89: case 0x8f: case 0x90: case 0x91: case 0x92: case 0x93:
      case 0x94: case 0x97: case 0x98:
        break;  // no argument
      default:
        throw std::runtime_error(name + ": unknown pickle opcode " + std::to_string(op));
    }
  }
  throw std::runtime_error(name + " has no STOP");
}

// Refuses records stated larger than the file, and walks every pickle in the
// archive (data.pkl, constants.pkl, the debug pickles) with check_pickle.
inline void check_archive(const std::string &path, caffe2::serialize::PyTorchStreamReader &reader) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw std::runtime_error("cannot open the file");
  const uint64_t file_size = static_cast<uint64_t>(file.tellg());
  for (const std::string &name : reader.getAllRecords()) {
    const uint64_t size = reader.getRecordSize(name);
    if (size > file_size)
      throw std::runtime_error("record `" + name + "` states " + std::to_string(size) +
                               " bytes, more than the whole file's " + std::to_string(file_size));
  }
  for (const std::string &name : reader.getAllRecords()) {
    if (name.size() < 3 || name.compare(name.size() - 3, 3, "pkl") != 0) continue;
    auto [data, size] = reader.getRecord(name);
    check_pickle(name, static_cast<const uint8_t *>(data.get()), size);
  }
}

// Whether every element `t` addresses lies within the `record_bytes` bytes
// of data at its storage's start.
inline bool fits_record(const at::Tensor &t, uint64_t record_bytes) {
  if (!t.defined() || t.layout() != c10::kStrided) return false;
  if (t.numel() == 0) return true;
  if (t.storage_offset() < 0) return false;
  // The last element's index, with overflow checks: sizes, strides and the
  // offset all come from the file.
  unsigned __int128 last = static_cast<unsigned __int128>(t.storage_offset());
  for (int64_t d = 0; d < t.dim(); ++d) {
    int64_t size = t.size(d), stride = t.stride(d);
    if (size <= 0 || stride < 0) return false;
    last += static_cast<unsigned __int128>(size - 1) * static_cast<unsigned __int128>(stride);
    if (last >> 64) return false;
  }
  unsigned __int128 bytes = (last + 1) * static_cast<unsigned __int128>(t.element_size());
  return bytes <= static_cast<unsigned __int128>(record_bytes);
}

// A reader over the `size` bytes at `data`, for torch::jit::Unpickler (which
// must not outlive them).
inline std::function<size_t(char *, size_t)> buffer_reader(const void *data, size_t size) {
  auto position = std::make_shared<size_t>(0);
  return [data, size, position](char *buffer, size_t n) {
    size_t k = std::min(n, size - *position);
    std::memcpy(buffer, static_cast<const char *>(data) + *position, k);
    *position += k;
    return k;
  };
}

// A check's refusal, as opposed to an error of the unpickler itself.
struct Refused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Each record's real size, by the address its data (or stand-in) was loaded at.
using RecordSizes = std::map<const void *, uint64_t>;

// Empty when `t` fits the record its storage stands for; else the reason,
// "shape [..] (strides [..], offset N) does not fit the M bytes the file
// holds for it".
inline std::string misfit(const at::Tensor &t, const RecordSizes &record_sizes) {
  if (t.numel() == 0) return "";
  auto record = t.has_storage() ? record_sizes.find(t.storage().data()) : record_sizes.end();
  uint64_t bytes = record == record_sizes.end() ? 0 : record->second;
  if (record != record_sizes.end() && fits_record(t, bytes)) return "";
  return "shape " + c10::str(t.sizes()) + " (strides " + c10::str(t.strides()) + ", offset " +
         std::to_string(t.storage_offset()) + ") does not fit the " + std::to_string(bytes) +
         " bytes the file holds for it";
}

// Every tensor in `value` (recursively) fits the record its storage stands for.
inline void check_tensors(const c10::IValue &value, const RecordSizes &record_sizes,
                          const std::string &pickle) {
  if (value.isTensor()) {
    std::string reason = misfit(value.toTensor(), record_sizes);
    if (!reason.empty()) throw Refused(pickle + ": a tensor of " + reason);
  } else if (value.isTuple()) {
    for (const auto &e : value.toTupleRef().elements()) check_tensors(e, record_sizes, pickle);
  } else if (value.isList()) {
    for (const auto &e : value.toListRef()) check_tensors(e, record_sizes, pickle);
  } else if (value.isGenericDict()) {
    for (const auto &item : value.toGenericDict()) {
      check_tensors(item.key(), record_sizes, pickle);
      check_tensors(item.value(), record_sizes, pickle);
    }
  } else if (value.isObject()) {
    for (const auto &slot : value.toObjectRef().slots()) check_tensors(slot, record_sizes, pickle);
  }
}

// Unpickles `pickle` (data.pkl or constants.pkl of a TorchScript archive)
// without reading any tensor data: each record stands in as one byte, and
// only its size is read. Objects of TorchScript classes are not built; their
// state is checked instead. Every tensor must fit its record.
inline void check_pickled_tensors(caffe2::serialize::PyTorchStreamReader &reader,
                                  const std::string &pickle, const std::string &records) {
  auto [data, size] = reader.getRecord(pickle);
  RecordSizes record_sizes;
  auto read_record = [&](const std::string &key) {
    at::DataPtr stand_in = c10::GetCPUAllocator()->allocate(1);
    record_sizes[stand_in.get()] = reader.getRecordSize(records + key);
    return stand_in;
  };
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  auto resolve = [cu](const c10::QualifiedName &name) {
    c10::ClassTypePtr cls = cu->get_class(name);
    if (!cls) {
      cls = c10::ClassType::create(name, cu);
      cu->register_type(cls);
    }
    return c10::StrongTypePtr(cu, cls);
  };
  auto build = [&](const c10::StrongTypePtr &type, c10::IValue state) {
    check_tensors(state, record_sizes, pickle);
    return c10::ivalue::Object::create(type, 0);
  };
  torch::jit::Unpickler unpickler(buffer_reader(data.get(), size), resolve, build, read_record,
                                  c10::Device(c10::kCPU));
  check_tensors(unpickler.parse_ivalue(), record_sizes, pickle);
}

// The checks for a TorchScript file, before torch::jit::load: check_archive,
// then every tensor of constants.pkl and data.pkl against its record. Throws
// Refused, or the reader's own error (an archive it cannot read at all).
// An unpickling error of these partial reads (a type they do not model) is
// left for torch::jit::load to report.
inline void check_torchscript(const std::string &path) {
  caffe2::serialize::PyTorchStreamReader reader{path};
  try {
    check_archive(path, reader);
  } catch (const std::runtime_error &e) {
    throw Refused(e.what());
  }
  for (const auto &[pickle, records] :
       {std::pair<std::string, std::string>{"constants.pkl", "constants/"}, {"data.pkl", "data/"}}) {
    if (!reader.hasRecord(pickle)) continue;
    try {
      check_pickled_tensors(reader, pickle, records);
    } catch (const Refused &) {
      throw;
    } catch (const std::exception &) {
    }
  }
}

}  // namespace vmsn
