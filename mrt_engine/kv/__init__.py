"""KV bookkeeping, no torch: the block pool and prefix tree (C++ core `mrt_engine._C` or its
pure-Python twin `core_py`), chosen once in `cache.py`, and the decode step plan (`step_plan.py`)."""
from mrt_engine.kv.cache import BACKEND, BlockPool, KVCacheManager

__all__ = ["BACKEND", "BlockPool", "KVCacheManager"]
