// Minimal assertion harness for the C++ unit tests: CHECK(cond), CHECK_EQ(a, b), CHECK_THROWS(expr,
// Exception). Failures are counted and printed; main() returns the count, so ctest sees nonzero.
#pragma once

#include <iostream>
#include <sstream>

namespace check {
inline int& failures() {
  static int n = 0;
  return n;
}
inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::cerr << file << ":" << line << ": FAILED " << what << "\n";
}
}  // namespace check

#define CHECK(cond)                                          \
  do {                                                       \
    if (!(cond)) check::fail(__FILE__, __LINE__, #cond);     \
  } while (0)

#define CHECK_EQ(a, b)                                                            \
  do {                                                                            \
    const auto& va_ = (a);                                                        \
    const auto& vb_ = (b);                                                        \
    if (!(va_ == vb_)) {                                                          \
      std::ostringstream os_;                                                     \
      os_ << #a << " == " << #b << " (" << va_ << " vs " << vb_ << ")";           \
      check::fail(__FILE__, __LINE__, os_.str());                                 \
    }                                                                             \
  } while (0)

#define CHECK_THROWS(expr, Exc)                                                           \
  do {                                                                                    \
    bool thrown_ = false;                                                                 \
    try {                                                                                 \
      (void)(expr);                                                                       \
    } catch (const Exc&) {                                                                \
      thrown_ = true;                                                                     \
    } catch (...) {                                                                       \
    }                                                                                     \
    if (!thrown_) check::fail(__FILE__, __LINE__, #expr " did not throw " #Exc);          \
  } while (0)

#define CHECK_MAIN_RESULT()                                                       \
  (check::failures() ? (std::cerr << check::failures() << " check(s) failed\n", 1) \
                     : (std::cout << "all checks passed\n", 0))
