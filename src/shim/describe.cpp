// What a TorchScript file says about itself: its forward schema and, for
// artifacts written by vit-msn, the extra file that describes them. tch has no
// binding for either. Errors come back as a malloc'ed message, never as an
// exception across the C boundary.
#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace {
char *copy_string(const std::string &s) {
  char *out = static_cast<char *>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}
}  // namespace

extern "C" {

void vmsn_rt_free_str(char *s) { std::free(s); }

// Loads `path` on the CPU. On success returns 0 and sets *schema to the
// forward schema and *extra to the contents of `extra_name` (empty if the
// file has none). On failure returns 1 and sets *err.
int vmsn_rt_describe(const char *path, const char *extra_name, char **schema,
                     char **extra, char **err) {
  try {
    torch::jit::ExtraFilesMap files{{extra_name, ""}};
    auto module = torch::jit::load(path, c10::Device(c10::kCPU), files);
    auto method = module.find_method("forward");
    if (!method) throw std::runtime_error("the module has no forward method");
    std::ostringstream s;
    s << method->function().getSchema();
    *schema = copy_string(s.str());
    *extra = copy_string(files[extra_name]);
    return 0;
  } catch (const std::exception &e) {
    std::string message = e.what();
    *err = copy_string(message.substr(0, message.find('\n')));
  }
  return 1;
}
}
