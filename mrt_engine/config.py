"""EngineConfig: every knob of one `LLM` instance, validated when built (no torch import here).

Fields that depend on the model (dtype "auto", num_blocks None, max_model_len None) are resolved
by `LLM` after the model config is read; `EngineConfig` only checks what it can check alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_BACKENDS = ("auto", "torch", "triton")
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
# "dummy": seeded placeholder weights, no checkpoint read (veRL's rollout default: the trainer
# pushes the real weights before the first generate)
LOAD_FORMATS = ("auto", "safetensors", "dummy")

# vLLM engine arguments a port passes (TRL's colocate mode passes several), accepted where they
# describe what this engine does anyway: name -> allowed values (None in the tuple: any bool)
_VLLM_NEUTRAL = {
    "tensor_parallel_size": (1,), "pipeline_parallel_size": (1,), "data_parallel_size": (1,),
    "quantization": (None,), "kv_cache_dtype": ("auto",),
    # one engine in this process: what vLLM's external_launcher (TRL's colocate mode) and uni are
    "distributed_executor_backend": (None, "uni", "external_launcher"),
    "revision": (None,), "tokenizer_revision": (None,), "model_impl": ("auto", "vllm"),
    "tokenizer_mode": ("auto",),
    "trust_remote_code": None, "enforce_eager": None, "disable_log_stats": None,
    # veRL's rollout passes these: prefill is always chunked here, and there is no all-reduce
    "enable_chunked_prefill": None, "disable_custom_all_reduce": None,
}


def check_vllm_engine_args(kwargs: dict) -> None:
    """Refuses vLLM engine arguments this engine cannot honour, saying what it supports."""
    for name, value in kwargs.items():
        if name not in _VLLM_NEUTRAL:
            raise TypeError(f"LLM() got an unexpected keyword argument {name!r} (vLLM arguments accepted at "
                            f"neutral values: {', '.join(sorted(_VLLM_NEUTRAL))})")
        allowed = _VLLM_NEUTRAL[name]
        if allowed is None:
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        elif value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ValueError(f"{name}={value!r} is not supported by this single-device engine (accepted: "
                             f"{', '.join(repr(a) for a in allowed)})")


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
    max_num_seqs: int | None = 256           # sequences decoding at once (None, as vLLM callers pass: 256)
    kv_cache_memory_gb: float = 2.0          # CPU: KV budget when num_blocks is None
    gpu_memory_utilization: float = 0.85     # CUDA: fraction of free memory (after weights) for KV
    enable_prefix_caching: bool = True       # reuse full blocks of earlier prompts (keyed by weight version)
    deterministic: bool | None = None        # batch-invariant tokens and logprobs (triton backend);
                                             # None: MRT_ENGINE_DETERMINISTIC decides
    logprobs_mode: str | None = None         # None: log_softmax(logits / T) before truncation;
                                             # vLLM's "raw_logprobs" / "processed_logprobs"
    max_logprobs: int = 20                   # vLLM's cap on SamplingParams(logprobs=k)
    load_format: str = "auto"                # LOAD_FORMATS
    enable_sleep_mode: bool = False          # LLM.sleep() / wake_up() free and restore the KV cache

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
        if self.max_num_seqs is None:
            self.max_num_seqs = 256
        _positive_int("max_num_seqs", self.max_num_seqs)
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an int >= 0, got {self.max_logprobs!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if not isinstance(self.enable_sleep_mode, bool):
            raise TypeError(f"enable_sleep_mode must be a bool, got {self.enable_sleep_mode!r}")
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
        if self.logprobs_mode is not None and self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be None (log_softmax(logits / T) before top-k/top-p) or one of "
                             f"vLLM's {LOGPROBS_MODES}, got {self.logprobs_mode!r} (logits modes are not supported)")
