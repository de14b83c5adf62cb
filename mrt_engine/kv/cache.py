"""The KV bookkeeping backend, chosen once: the C++ core `mrt_engine._C` when it is built, else the
pure-Python twin. `MRT_ENGINE_KV_BACKEND=python` forces the twin (tests, debugging);
`MRT_ENGINE_KV_BACKEND=cpp` makes a missing extension an error instead of a silent fallback."""
from __future__ import annotations

import os

from mrt_engine.kv import core_py as kv_core_py
from mrt_engine.errors import OutOfBlocks

_choice = os.environ.get("MRT_ENGINE_KV_BACKEND", "auto").lower()
if _choice not in ("auto", "cpp", "python"):
    raise ValueError(f"MRT_ENGINE_KV_BACKEND must be auto, cpp or python, got {_choice!r}")

_C = None
if _choice != "python":
    try:
        from mrt_engine import _C  # type: ignore[no-redef]
    except ImportError:
        if _choice == "cpp":
            raise
        _C = None

if _C is not None:
    BlockPool = _C.BlockPool
    KVCacheManager = _C.KVCacheManager
    BACKEND = "cpp"
else:
    BlockPool = kv_core_py.BlockPool
    KVCacheManager = kv_core_py.KVCacheManager
    BACKEND = "python"

__all__ = ["BlockPool", "KVCacheManager", "OutOfBlocks", "BACKEND"]
