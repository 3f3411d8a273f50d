#pragma once

namespace vmsn {
// Registers `vmsn::int8_linear` (src/shim/int8_linear.cpp) with the
// dispatcher, once; the load-time rewrite that inserts it calls this first.
void register_int8_linear();
}  // namespace vmsn
