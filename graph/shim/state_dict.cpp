// Reading a `torch.save` state dict (`pytorch_model.bin`) safely. libtorch's
// reader trusts the file, and a few hostile bytes go a long way:
// - a tensor stated larger than the record that holds its data is read past
//   the buffer when touched (a segfault): libtorch sizes each storage by the
//   pickle's claim, not by its record. Python's torch.load checks each
//   record's size; this reader unpickles with its own record reader, so it
//   knows each record's real size, and checks every tensor against it before
//   handing it over;
// - a memo index in the pickle (LONG_BINPUT 4000000000) makes the unpickler
//   grow its memo table to that size (tens of GB from a 2 KB file); the
//   pickle is scanned first, and refused when an index exceeds its length
//   (a pickler numbers its memo entries from 0, one per PUT);
// - a record whose stated size exceeds the whole file is refused before it
//   is read.
// tch's loadz_multi also panics (across the C boundary: an abort) on a tensor
// name that is not UTF-8; names are handed over as bytes. Errors come back as
// a malloc'ed message, never as an exception across the C boundary.
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

namespace {

// Walks a pickle's opcodes (protocols 0 to 5) without building anything, and
// throws when a memo index exceeds the pickle's length, or the pickle is
// truncated or holds an unknown opcode.
void check_pickle(const uint8_t *p, size_t n) {
  size_t i = 0;
  auto need = [&](size_t k) {
    if (n - i < k) throw std::runtime_error("data.pkl is truncated");
  };
  auto little = [&](size_t k) {
    need(k);
    uint64_t v = 0;
    for (size_t b = 0; b < k; ++b) v |= static_cast<uint64_t>(p[i + b]) << (8 * b);
    i += k;
    return v;
  };
  auto skip = [&](uint64_t k) {
    if (k > n - i) throw std::runtime_error("data.pkl is truncated");
    i += static_cast<size_t>(k);
  };
  auto line = [&]() {
    size_t start = i;
    while (i < n && p[i] != '\n') ++i;
    if (i == n) throw std::runtime_error("data.pkl is truncated");
    ++i;
    return std::string(reinterpret_cast<const char *>(p + start), i - start - 1);
  };
  auto memo_index = [&](uint64_t index) {
    if (index > n)
      throw std::runtime_error("data.pkl: memo index " + std::to_string(index) +
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
          if (c < '0' || c > '9') throw std::runtime_error("data.pkl: bad memo index");
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
        throw std::runtime_error("data.pkl: unknown pickle opcode " + std::to_string(op));
    }
  }
  throw std::runtime_error("data.pkl has no STOP");
}

// The checks that need the archive itself, before libtorch reads it.
void check_archive(const char *path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw std::runtime_error("cannot open the file");
  const uint64_t file_size = static_cast<uint64_t>(file.tellg());
  caffe2::serialize::PyTorchStreamReader reader{std::string(path)};
  for (const std::string &name : reader.getAllRecords()) {
    if (reader.getRecordSize(name) > file_size)
      throw std::runtime_error("record `" + name + "` states " +
                               std::to_string(reader.getRecordSize(name)) +
                               " bytes, more than the whole file's " +
                               std::to_string(file_size));
  }
  if (!reader.hasRecord("data.pkl")) throw std::runtime_error("the archive holds no data.pkl");
  auto [data, size] = reader.getRecord("data.pkl");
  check_pickle(static_cast<const uint8_t *>(data.get()), size);
}

char *copy_message(const std::string &message) {
  char *out = static_cast<char *>(std::malloc(message.size() + 1));
  if (out != nullptr) std::memcpy(out, message.c_str(), message.size() + 1);
  return out;
}

// Whether every element `t` addresses lies within the `record_bytes` bytes
// of data at its storage's start.
bool fits_record(const at::Tensor &t, uint64_t record_bytes) {
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

// Unpickles data.pkl into (name, tensor) pairs, checking each tensor against
// the size of the record its data came from.
std::vector<std::pair<std::string, at::Tensor>> load_checked(const char *path) {
  check_archive(path);
  caffe2::serialize::PyTorchStreamReader reader{std::string(path)};
  auto [pickle, pickle_size] = reader.getRecord("data.pkl");
  size_t position = 0;
  auto read_pickle = [&, pickle_size = pickle_size](char *buffer, size_t n) {
    size_t k = std::min(n, pickle_size - position);
    std::memcpy(buffer, static_cast<const char *>(pickle.get()) + position, k);
    position += k;
    return k;
  };
  // Each record's real size, by the address its data was loaded at.
  std::map<const void *, uint64_t> record_sizes;
  auto read_record = [&](const std::string &key) {
    auto [data, size] = reader.getRecord("data/" + key);
    record_sizes[data.get()] = size;
    return std::move(data);
  };
  torch::jit::Unpickler unpickler(read_pickle, nullptr, nullptr, read_record, c10::Device(c10::kCPU));
  c10::IValue value = unpickler.parse_ivalue();
  if (!value.isGenericDict()) throw std::runtime_error("data.pkl holds " + value.tagKind() + ", not a state dict");
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto &item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor())
      throw std::runtime_error("data.pkl is not a state dict (names to tensors)");
    const std::string &name = item.key().toStringRef();
    const at::Tensor &tensor = item.value().toTensor();
    auto record = tensor.has_storage() ? record_sizes.find(tensor.storage().data())
                                       : record_sizes.end();
    uint64_t bytes = record == record_sizes.end() ? 0 : record->second;
    if (tensor.numel() > 0 && (record == record_sizes.end() || !fits_record(tensor, bytes)))
      throw std::runtime_error("tensor `" + name + "`: its shape " + c10::str(tensor.sizes()) +
                               " (strides " + c10::str(tensor.strides()) + ", offset " +
                               std::to_string(tensor.storage_offset()) +
                               ") does not fit the " + std::to_string(bytes) +
                               " bytes the file holds for it");
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
    *err = copy_message(e.what());
  }
  return -1;
}
}
