"""Decode step-plan grouping, backend chosen once: `mrt_engine._C.plan_decode_groups` when the
extension is built (and has it), else the pure-Python twin in step_plan_py.py. The same
`MRT_ENGINE_KV_BACKEND=auto|cpp|python` override as kv/cache.py applies."""
from __future__ import annotations

from mrt_engine.kv import cache as kv_cache, step_plan_py

if kv_cache._C is not None and hasattr(kv_cache._C, "plan_decode_groups"):
    plan_decode_groups = kv_cache._C.plan_decode_groups
    BACKEND = "cpp"
else:
    plan_decode_groups = step_plan_py.plan_decode_groups
    BACKEND = "python"

__all__ = ["plan_decode_groups", "BACKEND"]
