"""Rotary position embeddings (RoPE) and the scaling variants Llama-family checkpoints use.

`rope_from_config(hf_config)` reads `rope_parameters` (transformers >= 5) or `rope_scaling` +
`rope_theta` (older configs) and returns a `Rope` holding the inverse frequencies and the cos/sin
scale ("attention factor"). The formulas follow transformers' `modeling_rope_utils.py`:

- default:  inv_freq[i] = theta ** (-2i / Dh)
- linear:   inv_freq / factor
- llama3:   low frequencies divided by factor, high ones kept, a smooth ramp between
- yarn:     per-dimension blend of interpolated / extrapolated frequencies, cos/sin scaled by
            0.1 * ln(factor) + 1 (or the configured attention_factor / mscale ratio)
- dynamic:  NTK scaling recomputed from the batch's longest sequence in transformers; for contexts
            up to max_position_embeddings that equals default, which is what we compute, and
            `Rope.max_exact_positions` tells the runtime where the two would diverge.

Rotation is the "rotate half" (non-interleaved) layout of Hugging Face Llama checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
# Rope.cos_sin's CPU tables cover positions below this (at most 32 MiB for head_dim 128 in float32);
# a step with a later position computes its rows instead
_TABLE_POSITIONS = 1 << 15


@dataclass
class Rope:
    inv_freq: torch.Tensor            # [Dh / 2] float32
    attention_scaling: float = 1.0    # multiplies cos and sin (yarn)
    max_exact_positions: int | None = None  # positions beyond this differ from transformers (dynamic)

    # per dtype: (cos [P, Dh], sin [P, Dh], the inv_freq they were made from); see _tables
    _tables_by_dtype: dict = field(default_factory=dict, repr=False, compare=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [N, 1, Dh] for integer positions [N], cast to the activations' dtype.

        On a CPU the rows come from tables of positions 0..P-1 made once (the values `_compute` gives
        for the same positions): a step gathers its rows instead of running ~8 small ops over them,
        and a position's values no longer depend on where in the batch it sits. On a GPU, or past
        _TABLE_POSITIONS, they are computed per step (on a GPU reading the largest position back
        would synchronize the step)."""
        if positions.device.type != "cpu" or positions.numel() == 0:
            return self._compute(positions, dtype)
        lo, hi = (int(v) for v in positions.aminmax())
        if lo < 0:
            raise ValueError(f"positions must be >= 0, got {lo}")
        if hi >= _TABLE_POSITIONS:
            return self._compute(positions, dtype)
        cos, sin = self._tables(hi + 1, dtype)
        return cos.index_select(0, positions)[:, None, :], sin.index_select(0, positions)[:, None, :]

    def _tables(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, Dh] in `dtype` for positions 0..P-1, P >= n (a power of two, at least 1024):
        made again when a longer context or a new inv_freq (`to`, a reloaded config) needs it."""
        t = self._tables_by_dtype.get(dtype)
        if t is None or t[0].shape[0] < n or t[2] is not self.inv_freq:
            p = max(1024, 1 << (n - 1).bit_length())
            cos, sin = self._compute(torch.arange(p, device=self.inv_freq.device), dtype)
            t = self._tables_by_dtype[dtype] = (cos[:, 0], sin[:, 0], self.inv_freq)
        return t[0], t[1]

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]   # [N, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    def to(self, device) -> "Rope":
        self.inv_freq = self.inv_freq.to(device)
        return self


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, Dh] rotated by cos/sin [N, 1, Dh] (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def read_rope_parameters(hf_config) -> dict:
    """The config's RoPE parameters as one flat dict with 'rope_type' and 'rope_theta' filled in."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope parameters must be a dict, got {type(params).__name__}: {params!r}")
    if params and all(isinstance(v, dict) or v is None for v in params.values()):
        raise ValueError(f"per-layer-type RoPE parameters are not supported: {params!r}")
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    if params.get("partial_rotary_factor") is None:
        params["partial_rotary_factor"] = getattr(hf_config, "partial_rotary_factor", None) or 1.0
    return params


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict, max_pos: int) -> torch.Tensor:
    factor = float(p["factor"])
    low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = p.get("original_max_position_embeddings") or max_pos
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(p: dict, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    theta = float(p["rope_theta"])
    orig = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor")
    if factor is None:
        factor = max_pos / orig
    factor = float(factor)

    def mscale_of(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale_of(factor, ms) / mscale_of(factor, ms_all) if (ms and ms_all) else mscale_of(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations):
        # the dimension whose wavelength completes `rotations` turns over the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attn)


def rope_from_config(hf_config, head_dim: int) -> Rope:
    """Build the model's Rope from its Hugging Face config; unsupported variants raise ValueError."""
    p = read_rope_parameters(hf_config)
    rope_type = p["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(p["partial_rotary_factor"]) != 1.0:
        raise ValueError(f"partial rotary embeddings are not supported (partial_rotary_factor="
                         f"{p['partial_rotary_factor']})")
    max_pos = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
    theta = float(p["rope_theta"])
    for key in ("factor",) if rope_type in ("linear", "llama3", "dynamic") else ():
        if p.get(key) is None:
            raise ValueError(f"RoPE type {rope_type!r} needs {key!r} in the config; got {p!r}")
    if rope_type == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor") if p.get(k) is None]
        if missing:
            raise ValueError(f"RoPE type 'llama3' needs {missing} in the config; got {p!r}")

    inv_freq = _default_inv_freq(theta, head_dim)
    if rope_type == "linear":
        return Rope(inv_freq / float(p["factor"]))
    if rope_type == "llama3":
        return Rope(_llama3_inv_freq(inv_freq, p, max_pos))
    if rope_type == "yarn":
        inv, attn = _yarn(p, head_dim, max_pos)
        return Rope(inv, attn)
    if rope_type == "dynamic":
        if not max_pos:
            raise ValueError("dynamic RoPE needs max_position_embeddings in the config")
        return Rope(inv_freq, max_exact_positions=max_pos)
    return Rope(inv_freq)
