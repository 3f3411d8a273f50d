// Strings handed across the C boundary of the runtime's shims: malloc'ed
// copies, freed by the Rust side with vmsn_rt_free_str.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace vmsn {

inline char *copy_string(const std::string &s) {
  char *out = static_cast<char *>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

// The whole message: for an error raised inside a TorchScript graph, the
// cause is on a later line (the Rust side picks it with bundle::first_line).
inline void set_error(char **err, const std::exception &e) {
  *err = copy_string(e.what());
}

}  // namespace vmsn
