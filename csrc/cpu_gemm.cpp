// The GEMMs of cpu_gemm.h: a 4-row x 96-column register tile of float32 accumulators, the weight
// panel streamed from L2, each row's k value (bf16: k pair) broadcast from its row. bf16: AVX512_BF16
// dot products (each adds the products of one bf16 pair of k); float32: FMAs.
#include "cpu_gemm.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_common.h"

namespace mrt {

#if MRT_HAVE_X86
namespace {

#define MRT_GEMM_ISA __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int kRows = 4;            // rows per register tile
constexpr int kBlocks = 6;          // 16-column blocks per panel
// k pairs (float32: k values) per pass over a panel: a 172 KB slice of it, L2-resident
constexpr int64_t kKBlock = 448;
static_assert(kBlocks * 16 == kGemmPanel, "panel width");

// One pass of a register tile over a panel: rows a (k values, or bf16 k pairs as 32-bit words),
// the panel b, the pass's k range; partial sums go through acc_buf between passes
template <class In, class Out>
struct TilePass {
  const In* a;            // the tile's first row
  int64_t lda;            // row stride in In units
  const In* b;            // the panel, [k][kGemmPanel]
  int64_t k0, k1;         // the k values (bf16: pairs) of this pass
  float* acc_buf;         // float32 partial sums between passes, [kRows][kGemmPanel]
  bool first, last;       // the pass starts the sums / ends in the output
  Out* out;
  int64_t ldo;
};

using Tile = TilePass<uint32_t, uint16_t>;

template <int R, int NB>
struct Bf16Tile {
  static MRT_GEMM_ISA void run(const Tile& t) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j)
        acc[r][j] = t.first ? _mm512_setzero_ps() : _mm512_loadu_ps(t.acc_buf + r * kGemmPanel + j * 16);
    const uint32_t* b = t.b + t.k0 * kGemmPanel;
    for (int64_t kp = t.k0; kp < t.k1; ++kp, b += kGemmPanel) {
      __m512bh bv[NB];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + j * 16);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(t.a[r * t.lda + kp]));
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
      }
    }
    if (!t.last) {
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < NB; ++j) _mm512_storeu_ps(t.acc_buf + r * kGemmPanel + j * 16, acc[r][j]);
      return;
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.out + r * t.ldo + j * 16),
                            (__m256i)_mm512_cvtneps_pbh(acc[r][j]));
  }
};

// the float32 pass, with the output's epilogue
struct TileF32 : TilePass<float, float> {
  const float* bias;      // the panel's first column's bias, or null
  bool silu_mul;          // the panel is gate columns then as many up columns: out = silu(gate) * up
  const float* res;       // the tile's first row of the residual added to the product, or null
  int64_t ldr;
};

template <int R, int NB>
struct F32Tile {
  static MRT_AVX512 void run(const TileF32& t) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j) {
        if (!t.first) {
          acc[r][j] = _mm512_loadu_ps(t.acc_buf + r * kGemmPanel + j * 16);
          continue;
        }
        // the sum starts from the residual (+ bias): the residual add costs no pass of its own
        acc[r][j] = t.bias ? _mm512_loadu_ps(t.bias + j * 16) : _mm512_setzero_ps();
        if (t.res) acc[r][j] = _mm512_add_ps(acc[r][j], _mm512_loadu_ps(t.res + r * t.ldr + j * 16));
      }
    const float* b = t.b + t.k0 * kGemmPanel;
    for (int64_t kk = t.k0; kk < t.k1; ++kk, b += kGemmPanel) {
      __m512 bv[NB];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) {
        bv[j] = _mm512_loadu_ps(b + j * 16);
        // in a register, loaded once per k: else GCC folds the load into every row's FMA, and R
        // times the loads (from L1) halve the FMA rate (126 vs 227 GFLOP/s measured on Zen 4)
        asm("" : "+v"(bv[j]));
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(t.a[r * t.lda + kk]);
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
      }
    }
    if (!t.last) {
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < NB; ++j) _mm512_storeu_ps(t.acc_buf + r * kGemmPanel + j * 16, acc[r][j]);
    } else if (t.silu_mul) {
      constexpr int H = NB / 2;   // NB is even here (the packing pairs 16-column blocks)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < H; ++j)
          _mm512_storeu_ps(t.out + r * t.ldo + j * 16, _mm512_mul_ps(cpu::silu_avx512(acc[r][j]), acc[r][j + H]));
    } else {
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < NB; ++j) _mm512_storeu_ps(t.out + r * t.ldo + j * 16, acc[r][j]);
    }
  }
};

// K<R, NB>::run(t) for a register tile of R = rows (1-4) rows and NB = nb (1-6) 16-column blocks
template <template <int, int> class K, int R, class T>
void run_tile_rows(const T& t, int nb) {
  switch (nb) {
    case 6: return K<R, 6>::run(t);
    case 5: return K<R, 5>::run(t);
    case 4: return K<R, 4>::run(t);
    case 3: return K<R, 3>::run(t);
    case 2: return K<R, 2>::run(t);
    default: return K<R, 1>::run(t);
  }
}

template <template <int, int> class K, class T>
void run_tile(const T& t, int rows, int nb) {
  switch (rows) {
    case 4: return run_tile_rows<K, 4>(t, nb);
    case 3: return run_tile_rows<K, 3>(t, nb);
    case 2: return run_tile_rows<K, 2>(t, nb);
    default: return run_tile_rows<K, 1>(t, nb);
  }
}

// A thread's share of a product's work units, claimed one at a time from the front by its owner
// and from the back by threads that have finished their own share (both ends in one word, so a
// unit is claimed exactly once).
class alignas(64) UnitRange {
 public:
  void reset(int64_t n) { ends_.store(static_cast<uint64_t>(n), std::memory_order_relaxed); }
  int64_t take_front() { return take(true); }
  int64_t take_back() { return take(false); }

 private:
  int64_t take(bool front) {
    uint64_t v = ends_.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t f = v >> 32, b = v & 0xFFFFFFFFu;
      if (f >= b) return -1;
      const uint64_t next = front ? ((f + 1) << 32) | b : (f << 32) | (b - 1);
      if (ends_.compare_exchange_weak(v, next, std::memory_order_relaxed)) return static_cast<int64_t>(front ? f : b - 1);
    }
  }
  std::atomic<uint64_t> ends_{0};  // (first unclaimed << 32) | one past the last unclaimed
};

std::atomic<int64_t> g_units_stolen{0};

constexpr int kMaxGemmThreads = 256;
// pieces of a thread's rows per panel when rows are split: a unit is small enough to even out the
// threads' finishing times, large enough that each keeps its rows' A in its L2
constexpr int kRowPieces = 4;

// Runs tile(r, rows, p, k0, k1, acc_buf) over every register tile (rows r .. r+rows-1, panel p) and
// pass (k values [k0, k1)) of an [m, panels] product on `threads` threads. Rows are split when each
// thread gets at least 16 register tiles of them: the threads then read the same weight panels at
// about the same time (one pass over the weights from memory), each kept in its L2 for all its row
// tiles. Few rows: the panels are split, each weight read by one core.
//
// Each thread's share is a list of units (split rows: each panel's share of its rows, in
// kRowPieces pieces; else one of its panels) that it runs in order; a thread done with its own
// share takes units from the end of the others'. A core slowed by another tenant of the host then
// no longer holds the other idle at the end of every GEMM (on the 2-vCPU dev box the two threads
// of the static split finished 2-17% of a GEMM's time apart, varying by the minute). Measured in
// whole fork calls of the small model, alternated in one process: float32 1.019x as the box was,
// 1.026x with a process keeping one core 20% busy (GEMM threads' finishing spread 18% -> 6%);
// bf16 1.007x (only its LM head is ours). A unit runs all its passes over k, so which thread runs
// it never changes a result.
template <class F>
void for_each_tile(int64_t m, int64_t panels, int64_t k_total, int64_t k_block, int num_threads, F&& tile) {
  const int threads = static_cast<int>(std::min<int64_t>(kMaxGemmThreads, std::max<int64_t>(1, num_threads)));
  const bool split_rows = m >= 16 * kRows * threads || panels < 2 * threads;
  const int64_t row_tiles = (m + kRows - 1) / kRows;
  const int pieces = split_rows ? kRowPieces : 1;
  // unit u of thread t's share: panel *p, rows [*r0, *r1)
  auto unit = [&](int t, int64_t u, int64_t* p, int64_t* r0, int64_t* r1) {
    if (!split_rows) {
      *p = panels * t / threads + u;
      *r0 = 0;
      *r1 = m;
      return;
    }
    const int64_t t0 = row_tiles * t / threads, n = row_tiles * (t + 1) / threads - t0, piece = u % pieces;
    *p = u / pieces;
    *r0 = std::min(m, (t0 + n * piece / pieces) * kRows);
    *r1 = std::min(m, (t0 + n * (piece + 1) / pieces) * kRows);
  };
  UnitRange shares[kMaxGemmThreads];
  for (int t = 0; t < threads; ++t)
    shares[t].reset(split_rows ? panels * pieces : panels * (t + 1) / threads - panels * t / threads);
  cpu::parallel_for(threads, threads, [&](int64_t part) {
    thread_local std::vector<float> acc_buf;   // used only when k takes more than one pass
    auto run = [&](int owner, int64_t u) {   // false: the unit has no rows
      int64_t p, r0, r1;
      unit(owner, u, &p, &r0, &r1);
      if (r0 >= r1) return false;
      acc_buf.resize(static_cast<size_t>((r1 - r0 + kRows) * kGemmPanel));
      for (int64_t k0 = 0; k0 < k_total; k0 += k_block) {
        const int64_t k1 = std::min(k_total, k0 + k_block);
        for (int64_t r = r0; r < r1; r += kRows)
          tile(r, static_cast<int>(std::min<int64_t>(kRows, r1 - r)), p, k0, k1,
               acc_buf.data() + (r - r0) * kGemmPanel);
      }
      return true;
    };
    const int me = static_cast<int>(part);
    for (int64_t u; (u = shares[me].take_front()) >= 0;) run(me, u);
    for (int d = 1; d < threads; ++d) {
      const int other = (me + d) % threads;
      for (int64_t u; (u = shares[other].take_back()) >= 0;)
        if (run(other, u)) g_units_stolen.fetch_add(1, std::memory_order_relaxed);
    }
  });
}

}  // namespace
#endif

int64_t gemm_units_stolen() {
#if MRT_HAVE_X86
  return g_units_stolen.load(std::memory_order_relaxed);
#else
  return 0;
#endif
}

bool gemm_bf16_available() {
#if MRT_HAVE_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

void gemm_bf16(const uint16_t* a, int64_t lda, int64_t m, int64_t k, const uint32_t* w_packed, int64_t n,
               uint16_t* out, int64_t ldo, int num_threads) {
  if (!gemm_bf16_available()) throw std::invalid_argument("gemm_bf16 needs AVX512_BF16");
  if (m < 0 || k <= 0 || k % 2 || n <= 0 || n % 16 || lda < k || ldo < n)
    throw std::invalid_argument("gemm_bf16: need k > 0 even, n > 0 a multiple of 16, lda >= k, ldo >= n; got m=" +
                                std::to_string(m) + " k=" + std::to_string(k) + " n=" + std::to_string(n) +
                                " lda=" + std::to_string(lda) + " ldo=" + std::to_string(ldo));
  if (lda % 2 || reinterpret_cast<uintptr_t>(a) % 4)
    throw std::invalid_argument("gemm_bf16: a's rows must start on 4-byte boundaries (even lda, aligned a)");
  if (m == 0) return;
#if MRT_HAVE_X86
  const int64_t kp_total = k / 2, panels = (n + kGemmPanel - 1) / kGemmPanel;
  for_each_tile(m, panels, kp_total, kKBlock, num_threads,
                [&](int64_t r, int rows, int64_t p, int64_t kp0, int64_t kp1, float* acc) {
                  const int64_t c0 = p * kGemmPanel;
                  Tile t{reinterpret_cast<const uint32_t*>(a + r * lda), lda / 2, w_packed + c0 * kp_total, kp0,
                         kp1, acc, kp0 == 0, kp1 == kp_total, out + r * ldo + c0, ldo};
                  run_tile<Bf16Tile>(t, rows, static_cast<int>(std::min<int64_t>(kGemmPanel, n - c0) / 16));
                });
#else
  (void)a, (void)w_packed, (void)out, (void)num_threads;
#endif
}

bool gemm_f32_available() {
#if MRT_HAVE_X86
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

void gemm_f32(const float* a, int64_t lda, int64_t m, int64_t k, const float* w_packed, int64_t n, const float* bias,
              float* out, int64_t ldo, int num_threads, bool silu_mul, const float* residual, int64_t ldr) {
  if (!gemm_f32_available()) throw std::invalid_argument("gemm_f32 needs AVX-512F");
  if (residual && (silu_mul || ldr < n))
    throw std::invalid_argument("gemm_f32: a residual needs ldr >= n and no silu_mul; got ldr=" + std::to_string(ldr));
  const int64_t n_out = silu_mul ? n / 2 : n;
  if (m < 0 || k <= 0 || n <= 0 || n % (silu_mul ? 32 : 16) || lda < k || ldo < n_out)
    throw std::invalid_argument(std::string("gemm_f32: need k > 0, n > 0 a multiple of ") +
                                (silu_mul ? "32 (silu_mul), ldo >= n / 2" : "16, ldo >= n") + ", lda >= k; got m=" +
                                std::to_string(m) + " k=" + std::to_string(k) + " n=" + std::to_string(n) +
                                " lda=" + std::to_string(lda) + " ldo=" + std::to_string(ldo));
  if (m == 0) return;
#if MRT_HAVE_X86
  const int64_t panels = (n + kGemmPanel - 1) / kGemmPanel;
  for_each_tile(m, panels, k, kKBlock, num_threads,
                [&](int64_t r, int rows, int64_t p, int64_t k0, int64_t k1, float* acc) {
                  const int64_t c0 = p * kGemmPanel;
                  TileF32 t{{a + r * lda, lda, w_packed + c0 * k, k0, k1, acc, k0 == 0, k1 == k,
                             out + r * ldo + (silu_mul ? c0 / 2 : c0), ldo},
                            bias ? bias + c0 : nullptr, silu_mul, residual ? residual + r * ldr + c0 : nullptr, ldr};
                  run_tile<F32Tile>(t, rows, static_cast<int>(std::min<int64_t>(kGemmPanel, n - c0) / 16));
                });
#else
  (void)a, (void)w_packed, (void)bias, (void)out, (void)num_threads;
#endif
}

}  // namespace mrt
