"""Attention backends over the paged KV cache: the interface, and the one place that picks a backend.

Backend interface (every backend, torch or Triton):
    forward(q [N, Hq, Dh], k [N, Hkv, Dh], v [N, Hkv, Dh], k_cache, v_cache, meta, scale) -> [N, Hq, Dh]
It first stores the step's new K/V at `meta.slot_mapping`, then attends (see metadata.py
for the token order and the decode sharing groups). Backends:
- "torch" (`torch_backend.TorchAttentionBackend`): CPU default and the oracle of the kernels (on
  AVX-512 CPUs its decode runs the C++ kernel of `cpu_kernel.py`);
- "triton" (`triton_backend.TritonAttentionBackend`): the GPU default.
"""
from __future__ import annotations

import os

import torch


__all__ = ["BACKEND_ENV", "BACKENDS", "get_attention_backend", "TorchAttentionBackend", "merge_lse", "store_kv"]

BACKEND_ENV = "MRT_ENGINE_ATTENTION_BACKEND"
BACKENDS = ("auto", "torch", "triton")
_TORCH_NAMES = ("TorchAttentionBackend", "merge_lse", "store_kv")


def __getattr__(name):
    # the torch backend (it uses numpy) loads on first use, so a bare GPU image with only torch and
    # Triton can import the Triton backend (mrt_engine.attention.triton_backend)
    if name in _TORCH_NAMES:
        from mrt_engine.attention import torch_backend

        return getattr(torch_backend, name)
    raise AttributeError(f"module 'mrt_engine.attention' has no attribute {name!r}")


def get_attention_backend(name: str = "auto", device="cpu", *, deterministic: bool | None = None):
    """The attention backend for `device`: "auto" is Triton on CUDA and torch elsewhere.

    The environment variable MRT_ENGINE_ATTENTION_BACKEND overrides `name` (tests use it).
    `deterministic=True` (batch-invariant results) needs the Triton backend; None leaves it to
    MRT_ENGINE_DETERMINISTIC.
    """
    name = os.environ.get(BACKEND_ENV) or name
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        if deterministic:
            raise ValueError("deterministic=True needs the Triton attention backend (attention_backend='triton'; "
                             "on a CPU it runs under the Triton interpreter, slowly): the torch backend's "
                             "results depend on the batch")
        from mrt_engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    try:
        from mrt_engine.attention.triton_backend import TritonAttentionBackend
    except ImportError as exc:
        raise ValueError(f"attention backend 'triton' is not available ({exc}); use 'torch'") from exc
    return TritonAttentionBackend(deterministic=deterministic)
