"""Build our Llama-family module from a Hugging Face folder: config.json + *.safetensors.

The config is read with transformers' AutoConfig (so every field means what it means there); the
weights with the safetensors library, one shard at a time, straight into the fused parameters.
"""
from __future__ import annotations

import glob
import json
import os

import torch

from mrt_engine.models.llama import SUPPORTED_ARCHITECTURES, LlamaModel, ModelSpec
from mrt_engine.models.rope import rope_from_config

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype, hf_config=None) -> torch.dtype:
    """A torch dtype from a torch.dtype or a name; "auto" takes the checkpoint's (float32 if unknown)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")
    if dtype == "auto":
        saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(saved, str):
            saved = _DTYPES.get(saved.replace("torch.", ""))
        return saved if saved in _DTYPES.values() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return _DTYPES[dtype]


def load_config(model_dir):
    """The folder's transformers config; FileNotFoundError / ValueError say what is wrong."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder not found: {model_dir!r}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in model folder {model_dir!r}")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises several types for a malformed config
        raise ValueError(f"cannot read {os.path.join(model_dir, 'config.json')}: {exc}") from exc
    archs = getattr(cfg, "architectures", None) or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {archs or getattr(cfg, 'model_type', None)!r} in "
                         f"{model_dir!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return cfg


def weight_files(model_dir) -> list[str]:
    """The safetensors shards: from model.safetensors.index.json when present, else *.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"corrupt safetensors index {index!r}: {exc}") from exc
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"weight shard(s) listed in {index!r} are missing: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    # Mistral releases ship a second copy of the weights under their own names; skip it when the
    # Hugging Face files are present
    hf_files = [f for f in files if not os.path.basename(f).startswith("consolidated")]
    files = hf_files or files
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir!r} (found: {sorted(os.listdir(model_dir))}); "
                                "only safetensors checkpoints are supported")
    return files


def load_model(model_dir, dtype=torch.float32, device="cpu", attention_backend="auto", *,
               deterministic: bool | None = None, dummy: bool = False, seed: int = 0):
    """Load a Llama/Qwen2/Mistral folder into our module; returns (model, hf_config).

    `attention_backend` is a name for `get_attention_backend` or a backend object; `deterministic`
    goes to `get_attention_backend` with a name (a backend object carries its own). `dummy` reads
    only the config: every parameter is drawn uniformly from [-1e-3, 1e-3] with `seed` (vLLM's
    load_format="dummy"), for a caller that pushes the real weights before generating.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mrt_engine.attention import get_attention_backend

    cfg = load_config(model_dir)
    dtype = resolve_dtype(dtype, cfg)
    device = torch.device(device)
    spec = ModelSpec(cfg)
    backend = get_attention_backend(attention_backend, device, deterministic=deterministic) \
        if isinstance(attention_backend, str) else attention_backend
    model = LlamaModel(spec, rope_from_config(cfg, spec.head_dim), dtype, device, backend)
    if dummy:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.empty(p.shape).uniform_(-1e-3, 1e-3, generator=gen))
        return model.eval(), cfg

    loaded: set[str] = set()
    for path in weight_files(os.fspath(model_dir)):
        try:
            tensors = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"corrupt or unreadable weights file {path!r}: {exc}") from exc
        try:
            loaded |= model.load_weights(tensors)
        except ValueError as exc:
            raise ValueError(f"{path!r} does not match the config: {exc}") from exc
    missing = sorted(set(model.expected_weight_shapes()) - loaded)
    if missing:
        raise ValueError(f"weights in {model_dir!r} lack {len(missing)} parameter(s), e.g. {missing[:3]}")
    return model.eval(), cfg
