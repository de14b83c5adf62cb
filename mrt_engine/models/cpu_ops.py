"""Fused bf16 RMSNorm and SiLU*up on the CPU (`mrt_engine._C`), behind checked wrappers.

Each replaces 3-4 PyTorch ops (each a pass over the activations plus dispatch cost, which
dominates at decode sizes) with one pass and the same roundings as the transformers sequence:
RMSNorm normalises in float32, rounds to bf16, then scales by the weight in bf16; SiLU*up rounds
silu(gate) to bf16 before the product. float32 models keep the PyTorch ops (bitwise the
reference's arithmetic there). `MRT_ENGINE_CPU_OPS=0` turns them off.
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


def usable(x: torch.Tensor) -> bool:
    return (_ok and os.environ.get(ENV, "1") != "0" and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and x.dim() == 2 and x.stride(1) == 1)


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm on bf16 x [N, H] with a bf16 weight [H]."""
    if not usable(x) or weight.dtype != torch.bfloat16 or weight.shape != (x.shape[1],) or not weight.is_contiguous():
        raise ValueError("rms_norm_bf16 expects bf16 CPU x [N, H] with contiguous rows and a contiguous bf16 weight [H]")
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _C.rms_norm_bf16(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0), x.shape[0],
                     x.shape[1], float(eps), torch.get_num_threads())
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
