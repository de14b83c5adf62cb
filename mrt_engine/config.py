"""EngineConfig: every knob of one `LLM` instance, validated when built (no torch import here).

Fields that depend on the model (dtype "auto", num_blocks None, max_model_len None) are resolved
by `LLM` after the model config is read; `EngineConfig` only checks what it can check alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_BACKENDS = ("auto", "torch", "triton")


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


@dataclass
class EngineConfig:
    model: str                               # Hugging Face folder: config.json, *.safetensors, tokenizer
    dtype: str = "auto"                      # "auto": the checkpoint's torch_dtype (fp32 on CPU if it is fp16)
    device: str = "cpu"                      # "cpu" | "cuda" | "cuda:N"
    block_size: int = 16                     # tokens per KV block
    num_blocks: int | None = None            # None: sized from kv_cache_memory_gb / gpu_memory_utilization
    max_model_len: int | None = None         # None: the model's max_position_embeddings
    seed: int = 0                            # engine RNG: seeds of requests that give none
    attention_backend: str = "auto"          # "auto" (torch on CPU, triton on CUDA) | "torch" | "triton"
    max_num_batched_tokens: int = 4096       # new tokens per step (decode rows + prefill chunks)
    max_num_seqs: int = 256                  # sequences decoding at once
    kv_cache_memory_gb: float = 2.0          # CPU: KV budget when num_blocks is None
    gpu_memory_utilization: float = 0.85     # CUDA: fraction of free memory (after weights) for KV
    enable_prefix_caching: bool = True       # reuse full blocks of earlier prompts (keyed by weight version)
    deterministic: bool | None = None        # batch-invariant tokens and logprobs (triton backend);
                                             # None: MRT_ENGINE_DETERMINISTIC decides

    def __post_init__(self):
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(f"model_dir must be a path (str), got {type(self.model).__name__}")
        self.model = os.fspath(self.model)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}")
        _positive_int("block_size", self.block_size)
        _positive_int("num_blocks", self.num_blocks, allow_none=True)
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("max_num_seqs", self.max_num_seqs)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not (isinstance(self.kv_cache_memory_gb, (int, float)) and self.kv_cache_memory_gb > 0):
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise TypeError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if self.deterministic is not None and not isinstance(self.deterministic, bool):
            raise TypeError(f"deterministic must be a bool or None, got {self.deterministic!r}")
