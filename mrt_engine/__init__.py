"""mrt-engine: branched-rollout generation with a prefix-shared paged KV cache, and MRT training.

Heavy modules (torch, transformers) load on first use, so bookkeeping imports stay cheap.
"""
from __future__ import annotations

import os

from mrt_engine.errors import OutOfBlocks

__version__ = "0.1.0"

_LAZY = {
    "LLM": "mrt_engine.llm",
    "Fork": "mrt_engine.sequence",
    "SamplingParams": "mrt_engine.sampling",
    "RequestOutput": "mrt_engine.outputs",
    "CompletionOutput": "mrt_engine.outputs",
    "Logprob": "mrt_engine.outputs",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrt_engine' has no attribute {name!r}")


def default_model_path() -> str:
    """Folder of the tiny reasoner shipped with the package (Hugging Face format)."""
    path = os.path.join(os.path.dirname(__file__), "trainer", "toy", "model")
    if not os.path.isdir(path):
        # installed layout: mrt_engine.trainer is its own package directory
        from mrt_engine import trainer

        path = os.path.join(os.path.dirname(trainer.__file__), "toy", "model")
    return path


__all__ = ["LLM", "Fork", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "OutOfBlocks",
           "default_model_path"]
