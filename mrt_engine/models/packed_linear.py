"""Linear layers with oneDNN-prepacked weights on the CPU.

PyTorch's plain CPU GEMM repacks the weight on every call; at decode sizes (a few hundred rows)
that repacking is a large part of the call. oneDNN's prepacked layout (the one torch.compile's
freezing uses) measured on the 2-core dev box, M = 256 rows: float32 ~200-220 GFLOP/s vs 130-170,
bfloat16 410-440 vs 380-400, and bfloat16 results bit-identical to `F.linear`.

The packed copy is made on first use and dropped whenever the model's weights change through
`LlamaModel.load_weights` (the only writer: checkpoint loading and `LLM.update_weights`), so it is
never stale. It costs a second copy of the linear weights in memory; `MRT_ENGINE_PACKED_LINEAR=0`
turns it off. Anything that is not a CPU float32/bfloat16 weight, or a torch without the ops,
keeps `F.linear`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from mrt_engine.models import triton_ops

ENV = "MRT_ENGINE_PACKED_LINEAR"
_ROWS_HINT = 256   # the batch size oneDNN tunes the layout for; any row count works


def _ops_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_AVAILABLE = _ops_available()


def enabled_for(weight: torch.Tensor) -> bool:
    return (_AVAILABLE and os.environ.get(ENV, "1") != "0" and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16))


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The prepacked copy of a [N, K] weight, or None where packing is off or unavailable."""
    if not enabled_for(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)
    except RuntimeError:  # a build whose oneDNN rejects this dtype/ISA: plain GEMMs
        return None


def linear(x: torch.Tensor, packed: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None):
    if packed is None or x.dim() != 2:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class LazyPacked:
    """A weight's prepacked copy, made on first use (None where packing is off or unavailable);
    `drop()` when the weight has changed."""

    __slots__ = ("packed", "_tried")

    def __init__(self):
        self.drop()

    def drop(self) -> None:
        self.packed, self._tried = None, False

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        if not self._tried:
            self.packed, self._tried = pack(weight), True
        return self.packed


class PackedLinear(nn.Linear):
    """nn.Linear whose forward uses a prepacked copy of its weight (made lazily, dropped by `unpack`).

    `batch_invariant` (set by the model in deterministic mode) routes it through the fixed-tile
    Triton GEMM instead, whose rows do not depend on the batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed_weight = LazyPacked()
        self.batch_invariant = False

    def unpack(self) -> None:
        self.packed_weight.drop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant and x.dim() == 2:
            return triton_ops.batch_invariant_linear(x, self.weight, self.bias)
        return linear(x, self.packed_weight.get(self.weight), self.weight, self.bias)
