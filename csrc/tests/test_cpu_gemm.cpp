// Unit tests of mrt::gemm_bf16 and mrt::gemm_f32 (plain, with bias, the SiLU*up epilogue, a residual) at odd
// shapes against a double-precision reference, with every buffer allocated to its exact size (under the sanitizer build this checks each index the kernel
// reads or writes: row tails, the last k pass, the padded panel, the output's row stride), the
// row split and the panel split, threads taking work from others' shares (results unchanged, bit
// for bit), and bad input.
#include "cpu_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
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

// cpu_gemm.h's float32 layout, [n_pad / 96][k][96]; glu: column c of panel p is gate column 48p + c
// for c < 48, else up column 48p + c - 48 (the last panel: the rest of each, then zeros)
std::vector<float> pack_f32(const std::vector<float>& w, int64_t n, int64_t k, bool glu, std::vector<int64_t>* order) {
  const int64_t p = mrt::kGemmPanel, n_pad = (n + p - 1) / p * p, half = n / 2;
  order->clear();
  if (glu) {
    for (int64_t c0 = 0; c0 < half; c0 += p / 2) {
      const int64_t cols = std::min<int64_t>(p / 2, half - c0);
      for (int64_t c = 0; c < cols; ++c) order->push_back(c0 + c);
      for (int64_t c = 0; c < cols; ++c) order->push_back(half + c0 + c);
    }
  } else {
    for (int64_t c = 0; c < n; ++c) order->push_back(c);
  }
  std::vector<float> out(static_cast<size_t>(n_pad * k), 0.f);
  for (int64_t c = 0; c < n; ++c)
    for (int64_t i = 0; i < k; ++i) out[(c / p) * p * k + i * p + c % p] = w[(*order)[c] * k + i];
  return out;
}

// One float32 product (glu: silu(gate) * up; res: plus a residual [m, n] at row stride n + 2, or
// (res_in_place) in the output buffer itself) with lda = k + pad_a and ldo = n_out + pad_o; returns
// the number of bad elements.
int run_case_f32(int64_t m, int64_t k, int64_t n, int64_t pad_a, int64_t pad_o, bool bias, bool glu, int threads,
                 std::mt19937& rng, bool res = false, bool res_in_place = false) {
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t n_out = glu ? n / 2 : n, lda = k + pad_a, ldo = n_out + pad_o;
  std::vector<float> a(static_cast<size_t>(m * lda)), w(static_cast<size_t>(n * k)), b(static_cast<size_t>(n));
  for (auto& x : a) x = nd(rng);
  for (auto& x : w) x = 0.05f * nd(rng);
  for (auto& x : b) x = nd(rng);
  std::vector<int64_t> order;
  const std::vector<float> packed = pack_f32(w, n, k, glu, &order);
  std::vector<float> b_packed(static_cast<size_t>(n));
  for (int64_t c = 0; c < n; ++c) b_packed[c] = b[order[c]];
  std::vector<float> out(static_cast<size_t>(m * ldo), 7.f);
  const int64_t ldr = res_in_place ? ldo : n + 2;
  std::vector<float> residual(static_cast<size_t>(res && !res_in_place ? m * ldr : 0));
  for (auto& x : residual) x = nd(rng);
  if (res_in_place)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) out[i * ldo + j] = nd(rng);
  const std::vector<float> res_before = res_in_place ? out : residual;
  mrt::gemm_f32(a.data(), lda, m, k, packed.data(), n, bias ? b_packed.data() : nullptr, out.data(), ldo, threads, glu,
                res ? (res_in_place ? out.data() : residual.data()) : nullptr, res ? ldr : 0);
  auto dot = [&](int64_t i, int64_t col, double* scale) {
    double ref = (bias ? b[col] : 0.0) + (res ? res_before[i * ldr + col] : 0.0);
    *scale = std::fabs(ref);
    for (int64_t q = 0; q < k; ++q) {
      const double p = static_cast<double>(a[i * lda + q]) * w[col * k + q];
      ref += p;
      *scale += std::fabs(p);
    }
    return ref;
  };
  int bad = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n_out; ++j) {
      double ref, bound;
      if (glu) {
        double sg, su;
        const double g = dot(i, j, &sg), u = dot(i, n_out + j, &su), silu = g / (1.0 + std::exp(-g));
        ref = silu * u;
        bound = 1e-6 * (1.1 * std::fabs(u) * sg + std::fabs(silu) * su) + 1e-6 * std::fabs(ref) + 1e-30;
      } else {
        double scale;
        ref = dot(i, j, &scale);
        bound = 1e-6 * scale + 1e-6 * std::fabs(ref) + 1e-30;
      }
      if (!(std::fabs(out[i * ldo + j] - ref) <= bound)) ++bad;
    }
    for (int64_t j = n_out; j < ldo; ++j) bad += out[i * ldo + j] != 7.f;  // untouched
  }
  return bad;
}

// The float32 product (glu or a residual in place) and, on AVX512_BF16 CPUs, the bf16 one of the
// same inputs on `threads` threads, as raw bits, for comparing thread counts.
std::vector<uint32_t> product_bits(int64_t m, int64_t k, int64_t n, bool glu, bool res, int threads) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> a(static_cast<size_t>(m * k)), w(static_cast<size_t>(n * k)), out(static_cast<size_t>(m * n));
  for (auto& x : a) x = nd(rng);
  for (auto& x : w) x = 0.05f * nd(rng);
  for (auto& x : out) x = nd(rng);
  std::vector<int64_t> order;
  const std::vector<float> packed = pack_f32(w, n, k, glu, &order);
  mrt::gemm_f32(a.data(), k, m, k, packed.data(), n, nullptr, out.data(), n, threads, glu, res ? out.data() : nullptr,
                res ? n : 0);
  std::vector<uint32_t> bits(out.size());
  std::memcpy(bits.data(), out.data(), sizeof(float) * out.size());
  if (!mrt::gemm_bf16_available()) return bits;
  std::vector<uint16_t> a16(a.size()), w16(w.size()), out16(static_cast<size_t>(m * n));
  for (size_t i = 0; i < a.size(); ++i) a16[i] = to_bf16(a[i]);
  for (size_t i = 0; i < w.size(); ++i) w16[i] = to_bf16(w[i]);
  const std::vector<uint32_t> packed16 = pack(w16, n, k);
  mrt::gemm_bf16(a16.data(), k, m, k, packed16.data(), n, out16.data(), n, threads);
  bits.insert(bits.end(), out16.begin(), out16.end());
  return bits;
}

// More threads than cores: threads finish their own share at different times and take units of
// the others' (from the end); every result must be what one thread computes, bit for bit.
void check_stolen_units_change_nothing() {
  const int64_t stolen_before = mrt::gemm_units_stolen();
  // (m, k, n, glu, residual): rows split (k in three passes), panels split (few rows)
  const int64_t cases[][5] = {{257, 900, 1056, 0, 1}, {257, 300, 1056, 1, 0}, {9, 130, 1056, 0, 0}};
  for (int round = 0; round < 5; ++round)
    for (const auto& c : cases)
      for (int threads : {3, 8})
        CHECK(product_bits(c[0], c[1], c[2], c[3], c[4], threads) == product_bits(c[0], c[1], c[2], c[3], c[4], 1));
  CHECK(mrt::gemm_units_stolen() > stolen_before);
  std::printf("units stolen: %lld\n", static_cast<long long>(mrt::gemm_units_stolen() - stolen_before));
}

}  // namespace

int main() {
  std::mt19937 rng(5);
  if (mrt::gemm_f32_available()) {
    // (m, k, n): row tails, k across the 448-value pass (900), panels of 16-96 columns (glu: I % 48
    // of 0, 16, 32), a weight split over panels for few rows
    const int64_t shapes_f32[][3] = {{1, 1, 32}, {3, 30, 96}, {5, 900, 160}, {7, 64, 64}, {130, 96, 224},
                                     {257, 500, 96}, {9, 130, 1056}};
    for (const auto& s : shapes_f32)
      for (int threads : {1, 2, 3})
        for (int variant = 0; variant < 4; ++variant) {
          const bool bias = variant & 1, glu = variant & 2;
          CHECK_EQ(run_case_f32(s[0], s[1], s[2], 0, 0, bias, glu, threads, rng), 0);
          CHECK_EQ(run_case_f32(s[0], s[1], s[2], 3, 5, bias, glu, threads, rng), 0);
          if (!glu) {
            CHECK_EQ(run_case_f32(s[0], s[1], s[2], 0, 0, bias, false, threads, rng, true), 0);
            CHECK_EQ(run_case_f32(s[0], s[1], s[2], 2, 3, bias, false, threads, rng, true, true), 0);
          }
        }
    CHECK_EQ(run_case_f32(0, 8, 16, 0, 0, false, false, 2, rng), 0);  // no rows: nothing to do
    check_stolen_units_change_nothing();
    std::vector<float> a(64, 0.f), w(96 * 4, 0.f), out(64, 0.f);
    CHECK_THROWS(mrt::gemm_f32(a.data(), 4, 1, 4, w.data(), 20, nullptr, out.data(), 20, 1), std::invalid_argument);
    CHECK_THROWS(mrt::gemm_f32(a.data(), 4, 1, 4, w.data(), 48, nullptr, out.data(), 24, 1, true),
                 std::invalid_argument);
    CHECK_THROWS(mrt::gemm_f32(a.data(), 3, 1, 4, w.data(), 16, nullptr, out.data(), 16, 1), std::invalid_argument);
    CHECK_THROWS(mrt::gemm_f32(a.data(), 4, 1, 4, w.data(), 32, nullptr, out.data(), 8, 1, true),
                 std::invalid_argument);
    CHECK_THROWS(mrt::gemm_f32(a.data(), 4, 1, 4, w.data(), 32, nullptr, out.data(), 32, 1, false, out.data(), 16),
                 std::invalid_argument);
    CHECK_THROWS(mrt::gemm_f32(a.data(), 4, 1, 4, w.data(), 32, nullptr, out.data(), 16, 1, true, out.data(), 32),
                 std::invalid_argument);
  } else {
    CHECK_THROWS(mrt::gemm_f32(nullptr, 2, 1, 2, nullptr, 16, nullptr, nullptr, 16, 1), std::invalid_argument);
  }
  if (!mrt::gemm_bf16_available()) {
    CHECK_THROWS(mrt::gemm_bf16(nullptr, 2, 1, 2, nullptr, 16, nullptr, 16, 1), std::invalid_argument);
    return CHECK_MAIN_RESULT();
  }
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
