// libtorch warns, once per process, that quantized tensors are deprecated
// (pytorch/pytorch#184982) whenever one is made: when the compiler quantizes
// an int8 weight, and when an int8 artifact's packed weights are unpickled at
// load. The user asked for int8, and the line says nothing they can act on,
// so that one warning is dropped while this guard lives; every other warning
// goes on to the handler that was in place.
#pragma once

#include <c10/util/Exception.h>

#include <string>

namespace vmsn {

class QuietQuantizedDeprecation : public c10::WarningHandler {
 public:
  QuietQuantizedDeprecation() : previous_(c10::WarningUtils::get_warning_handler()), guard_(this) {}
  void process(const c10::Warning &warning) override {
    if (warning.msg().find("quantized tensor creation functions") != std::string::npos) return;
    previous_->process(warning);
  }

 private:
  c10::WarningHandler *previous_;
  c10::WarningUtils::WarningHandlerGuard guard_;
};

}  // namespace vmsn
