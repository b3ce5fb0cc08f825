// Refusals with messages built without iostreams. c10's TORCH_CHECK formats its message through a
// std::ostringstream in the extension's own code; on the H200 machine's toolchain (/opt/gcc) the built _C held
// its own copy of libstdc++'s number formatting (std::ostream::_M_insert<long>), which segfaulted the first time
// a refusal printed an int64 (merge_ given a B of the wrong rank: bench/results/gpu-2026-12-04-H200, cuda-gdb).
// These macros throw the same c10 errors with the same text as TORCH_CHECK_VALUE / TORCH_CHECK /
// TORCH_CHECK_INDEX (the arguments concatenated as c10::str would print them), formatted with std::to_string and
// snprintf; c10::Error (built in libc10) does the rest. Every argument type the checks pass has an overload below:
// another is a compile error, not a stream. (torch's own inline checks, e.g. a data_ptr<T> of another dtype, still
// format through c10::str: the ops check dtypes, shapes and devices first, with these.)
#pragma once

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace lora_ext {
namespace msg {

inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, char v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? '1' : '0'; }  // as an ostream without boolalpha
template <typename T, typename std::enable_if<std::is_integral<T>::value && !std::is_same<T, bool>::value &&
                                                  !std::is_same<T, char>::value,
                                              int>::type = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}
inline void put(std::string& s, double v) {  // an ostream's default: 6 significant digits, %g
  char buf[40];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
inline void put(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, c10::DeviceType v) { s += c10::DeviceTypeName(v, /*lower_case=*/true); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }
inline void put(std::string& s, c10::IntArrayRef v) {  // "[2, 3]", as c10's
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

template <typename... Args>
std::string str(const Args&... args) {
  std::string s;
  (put(s, args), ...);
  return s;
}

}  // namespace msg
}  // namespace lora_ext

#define LORA_CHECK_AS(error, cond, ...)                                                                  \
  do {                                                                                                   \
    if (C10_UNLIKELY(!(cond))) {                                                                         \
      throw ::c10::error({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},                          \
                         ::lora_ext::msg::str(__VA_ARGS__));                                             \
    }                                                                                                    \
  } while (0)
#define LORA_CHECK(cond, ...) LORA_CHECK_AS(Error, cond, __VA_ARGS__)
#define LORA_CHECK_VALUE(cond, ...) LORA_CHECK_AS(ValueError, cond, __VA_ARGS__)
#define LORA_CHECK_INDEX(cond, ...) LORA_CHECK_AS(IndexError, cond, __VA_ARGS__)
