// Fused elementwise ops of the bfloat16 decoder layer on the CPU, each one pass instead of 3-4
// PyTorch ops, with the same roundings as the PyTorch/transformers sequence they replace:
//   rms_norm: bf16: y = bf16(x * rsqrt(mean(x^2) + eps)) in float32, then bf16(w * y); float32:
//   w * (x * rsqrt(mean(x^2) + eps)) (the sum of squares in another order than PyTorch's, so it
//   matches to rounding, not bit for bit);
//   silu_mul_bf16: bf16(bf16(silu(g)) * u);
//   rope: rotate-half RoPE, out = r(r(x * cos) + r(rot(x) * sin)) with r the rounding to the
//   tensor dtype after each op (float32 or bf16), as PyTorch's elementwise ops round.
#pragma once

#include <cstdint>

namespace mrt {

// x, out [rows, hidden] with row strides (elements), w [hidden]: all bf16 (bf16 = true) or float32.
void rms_norm(const void* x, int64_t x_stride, const void* w, void* out, int64_t out_stride, int64_t rows,
              int64_t hidden, float eps, bool bf16, int num_threads);

// g, u, out [rows, n] bf16 with row strides (elements).
void silu_mul_bf16(const uint16_t* g, const uint16_t* u, int64_t in_stride, uint16_t* out, int64_t out_stride,
                   int64_t rows, int64_t n, int num_threads);

// x: rows of `heads` vectors of `dh` (dh % 16 == 0), row stride x_stride, head stride dh; cos, sin
// [rows, dh] contiguous; out [rows, heads, dh] contiguous; all float32 (bf16 = false) or bf16.
void rope(const void* x, int64_t x_stride, const void* cos, const void* sin, void* out, int64_t rows,
          int64_t heads, int64_t dh, bool bf16, int num_threads);

// Copies row i of k and v ([n, row] elements of `elem_size` bytes, row strides k_stride/v_stride)
// into row slots[i] of k_cache / v_cache ([num_slots, row], contiguous), rows split over up to
// num_threads threads. Throws on a bad slot (before writing anything).
void store_kv_rows(const void* k, int64_t k_stride, const void* v, int64_t v_stride, void* k_cache, void* v_cache,
                   const int64_t* slots, int64_t n, int64_t row, int64_t elem_size, int64_t num_slots,
                   int num_threads = 1);

bool cpu_ops_available();

}  // namespace mrt
