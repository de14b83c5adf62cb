// Sampling from full softmax(x / T) rows on the CPU, fused: the engine's common RL case (no top-k,
// top-p or min-p). The same two-level inverse CDF as the PyTorch sampler (mrt_engine/sampling.py):
// block sums of w = exp((x - max) / T) over blocks of C ~ sqrt(V) ids, the block holding u * total,
// then the id inside it. Here the weights are never stored: one pass for the max, one for the
// block sums, and C weights recomputed in the chosen block. Rows are independent (batch-invariant).
#pragma once

#include <cstdint>

namespace mrt {

// logits [num_logit_rows, vocab] (float32 if !bf16 else bfloat16) with row stride `row_stride`
// (elements); inv_t [num_logit_rows] (1/T, > 0). Sample row r draws from logits row rows[r] with
// the uniform u[r] in [0, 1), or takes its first argmax if greedy[r] != 0. Writes tokens[r] and
// logprobs[r] = (x[tok] - max) * inv_t - log(total), max being the row's largest logit. Throws
// std::invalid_argument on bad sizes/rows.
void sample_full_softmax(const void* logits, bool bf16, int64_t num_logit_rows, int64_t vocab,
                         int64_t row_stride, const float* inv_t, int64_t num_rows, const int64_t* rows,
                         const float* u, const uint8_t* greedy, int64_t* tokens, float* logprobs,
                         int num_threads, bool simd);

}  // namespace mrt
