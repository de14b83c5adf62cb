"""The fused C++ full-softmax sampler (`mrt_engine._C.sample_full_softmax`) behind a checked API.

`Sampler` uses it on a CPU with AVX-512BW for steps where no row truncates (no top-k, top-p or
min-p): the same two-level inverse CDF as its PyTorch path, in two passes over the logits with the
weights never stored (the PyTorch path makes five vocabulary-sized passes). Rows are independent,
so sampling stays seeded and batch-invariant. `MRT_ENGINE_CPU_SAMPLER=0` turns it off.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    from mrt_engine import _C  # type: ignore[attr-defined]
    _sample = getattr(_C, "sample_full_softmax", None)
except ImportError:  # the extension is optional
    _sample = None

ENV = "MRT_ENGINE_CPU_SAMPLER"


@functools.lru_cache(maxsize=1)
def simd_available() -> bool:
    # the vector path needs AVX-512F and BW, the same check as the fused ops'
    return _sample is not None and bool(_C.cpu_ops_available())


def usable(logits: torch.Tensor) -> bool:
    return (os.environ.get(ENV, "1") != "0" and logits.device.type == "cpu" and logits.dim() == 2
            and logits.dtype in (torch.float32, torch.bfloat16) and logits.stride(1) == 1 and simd_available())


def sample_full(logits: torch.Tensor, inv_t: torch.Tensor, rows: torch.Tensor, uniform: torch.Tensor,
                greedy: torch.Tensor, simd: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [M, V]; inv_t [M] (1/T per logits row, 1 for greedy); per sample row: its logits row
    `rows` [R], `uniform` [R] in [0, 1) and `greedy` [R] bool. Returns (tokens [R] int64, logprobs [R]
    float32), logprob = log_softmax(x / T)[token]."""
    if _sample is None:
        raise ValueError("the C++ extension mrt_engine._C with sample_full_softmax is not built")
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16) or logits.stride(1) != 1 \
            or logits.device.type != "cpu":
        raise ValueError("logits must be a [M, V] float32/bfloat16 CPU tensor with contiguous rows")
    m, v = logits.shape
    r = rows.shape[0]
    inv_t = inv_t.to(torch.float32).contiguous()
    rows = rows.to(torch.int64).contiguous()
    uniform = uniform.to(torch.float32).contiguous()
    greedy = greedy.to(torch.uint8).contiguous()
    if inv_t.shape != (m,) or uniform.shape != (r,) or greedy.shape != (r,):
        raise ValueError(f"expected inv_t [{m}] and uniform, greedy [{r}]; got {tuple(inv_t.shape)}, "
                         f"{tuple(uniform.shape)}, {tuple(greedy.shape)}")
    tokens = torch.empty(r, dtype=torch.int64)
    logprobs = torch.empty(r, dtype=torch.float32)
    _sample(logits.data_ptr(), logits.dtype == torch.bfloat16, m, v, logits.stride(0), inv_t.data_ptr(), r,
            rows.data_ptr(), uniform.data_ptr(), greedy.data_ptr(), tokens.data_ptr(), logprobs.data_ptr(),
            torch.get_num_threads(), simd)
    return tokens, logprobs
