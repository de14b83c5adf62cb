// Unit tests of mrt::sample_full_softmax: the vector path against the scalar path on random
// logits (under the sanitizer build this also checks every index it reads), greedy rows take the
// first argmax, stratified uniforms reproduce the softmax frequencies, and bad input throws.
#include "cpu_sampler.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.h"

namespace {
bool simd_ok() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}
}  // namespace

int main() {
  const int64_t M = 5, V = 1001, R = 40;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::uniform_real_distribution<float> ud(0.f, 0.999f);
  std::vector<float> logits(M * V), inv_t(M, 0.8f), u(R);
  for (float& x : logits) x = nd(rng);
  logits[2 * V + 17] = logits[2 * V + 900] = 50.f;  // a tie: the first id wins
  std::vector<int64_t> rows(R);
  std::vector<uint8_t> greedy(R, 0);
  for (int64_t r = 0; r < R; ++r) rows[r] = r % M, u[r] = ud(rng);
  greedy[2] = 1;  // row 2 samples logits row 2 greedily
  std::vector<int64_t> tok(R), tok2(R);
  std::vector<float> lp(R), lp2(R);
  mrt::sample_full_softmax(logits.data(), false, M, V, V, inv_t.data(), R, rows.data(), u.data(), greedy.data(),
                           tok.data(), lp.data(), 2, false);
  CHECK_EQ(tok[2], 17);
  for (int64_t r = 0; r < R; ++r) CHECK(tok[r] >= 0 && tok[r] < V && lp[r] <= 0.f && std::isfinite(lp[r]));
  if (simd_ok()) {
    mrt::sample_full_softmax(logits.data(), false, M, V, V, inv_t.data(), R, rows.data(), u.data(), greedy.data(),
                             tok2.data(), lp2.data(), 1, true);
    int same = 0;
    for (int64_t r = 0; r < R; ++r) {
      same += tok[r] == tok2[r];
      CHECK(std::fabs(lp[r] - lp2[r]) < 1e-4f || tok[r] != tok2[r]);
    }
    CHECK(same >= R - 1);  // a uniform within float rounding of a CDF edge may differ
  }
  {  // stratified uniforms over a 4-token row reproduce softmax(x / T) frequencies
    const std::vector<float> x{0.f, 1.f, 2.f, -1.f};
    const float it = 1.f;
    const int64_t n = 4000;
    std::vector<int64_t> rr(n, 0), t(n);
    std::vector<float> uu(n), l(n);
    std::vector<uint8_t> g(n, 0);
    for (int64_t i = 0; i < n; ++i) uu[i] = (static_cast<float>(i) + 0.5f) / static_cast<float>(n);
    mrt::sample_full_softmax(x.data(), false, 1, 4, 4, &it, n, rr.data(), uu.data(), g.data(), t.data(), l.data(), 2,
                             false);
    double z = 0;
    for (float v : x) z += std::exp(v);
    for (int k = 0; k < 4; ++k) {
      int64_t c = 0;
      for (int64_t v : t) c += v == k;
      CHECK(std::fabs(static_cast<double>(c) - n * std::exp(x[k]) / z) <= 1.5);
    }
  }
  const float bad_t = 0.f;
  int64_t bad_row = M;
  CHECK_THROWS(mrt::sample_full_softmax(logits.data(), false, M, V, V, inv_t.data(), 1, &bad_row, u.data(),
                                        greedy.data(), tok.data(), lp.data(), 1, false),
               std::invalid_argument);
  CHECK_THROWS(mrt::sample_full_softmax(logits.data(), false, 1, V, V, &bad_t, 1, rows.data(), u.data(),
                                        greedy.data(), tok.data(), lp.data(), 1, false),
               std::invalid_argument);
  CHECK_THROWS(mrt::sample_full_softmax(logits.data(), false, M, V, V - 1, inv_t.data(), 1, rows.data(), u.data(),
                                        greedy.data(), tok.data(), lp.data(), 1, false),
               std::invalid_argument);
  return check::failures();
}
