"""Fused RMSNorm (bf16, float32), SiLU*up (bf16) and RoPE (float32, bf16) on the CPU (`mrt_engine._C`).

Each replaces 3-4 PyTorch ops (each a pass over the activations plus dispatch cost, which
dominates at decode sizes) with one pass and the same roundings as the transformers sequence:
RMSNorm normalises in float32, rounds to bf16, then scales by the weight in bf16; SiLU*up rounds
silu(gate) to bf16 before the product; RoPE rounds after each multiply and the add, in float32 or
bf16 (no fused multiply-add), so it is bit-identical in both dtypes. The float32 RMSNorm is the same
arithmetic with the sum of squares in another order, so it matches PyTorch's to rounding (the
float32 engine is held to transformers within tolerances anyway); float32 models get SiLU*up in
the epilogue of our float32 GEMM (packed_linear.py) instead, or PyTorch's where it does not apply.
`MRT_ENGINE_CPU_OPS=0` turns them off.
"""
from __future__ import annotations

import os

import torch

try:
    from mrt_engine import _C  # type: ignore[attr-defined]
    _ok = bool(getattr(_C, "cpu_ops_available", lambda: False)())
except ImportError:  # the extension is optional
    _C, _ok = None, False

ENV = "MRT_ENGINE_CPU_OPS"


def usable(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether x [N, M] (contiguous rows) of `dtype` on the CPU can take these ops."""
    return (_ok and os.environ.get(ENV, "1") != "0" and x.device.type == "cpu" and x.dtype == dtype
            and x.dim() == 2 and x.stride(1) == 1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [N, H] by weight [H], both bf16 (transformers' LlamaRMSNorm, bit for bit) or both
    float32 (weight * (x * rsqrt(mean(x^2) + eps)), PyTorch's to rounding)."""
    if x.dtype not in (torch.bfloat16, torch.float32) or not usable(x, x.dtype) or weight.dtype != x.dtype \
            or weight.shape != (x.shape[1],) or not weight.is_contiguous():
        raise ValueError("rms_norm expects bf16 or float32 CPU x [N, H] with contiguous rows and a contiguous "
                         "weight [H] of x's dtype")
    out = torch.empty(x.shape, dtype=x.dtype)
    _C.rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0), x.shape[0],
                x.shape[1], float(eps), x.dtype == torch.bfloat16, torch.get_num_threads())
    return out


def silu_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for bf16 gate_up [N, 2I] (gate first, as the fused projection writes it)."""
    if not usable(gate_up) or gate_up.shape[1] % 2:
        raise ValueError("silu_mul_bf16 expects a bf16 CPU tensor [N, 2I] with contiguous rows")
    n = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], n, dtype=torch.bfloat16)
    _C.silu_mul_bf16(gate_up.data_ptr(), gate_up.data_ptr() + 2 * n, gate_up.stride(0), out.data_ptr(),
                     out.stride(0), gate_up.shape[0], n, torch.get_num_threads())
    return out


def rope_usable(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """x [N, H, Dh] (rows may be strided, heads contiguous), cos [N, 1, Dh] of x's dtype."""
    return (_ok and os.environ.get(ENV, "1") != "0" and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and cos.dtype == x.dtype and x.dim() == 3
            and x.shape[2] % 32 == 0 and x.stride(2) == 1 and x.stride(1) == x.shape[2] and cos.is_contiguous())


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [N, H, Dh] by cos/sin [N, 1, Dh]; the same roundings as `apply_rope`."""
    if not rope_usable(x, cos) or sin.shape != cos.shape or not sin.is_contiguous() or sin.dtype != x.dtype \
            or cos.shape != (x.shape[0], 1, x.shape[2]):
        raise ValueError("rope expects x [N, H, Dh] (float32/bf16, Dh % 32 == 0, heads contiguous) and "
                         "contiguous cos, sin [N, 1, Dh] of its dtype")
    n, h, dh = x.shape
    out = torch.empty(n, h, dh, dtype=x.dtype)
    _C.rope(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), n, h, dh,
            x.dtype == torch.bfloat16, torch.get_num_threads())
    return out
