"""Llama-family decoder (Llama, Qwen2, Mistral) over a paged KV cache.

One module covers the family: Qwen2 is Llama with a bias on q/k/v and (usually) tied embeddings,
Mistral is Llama (a sliding window only matters past `max_exact_positions`). Projections are fused
(q|k|v into `qkv_proj`, gate|up into `gate_up_proj`) so a layer runs 4 matmuls; `load_weights`
takes Hugging Face parameter names and writes into the fused slices.

Shapes: N tokens of the step, H hidden, Hq/Hkv heads, Dh head dim, I intermediate, V vocabulary.
`forward` returns the last layer's hidden states before the final norm; `compute_logits` applies
the final norm and the LM head to only the rows the caller samples from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mrt_engine.models import cpu_decode, cpu_ops, packed_linear, triton_ops
from mrt_engine.models.packed_linear import PackedLinear
from mrt_engine.models.rope import Rope, apply_rope
from mrt_engine.profiling import section

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def _param(*shape, dtype, device) -> nn.Parameter:
    # uninitialised on purpose: every parameter is overwritten by the checkpoint
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype, device):
        super().__init__()
        self.weight = _param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and triton_ops.usable(x):
            return triton_ops.rms_norm(x, self.weight, self.eps)      # CUDA: one launch, same roundings
        if x.dtype in (torch.bfloat16, torch.float32) and cpu_ops.usable(x, x.dtype):
            return cpu_ops.rms_norm(x, self.weight, self.eps)   # the arithmetic below, in one pass
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # as transformers: normalise in fp32, cast back, then scale in the model dtype
        xf = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, spec: "ModelSpec", dtype, device):
        super().__init__()
        h, dh = spec.hidden_size, spec.head_dim
        self.q_size, self.kv_size = spec.num_heads * dh, spec.num_kv_heads * dh
        self.input_layernorm = RMSNorm(h, spec.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(h, spec.rms_norm_eps, dtype, device)
        self.qkv_proj = PackedLinear(h, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias, dtype=dtype, device=device)
        self.o_proj = PackedLinear(self.q_size, h, bias=spec.o_bias, dtype=dtype, device=device)
        self.gate_up_proj = PackedLinear(h, 2 * spec.intermediate_size, bias=spec.mlp_bias, dtype=dtype,
                                         device=device)
        self.down_proj = PackedLinear(spec.intermediate_size, h, bias=spec.mlp_bias, dtype=dtype, device=device)
        self.spec = spec

    def forward(self, h, cos, sin, k_cache, v_cache, meta, backend):
        q, k, v = self.pre_attention(h, cos, sin)
        o = backend.forward(q, k, v, k_cache, v_cache, meta, self.spec.scale)
        return self.post_attention(o, h)

    # the two halves around attention (cuda_graphs.py captures them; attention stays eager)
    def pre_attention(self, h, cos, sin):
        """h [N, H] -> q [N, Hq, Dh], k, v [N, Hkv, Dh] (views of one qkv tensor), RoPE applied."""
        n = h.shape[0]
        s = self.spec
        qkv = self.qkv_proj(self.input_layernorm(h))
        # q and k heads rotate together: one RoPE pass over [N, Hq + Hkv, Dh]
        qk = qkv[:, :self.q_size + self.kv_size].view(n, s.num_heads + s.num_kv_heads, s.head_dim)
        if triton_ops.usable(qk):
            qk = triton_ops.rope_(qk, cos, sin)     # in place on the fresh qkv output
        else:
            qk = cpu_ops.rope(qk, cos, sin) if cpu_ops.rope_usable(qk, cos) else apply_rope(qk, cos, sin)
        q, k = qk[:, :s.num_heads], qk[:, s.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(n, s.num_kv_heads, s.head_dim)
        return q, k, v

    def post_attention(self, o, h):
        """Attention output o [N, Hq, Dh] and the layer's input h [N, H] -> the layer's output [N, H]."""
        n = o.shape[0]
        o = o.reshape(n, self.q_size)
        # float32 on a CPU: the residual adds and SiLU*up run inside our GEMM (each call is None
        # where it does not apply); else they run in place on fresh GEMM outputs (y + h == h + y
        # bit for bit): fewer [N, H] / [N, I] temporaries per layer
        with section("gemm"):
            y = self.o_proj.add_to(o, h)
        h = y if y is not None else self.o_proj(o).add_(h)
        x = self.post_attention_layernorm(h)
        with section("gemm"):
            act = self.gate_up_proj.silu_mul(x)
        if act is None:
            act = _silu_mul(self.gate_up_proj(x))
        with section("gemm"):
            y = self.down_proj.add_to(act, h)
        return y if y is not None else self.down_proj(act).add_(h)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [N, 2I] (gate first)."""
    if triton_ops.usable(gate_up):
        return triton_ops.silu_mul(gate_up)
    if cpu_ops.usable(gate_up):  # bf16 on a CPU: silu(gate) * up in one pass, same roundings
        return cpu_ops.silu_mul_bf16(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class ModelSpec:
    """The few numbers the model and the runtime need, read once from the Hugging Face config."""

    def __init__(self, cfg):
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        self.architecture = arch
        self.hidden_size = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads)
        self.num_layers = int(cfg.num_hidden_layers)
        self.intermediate_size = int(cfg.intermediate_size)
        self.vocab_size = int(cfg.vocab_size)
        self.rms_norm_eps = float(cfg.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        self.qkv_bias = True if is_qwen2 else bool(getattr(cfg, "attention_bias", False))
        self.o_bias = False if is_qwen2 else bool(getattr(cfg, "attention_bias", False))
        self.mlp_bias = bool(getattr(cfg, "mlp_bias", False))
        self.scale = self.head_dim ** -0.5
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        # where our full causal attention stops matching the checkpoint's (sliding windows)
        self.max_exact_positions = None
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None) or []
        uses_window = (arch == "MistralForCausalLM" and window) or any(t != "full_attention" for t in layer_types)
        if uses_window and window:
            self.max_exact_positions = int(window)


class LlamaModel(nn.Module):
    """Llama/Qwen2/Mistral causal LM over a paged KV cache (our module, not transformers')."""

    def __init__(self, spec: ModelSpec, rope: Rope, dtype: torch.dtype, device, attention_backend=None):
        super().__init__()
        self.spec = spec
        self.rope = rope.to(device)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(spec, dtype, device) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        if not spec.tie_word_embeddings:
            self.lm_head = _param(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.requires_grad_(False)
        # float32: oneDNN's packed copy; bf16: our GEMM's (`Bf16Panels`), which writes into `out`
        self._lm_head_packed = packed_linear.LazyPacked(lm_head=True)
        self.attn_backend = attention_backend     # (sets batch_invariant from the backend)
        self.num_layers = spec.num_layers
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.hidden_size = spec.hidden_size
        self.vocab_size = spec.vocab_size
        self.dtype = dtype
        self.device = torch.device(device)
        limits = [x for x in (rope.max_exact_positions, spec.max_exact_positions) if x]
        self.max_exact_positions = min(limits) if limits else None
        self._hf_map = self._build_hf_name_map()

    @property
    def attn_backend(self):
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, backend) -> None:
        # a deterministic backend (batch-invariant attention) takes batch-invariant GEMMs with it
        self._attn_backend = backend
        self.batch_invariant = bool(getattr(backend, "deterministic", False))
        for mod in self.modules():
            if isinstance(mod, PackedLinear):
                mod.batch_invariant = self.batch_invariant

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head

    # 1. forward over the paged cache
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, meta, kv_caches) -> torch.Tensor:
        """input_ids [N] -> hidden states [N, H] (pre final norm); writes the step's K/V into kv_caches."""
        if self.attn_backend is None:
            raise ValueError("no attention backend set: pass one to load_model or set model.attn_backend")
        h = self.embed_tokens(input_ids)
        with section("layer_other"):
            cos, sin = self.rope.cos_sin(meta.positions, h.dtype)
        if cpu_decode.usable(self, h, cos, sin, meta, kv_caches):
            out = cpu_decode.forward(self, h, cos, sin, meta, kv_caches)
            if out is not None:
                return out
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = layer(h, cos, sin, k_cache, v_cache, meta, self.attn_backend)
        return h

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor, float32: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [M, H] from forward -> logits [M, V], float32 unless `float32=False` (then in
        the model dtype: the sampler reads them once into its fp32 workspace, which saves a
        vocab-sized cast). `out`: an [M, V] tensor of the model dtype to write into (the runner
        reuses one across steps; a fresh vocab-sized tensor page-faults on every step)."""
        h = self.norm(hidden)
        w = self.lm_head_weight
        with section("gemm_lm_head"):
            if self.batch_invariant:    # deterministic mode: a row's logits whatever the batch
                logits = triton_ops.batch_invariant_linear(h, w, None, out=out)
            else:
                logits = packed_linear.linear(h, self._lm_head_packed.get(w), w, None, out=out)
        if not float32 or logits.dtype == torch.float32:
            return logits
        with section("cast"):
            return logits.float()

    # 2. weights with Hugging Face names
    def _build_hf_name_map(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """HF name -> (our tensor, row offset, rows) so fused projections load slice by slice."""
        s = self.spec
        m = {"model.embed_tokens.weight": (self.embed_tokens.weight, 0, s.vocab_size),
             "model.norm.weight": (self.norm.weight, 0, s.hidden_size)}
        if not s.tie_word_embeddings:
            m["lm_head.weight"] = (self.lm_head, 0, s.vocab_size)
        q, kv, inter = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.intermediate_size
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            m[p + "input_layernorm.weight"] = (layer.input_layernorm.weight, 0, s.hidden_size)
            m[p + "post_attention_layernorm.weight"] = (layer.post_attention_layernorm.weight, 0, s.hidden_size)
            kinds = ["weight"] + (["bias"] if s.qkv_bias else [])
            for kind in kinds:
                t = getattr(layer.qkv_proj, kind)
                for name, off, rows in (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)):
                    m[f"{p}self_attn.{name}.{kind}"] = (t, off, rows)
            for kind in ["weight"] + (["bias"] if s.o_bias else []):
                m[f"{p}self_attn.o_proj.{kind}"] = (getattr(layer.o_proj, kind), 0, s.hidden_size)
            for kind in ["weight"] + (["bias"] if s.mlp_bias else []):
                t = getattr(layer.gate_up_proj, kind)
                m[f"{p}mlp.gate_proj.{kind}"] = (t, 0, inter)
                m[f"{p}mlp.up_proj.{kind}"] = (t, inter, inter)
                m[f"{p}mlp.down_proj.{kind}"] = (getattr(layer.down_proj, kind), 0, s.hidden_size)
        return m

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: (rows,) + tuple(t.shape[1:]) for name, (t, _, rows) in self._hf_map.items()}

    @torch.no_grad()
    def load_weights(self, state_dict, strict: bool = False) -> set[str]:
        """Copy tensors named as in Hugging Face checkpoints into the model; returns the names loaded.

        Unknown names and shape mismatches raise ValueError before anything is written. `strict`
        also requires every parameter. With tied embeddings `lm_head.weight` is accepted and must
        equal the embedding it is tied to in shape (it overwrites it, like a tied optimizer step).
        """
        items = []
        for raw_name, tensor in state_dict.items():
            name = raw_name
            for prefix in ("module.", "_orig_mod."):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older checkpoints save the RoPE buffer; we compute it from the config
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                name = "model.embed_tokens.weight"
            if name not in self._hf_map:
                raise ValueError(f"unknown parameter {raw_name!r} for {self.spec.architecture} "
                                 f"(expected Hugging Face names such as 'model.layers.0.self_attn.q_proj.weight')")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"parameter {raw_name!r} must be a torch.Tensor, got {type(tensor).__name__}")
            target, off, rows = self._hf_map[name]
            want = (rows,) + tuple(target.shape[1:])
            if tuple(tensor.shape) != want:
                raise ValueError(f"parameter {raw_name!r} has shape {tuple(tensor.shape)}, expected {want}")
            if not tensor.is_floating_point():
                raise TypeError(f"parameter {raw_name!r} must be floating point, got {tensor.dtype}")
            items.append((name, tensor, target, off, rows))
        loaded = {name for name, *_ in items}
        if strict:
            missing = sorted(set(self._hf_map) - loaded)
            if missing:
                raise ValueError(f"missing {len(missing)} parameter(s), e.g. {missing[:3]}")
        for _, tensor, target, off, rows in items:
            target.narrow(0, off, rows).copy_(tensor)
        self.drop_packed_weights()   # stale now
        return loaded

    def drop_packed_weights(self) -> None:
        """Frees the prepacked copies of the weights; each is repacked on its next use."""
        self._lm_head_packed.drop()
        for mod in self.modules():
            if isinstance(mod, PackedLinear):
                mod.unpack()
