"""The decoder layer's fused elementwise ops for CUDA: mrt_engine.kernels' rms_norm, rope_, silu_mul.

On the first lent H200 (README, "First GPU run") the GPU was busy 23% of the fork phase: the
torch path launches ~28 kernels per layer, and the host could not launch them as fast as the GPU
ran them. These take a 16-bit RMSNorm from 4 launches to 1 (twice per layer), RoPE from 5 to 1 and
SiLU * up from 2 to 1. They round where the torch path rounds, so results equal it bit for bit
(the kernel tests demand it for RoPE and nearly all elements of the others; a last-bit
difference in an fp32 rsqrt or exp can rarely round a 16-bit result the other way).

In deterministic mode the layers' GEMMs run through `batch_invariant_linear` (kernels/matmul.py):
fixed tiles, so a row's logprobs do not depend on the rows beside it.

`FORCE = True` (tests) runs them on CPU tensors too, under the Triton interpreter;
`ENABLED = False` (or MRT_TRITON_LAYER_OPS=0 at import) keeps CUDA on the torch path, which
`bench_branched_gpu.py --profile` uses to time both in one process.
"""
from __future__ import annotations

import os

import torch

ENV = "MRT_TRITON_LAYER_OPS"
ENABLED = os.environ.get(ENV, "1") != "0"
FORCE = False
_kernels = None


def _k():
    global _kernels
    if _kernels is None:   # triton loads only where these run (CUDA, FORCE, or deterministic mode)
        from mrt_engine.kernels.matmul import matmul
        from mrt_engine.kernels.rms_norm import rms_norm
        from mrt_engine.kernels.rope import rope_
        from mrt_engine.kernels.silu_mul import silu_mul

        _kernels = rms_norm, rope_, silu_mul, matmul
    return _kernels


def usable(x: torch.Tensor) -> bool:
    """A [N, C] or [N, H, Dh] tensor these kernels take: on CUDA (or FORCE), rows contiguous in C."""
    return ((x.is_cuda and ENABLED) or FORCE) and x.dim() in (2, 3) and x.stride(-1) == 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _k()[0](x, weight, eps)


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _k()[1](qk, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _k()[2](gate_up)


def batch_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) with every row computed alike whatever the batch (deterministic mode)."""
    return _k()[3](x if x.stride(-1) == 1 else x.contiguous(), weight, bias, out=out)
