// bf16 GEMM on AVX512_BF16 CPUs: out = a . w^T, the layout of nn.Linear (no bias: its one user, the
// LM head, has none), with w prepacked once into column panels.
//
// Used for the bf16 LM head (mrt_engine/models/packed_linear.py): it writes into the runner's
// logits buffer (oneDNN's prepacked GEMM returns a fresh tensor, and a vocab-sized copy costs more
// than its gain) and runs at ~410 GFLOP/s at Qwen2.5-0.5B's LM head on the 2-core dev box against
// 335-350 for PyTorch's plain bf16 GEMM (dot-product peak 465). Each thread takes a share of the
// rows (or, for few rows, of the column panels); a 4-row x 96-column tile of float32 accumulators
// runs over a weight panel kept in L2.
//
// Every output element is one chain of dot products over k in a fixed order (k blocks of
// 448 pairs, accumulated in float32, rounded to bf16 once), whatever the row count, the
// row's position or the thread split: a row's result does not depend on the batch.
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

}  // namespace mrt
