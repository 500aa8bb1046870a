// Input checks of the compiled kernels, shared by each extension's single source file.
//
// Bad input is reported without C++ exceptions or string streams: in some environments (seen with
// torch 2.11+cu130 and GCC 13) an extension's std::ostringstream, and so any TORCH_CHECK message,
// crashes the process. A failed check records its number and the function returns an empty result;
// the Python wrapper raises ValueError with the message for that number (last_error() gives it).
#pragma once
#include <cstdint>

namespace {
thread_local int64_t g_error = 0;
int64_t last_error() { return g_error; }
}  // namespace

#define LN_CHECK(cond, code) \
  if (!(cond)) {             \
    g_error = (code);        \
    return {};               \
  }
