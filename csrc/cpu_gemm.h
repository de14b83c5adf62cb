// GEMMs out = a . w^T (the layout of nn.Linear) with w prepacked once into column panels: bf16 on
// AVX512_BF16 CPUs (no bias: its one user, the LM head, has none), float32 on AVX-512F CPUs (with an
// optional bias).
//
// The bf16 one is used for the bf16 LM head (mrt_engine/models/packed_linear.py): it writes into the runner's
// logits buffer (oneDNN's prepacked GEMM returns a fresh tensor, and a vocab-sized copy costs more
// than its gain) and runs at ~410 GFLOP/s at Qwen2.5-0.5B's LM head on the 2-core dev box against
// 335-350 for PyTorch's plain bf16 GEMM (dot-product peak 465). Each thread takes a share of the
// rows (or, for few rows, of the column panels); a 4-row x 96-column tile of float32 accumulators
// runs over a weight panel kept in L2.
//
// Every output element is one chain of dot products over k in a fixed order (k blocks of
// 448 pairs, accumulated in float32, rounded to bf16 once; float32: from the bias, k in blocks of
// 448), whatever the row count, the row's position, the thread split or which thread ends up
// running it (a thread done early takes work from the others'): a row's result does not depend
// on the batch.
//
// The float32 one is used for every float32 linear layer and LM head (packed_linear.py): its
// 4 x 96 tile runs at 94-97% of the FMA peak at the small benchmark model's shapes (M = 256, hot;
// Zen 4 dev box: 219-228 GFLOP/s of 234), about oneDNN's rate; what it adds is its epilogue (bias,
// residual, SiLU*up).
#pragma once

#include <cstdint>

namespace mrt {

constexpr int64_t kGemmPanel = 96;      // output columns per packed panel (6 x 16 lanes)

// Packed weight layout, made by the caller from w [n, k] bf16 (n % 16 == 0, k even): panels of
// kGemmPanel columns (the last zero-padded), each [k / 2][kGemmPanel] 32-bit words holding the
// pair (w[col][2p], w[col][2p + 1]) (low half first): as int32, w.view(int32) [n_pad, k/2] viewed
// [n_pad / 96, 96, k / 2] and transposed to [n_pad / 96, k / 2, 96].
//
// a [m, k] bf16 (row stride lda, rows on 4-byte boundaries), out [m, n] bf16 (row stride ldo).
void gemm_bf16(const uint16_t* a, int64_t lda, int64_t m, int64_t k, const uint32_t* w_packed, int64_t n,
               uint16_t* out, int64_t ldo, int num_threads);

bool gemm_bf16_available();

// Float32 layout: panels of kGemmPanel columns (the last zero-padded), each [k][kGemmPanel]: w [n, k]
// viewed [n_pad / 96, 96, k] and transposed to [n_pad / 96, k, 96]. a [m, k] (row stride lda), out
// [m, n] (row stride ldo), bias [n] or null, in the packed column order; n % 16 == 0.
//
// silu_mul: w is a gated MLP's gate and up projections, [n / 2] rows each, packed with each panel
// holding 48 gate columns then the same 48 up columns (the last panel: the rest of both, n / 2 % 16
// == 0); out [m, n / 2] = silu(a . gate^T) * (a . up^T), in the epilogue of the product (the
// [m, n] product is never written).
//
// residual [m, n] (row stride ldr), or null: out = residual + bias + a . w^T, the sum started from
// residual + bias (not with silu_mul). out may be residual itself (each element is read by the
// first pass over k and written by the last, by the same tile).
void gemm_f32(const float* a, int64_t lda, int64_t m, int64_t k, const float* w_packed, int64_t n, const float* bias,
              float* out, int64_t ldo, int num_threads, bool silu_mul = false, const float* residual = nullptr,
              int64_t ldr = 0);

bool gemm_f32_available();

// Work units (with rows) of both GEMMs run by a thread that took them from another's share, since the process
// started (see for_each_tile in cpu_gemm.cpp; for the tests, which check that stealing changes no result).
int64_t gemm_units_stolen();

}  // namespace mrt
