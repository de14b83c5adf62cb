// Unit tests of mrt::gemm_bf16 at odd shapes against a double-precision reference, with every
// buffer allocated to its exact size (under the sanitizer build this checks each index the kernel
// reads or writes: row tails, the last k pass, the padded panel, the output's row stride), the
// row split and the panel split, and bad input.
#include "cpu_gemm.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.h"

namespace {

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
double from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// cpu_gemm.h's layout: panels of kGemmPanel columns (the last zero-padded), [k/2][kGemmPanel] words
std::vector<uint32_t> pack(const std::vector<uint16_t>& w, int64_t n, int64_t k) {
  const int64_t p = mrt::kGemmPanel, n_pad = (n + p - 1) / p * p, kp = k / 2;
  std::vector<uint32_t> out(static_cast<size_t>(n_pad * kp), 0u);
  for (int64_t c = 0; c < n; ++c)
    for (int64_t i = 0; i < kp; ++i)
      out[(c / p) * p * kp + i * p + c % p] = static_cast<uint32_t>(w[c * k + 2 * i]) |
                                              (static_cast<uint32_t>(w[c * k + 2 * i + 1]) << 16);
  return out;
}

// One product with lda = k + pad_a and ldo = n + pad_o; returns the number of bad elements.
int run_case(int64_t m, int64_t k, int64_t n, int64_t pad_a, int64_t pad_o, int threads, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t lda = k + pad_a, ldo = n + pad_o;
  std::vector<uint16_t> a(static_cast<size_t>(m * lda)), w(static_cast<size_t>(n * k));
  for (auto& x : a) x = to_bf16(nd(rng));
  for (auto& x : w) x = to_bf16(0.05f * nd(rng));
  const std::vector<uint32_t> packed = pack(w, n, k);
  std::vector<uint16_t> out(static_cast<size_t>(m * ldo), to_bf16(7.f));
  mrt::gemm_bf16(a.data(), lda, m, k, packed.data(), n, out.data(), ldo, threads);
  int bad = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0.0, scale = 0.0;
      for (int64_t q = 0; q < k; ++q) {
        const double p = from_bf16(a[i * lda + q]) * from_bf16(w[j * k + q]);
        ref += p;
        scale += std::fabs(p);
      }
      const double got = from_bf16(out[i * ldo + j]);
      if (!(std::fabs(got - ref) <= std::ldexp(std::fabs(ref), -8) + 1e-6 * scale + 1e-30)) ++bad;
    }
    for (int64_t j = n; j < ldo; ++j) bad += out[i * ldo + j] != to_bf16(7.f);  // untouched
  }
  return bad;
}

}  // namespace

int main() {
  if (!mrt::gemm_bf16_available()) {
    CHECK_THROWS(mrt::gemm_bf16(nullptr, 2, 1, 2, nullptr, 16, nullptr, 16, 1), std::invalid_argument);
    return CHECK_MAIN_RESULT();
  }
  std::mt19937 rng(5);
  // (m, k, n): row tails of 1-3, k across the 448-pair pass (900, 2000), panels of 16-96 columns
  const int64_t shapes[][3] = {{1, 2, 16}, {3, 30, 80}, {5, 900, 112}, {7, 64, 96}, {130, 96, 208},
                               {257, 2000, 48}, {9, 130, 1040}};
  for (const auto& s : shapes)
    for (int threads : {1, 2, 3}) {
      CHECK_EQ(run_case(s[0], s[1], s[2], 0, 0, threads, rng), 0);
      CHECK_EQ(run_case(s[0], s[1], s[2], 4, 5, threads, rng), 0);
    }
  CHECK_EQ(run_case(0, 8, 16, 0, 0, 2, rng), 0);  // no rows: nothing to do
  std::vector<uint16_t> a(64, 0), out(64, 0);
  std::vector<uint32_t> w(96 * 2, 0);
  CHECK_THROWS(mrt::gemm_bf16(a.data(), 4, 1, 3, w.data(), 16, out.data(), 16, 1), std::invalid_argument);
  CHECK_THROWS(mrt::gemm_bf16(a.data(), 4, 1, 4, w.data(), 20, out.data(), 20, 1), std::invalid_argument);
  CHECK_THROWS(mrt::gemm_bf16(a.data(), 2, 1, 4, w.data(), 16, out.data(), 16, 1), std::invalid_argument);
  CHECK_THROWS(mrt::gemm_bf16(a.data() + 1, 4, 1, 4, w.data(), 16, out.data(), 16, 1),
               std::invalid_argument);
  return CHECK_MAIN_RESULT();
}
