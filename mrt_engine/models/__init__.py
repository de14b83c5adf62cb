"""Model zoo of the engine: Llama-family decoders over a paged KV cache, loaded from Hugging Face folders."""
from mrt_engine.models.llama import SUPPORTED_ARCHITECTURES, LlamaModel, ModelSpec
from mrt_engine.models.loader import load_config, load_model, resolve_dtype
from mrt_engine.models.paged_cache import allocate_kv_caches, kv_cache_bytes_per_block

__all__ = ["SUPPORTED_ARCHITECTURES", "LlamaModel", "ModelSpec", "load_config", "load_model", "resolve_dtype",
           "allocate_kv_caches", "kv_cache_bytes_per_block"]
