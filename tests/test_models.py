"""Our Llama-family model over the paged cache vs transformers, and the loader's error handling.

Each scenario runs real multi-step paged inference (prefill, extend over a cached prefix, decode,
forks sharing prefix blocks in one decode group) and compares every produced row's log-softmax with
transformers' on the full sequence (fp32, tolerance 1e-4).
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from mrt_engine.attention.metadata import AttentionMetadata, PrefillSeq
from mrt_engine.models import allocate_kv_caches, kv_cache_bytes_per_block, load_model

TOL = 1e-4


class PagedRunner:
    """A minimal stand-in for the model runner: block tables, slot mapping and decode groups."""

    def __init__(self, model, num_blocks=64, block_size=16, seed=0):
        self.model, self.bs = model, block_size
        self.caches = allocate_kv_caches(model, num_blocks, block_size)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.seqs: dict[str, dict] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}   # logits rows produced per sequence, in order

    def _ensure_blocks(self, seq, length):
        while len(seq["table"]) * self.bs < length:
            seq["table"].append(self.free.pop())

    def fork(self, parent, child):
        """Share the parent's full blocks; copy its partial last block (copy-on-write)."""
        p = self.seqs[parent]
        full = p["cached"] // self.bs
        table = p["table"][:full]
        if p["cached"] % self.bs:
            new = self.free.pop()
            for k, v in self.caches:
                k[new].copy_(k[p["table"][full]])
                v[new].copy_(v[p["table"][full]])
            table.append(new)
        self.seqs[child] = {"tokens": list(p["tokens"]), "table": table, "cached": p["cached"]}
        self.rows[child] = []

    def step(self, prefills: dict[str, list[int]], decode_groups: list[tuple[int, dict[str, int]]]):
        """prefills: seq -> new tokens; decode_groups: (num_shared_blocks, {seq: token})."""
        ids, slots, pos, pseqs, order = [], [], [], [], []
        for name, toks in prefills.items():
            seq = self.seqs.setdefault(name, {"tokens": [], "table": [], "cached": 0})
            self.rows.setdefault(name, [])
            start = seq["cached"]
            self._ensure_blocks(seq, start + len(toks))
            pseqs.append(PrefillSeq(len(ids), len(toks), start + len(toks), torch.tensor(seq["table"])))
            for i, t in enumerate(toks):
                p = start + i
                ids.append(t)
                pos.append(p)
                slots.append(seq["table"][p // self.bs] * self.bs + p % self.bs)
                order.append(name)
            seq["tokens"] += toks
            seq["cached"] += len(toks)
        num_prefill = len(ids)
        tables, ctx, ptr, gro, nsh = [], [], [0], [], []
        for ns, members in decode_groups:
            for name, t in members.items():
                seq = self.seqs[name]
                p = seq["cached"]
                self._ensure_blocks(seq, p + 1)
                ids.append(t)
                pos.append(p)
                slots.append(seq["table"][p // self.bs] * self.bs + p % self.bs)
                order.append(name)
                seq["tokens"].append(t)
                seq["cached"] += 1
                gro.append(len(tables))
                tables.append(seq["table"])
                ctx.append(p + 1)
            ptr.append(len(gro))
            nsh.append(ns)
        kw = {}
        if tables:
            width = max(len(t) for t in tables)
            kw = dict(decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                      decode_context_lens=torch.tensor(ctx), group_ptr=torch.tensor(ptr),
                      group_rows=torch.tensor(gro), group_num_shared=torch.tensor(nsh),
                      group_ptr_host=ptr, group_num_shared_host=nsh)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots), positions=torch.tensor(pos),
                                 num_prefill_tokens=num_prefill, prefill_seqs=pseqs, **kw)
        hidden = self.model(torch.tensor(ids), meta, self.caches)
        assert hidden.shape == (len(ids), self.model.hidden_size)
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), self.model.vocab_size)
        for name, row in zip(order, logits):
            self.rows[name].append(row)
        return logits


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_matches_hf(hf, runner, names):
    for name in names:
        toks = runner.seqs[name]["tokens"]
        ours = torch.stack(runner.rows[name]).log_softmax(-1)
        with torch.no_grad():
            ref = hf(torch.tensor([toks])).logits[0].float().log_softmax(-1)
        ref = ref[len(toks) - len(ours):]     # forks produced rows only for their own tokens
        diff = (ours - ref).abs().max().item()
        assert diff < TOL, f"{name}: max |log-softmax diff| {diff:.2e} over {len(ours)} rows"
        assert ref.std() > 0.3, "reference logits too flat for the comparison to mean anything"


def run_scenario(path, seed=0, block_size=16):
    """Prefill two prompts, extend one over its cache while the other decodes, fork into a group."""
    model, _ = load_model(path, torch.float32, "cpu", attention_backend="torch")
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(model.vocab_size) for _ in range(n)]  # noqa: E731
    r = PagedRunner(model, block_size=block_size, seed=seed)
    r.step({"a": tok(20), "b": tok(37)}, [])                    # 1. two fresh prompts
    r.step({"a": tok(13)}, [(0, {"b": tok(1)[0]})])             # 2. extend a over its cache + decode b
    for child in ("b1", "b2", "b3"):
        r.fork("b", child)
    shared = r.seqs["b"]["cached"] // block_size
    for _ in range(5):                                          # 3. a decodes alone, b's forks as a group
        r.step({}, [(0, {"a": tok(1)[0]}), (shared, {c: tok(1)[0] for c in ("b1", "b2", "b3")})])
    r.step({"b": tok(4)}, [(shared, {"b1": tok(1)[0], "b2": tok(1)[0]})])  # 4. parent extends, forks decode
    return r


CONFIGS = {
    "llama_gqa": dict(kind="llama"),
    "qwen2_bias_tied": dict(kind="qwen2"),
    "llama_rope_llama3": dict(kind="llama", rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                              hidden_size=128, num_heads=4, num_kv_heads=1),
    "llama_rope_linear": dict(kind="llama", rope={"rope_type": "linear", "factor": 2.5}),
    "llama_rope_yarn": dict(kind="llama", rope={"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 128}),
    "llama_rope_dynamic": dict(kind="llama", rope={"rope_type": "dynamic", "factor": 2.0}),
    "mistral": dict(kind="mistral", num_heads=8, num_kv_heads=2, hidden_size=64),
    "llama_attention_bias": dict(kind="llama", attention_bias=True, mlp_bias=True, num_kv_heads=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_paged_inference_matches_transformers(name, tmp_path, make_tiny_model):
    cfg = dict(CONFIGS[name])
    path = make_tiny_model(tmp_path / name, cfg.pop("kind"), with_tokenizer=False, **cfg)
    runner = run_scenario(path, block_size=5 if name == "mistral" else 16)
    assert_matches_hf(hf_model(path), runner, ["a", "b", "b1", "b2", "b3"])


def test_dynamic_rope_reports_its_exact_range(tmp_path, make_tiny_model):
    path = make_tiny_model(tmp_path, "llama", rope={"rope_type": "dynamic", "factor": 2.0},
                           max_position_embeddings=96, with_tokenizer=False)
    model, _ = load_model(path, torch.float32, "cpu")
    assert model.max_exact_positions == 96


def test_qwen2_model_attributes(tiny_qwen2_dir):
    model, cfg = load_model(tiny_qwen2_dir, "auto", "cpu")
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size) == (2, 2, 16, cfg.vocab_size)
    assert model.dtype == torch.float32 and model.spec.tie_word_embeddings and model.spec.qkv_bias
    assert model.lm_head_weight is model.embed_tokens.weight


def test_kv_cache_allocation(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, torch.bfloat16, "cpu")
    caches = allocate_kv_caches(model, num_blocks=7, block_size=5)
    assert len(caches) == model.num_layers
    for k, v in caches:
        assert k.shape == v.shape == (7, 5, model.num_kv_heads, model.head_dim) and k.dtype == torch.bfloat16
    total = sum(k.numel() * k.element_size() * 2 for k, _ in caches)
    assert kv_cache_bytes_per_block(model, 5) * 7 == total
    with pytest.raises(ValueError, match="num_blocks"):
        allocate_kv_caches(model, 0, 5)


def test_bfloat16_model_close_to_fp32(tiny_llama_dir):
    torch.manual_seed(0)
    model32, _ = load_model(tiny_llama_dir, torch.float32, "cpu")
    model16, _ = load_model(tiny_llama_dir, "bfloat16", "cpu")
    ids = torch.randint(0, model32.vocab_size, (30,))
    outs = []
    for m in (model32, model16):
        r = PagedRunner(m, num_blocks=8)
        outs.append(r.step({"a": ids.tolist()}, []).log_softmax(-1))
    assert (outs[0] - outs[1]).abs().max() < 0.25
    assert outs[0].argmax(-1).eq(outs[1].argmax(-1)).float().mean() > 0.8


def test_update_weights_with_hf_state_dict(tmp_path, make_tiny_model):
    path = make_tiny_model(tmp_path / "q", "qwen2", with_tokenizer=False)
    hf = hf_model(path)
    model, _ = load_model(path, torch.float32, "cpu")
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = hf.state_dict()          # includes the tied lm_head.weight alias
    loaded = model.load_weights(sd, strict=True)
    assert "model.layers.1.self_attn.k_proj.bias" in loaded
    r = PagedRunner(model, num_blocks=8)
    r.step({"a": list(range(3, 40))}, [])
    assert_matches_hf(hf, r, ["a"])


def test_load_weights_rejects_bad_names_and_shapes(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, torch.float32, "cpu")
    before = model.layers[0].qkv_proj.weight.clone()
    q = torch.zeros(64, 64)
    with pytest.raises(ValueError, match="unknown parameter 'model.layers.9.self_attn.q_proj.weight'"):
        model.load_weights({"model.layers.0.self_attn.q_proj.weight": q, "model.layers.9.self_attn.q_proj.weight": q})
    with pytest.raises(ValueError, match=r"shape \(32, 64\), expected \(64, 64\)"):
        model.load_weights({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 64)})
    with pytest.raises(TypeError):
        model.load_weights({"model.layers.0.self_attn.q_proj.weight": [[0.0]]})
    with pytest.raises(ValueError, match="missing"):
        model.load_weights({"model.layers.0.self_attn.q_proj.weight": q}, strict=True)
    assert torch.equal(model.layers[0].qkv_proj.weight, before), "a rejected update must not write anything"
    # the fused slice receives exactly the k_proj rows
    k = torch.randn(32, 64)
    model.load_weights({"module.model.layers.0.self_attn.k_proj.weight": k})
    assert torch.equal(model.layers[0].qkv_proj.weight[64:96], k)


# --- loader: bad folders -------------------------------------------------------------------------

def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(tmp_path / "nope", torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, torch.float32, "cpu")


def test_unsupported_architecture_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(tmp_path, torch.float32, "cpu")


def test_unsupported_rope_type(tmp_path, make_tiny_model):
    path = make_tiny_model(tmp_path, "llama", with_tokenizer=False)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                              "long_factor": [1.0] * 8, "original_max_position_embeddings": 64}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported RoPE type 'longrope'"):
        load_model(path, torch.float32, "cpu")


def test_legacy_rope_scaling_field(tmp_path, make_tiny_model):
    """Older configs carry `rope_scaling` + `rope_theta`; both spellings give the same model."""
    from mrt_engine.models.rope import rope_from_config

    class Legacy:
        rope_scaling = {"type": "linear", "factor": 2.0}
        rope_theta = 500.0
        max_position_embeddings = 64

    class New:
        rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
        max_position_embeddings = 64

    a, b = rope_from_config(Legacy(), 16), rope_from_config(New(), 16)
    assert torch.equal(a.inv_freq, b.inv_freq)
    torch.testing.assert_close(a.inv_freq, 1.0 / (500.0 ** (torch.arange(0, 16, 2) / 16)) / 2.0)


def test_missing_and_corrupt_weights(tmp_path, make_tiny_model):
    from safetensors.torch import load_file, save_file

    path = make_tiny_model(tmp_path, "llama", with_tokenizer=False)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="up_proj"):
        load_model(path, torch.float32, "cpu")
    with open(weights, "r+b") as f:
        f.truncate(200)
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        load_model(path, torch.float32, "cpu")
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(path, torch.float32, "cpu")


def test_weights_not_matching_config(tmp_path, make_tiny_model):
    path = make_tiny_model(tmp_path, "llama", with_tokenizer=False)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="does not match the config.*mlp"):
        load_model(path, torch.float32, "cpu")


def test_sharded_checkpoint(tmp_path, make_tiny_model):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "one", "llama", with_tokenizer=False)
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    a, _ = load_model(path, torch.float32, "cpu")
    b, _ = load_model(tmp_path / "sharded", torch.float32, "cpu")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    os.remove(sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(tmp_path / "sharded", torch.float32, "cpu")


def test_bad_dtype(tiny_llama_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_llama_dir, "float8", "cpu")
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_llama_dir, torch.int32, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_give_the_computed_values(dtype):
    """On a CPU cos_sin gathers rows of per-dtype tables: the same values as computing them for the
    step's positions, in any batch (a position's row does not depend on its neighbours); the tables
    grow for a longer context and are made again for a new inv_freq."""
    from mrt_engine.models.rope import Rope

    rope = Rope(1.0 / 10000 ** (torch.arange(0, 24, 2, dtype=torch.float32) / 24), attention_scaling=1.1)
    for positions in ([0, 5, 1023, 3], [7], list(range(33)), [5000, 2, 9]):
        pos = torch.tensor(positions)
        got, want = rope.cos_sin(pos, dtype), rope._compute(pos, dtype)
        assert got[0].shape == (len(positions), 1, 24) and got[0].is_contiguous()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert rope._tables_by_dtype[dtype][0].shape[0] == 8192          # grown to hold position 5000
    one = rope.cos_sin(torch.tensor([9]), dtype)[0]
    assert torch.equal(rope.cos_sin(torch.tensor([1, 9, 2]), dtype)[0][1], one[0])
    rope.inv_freq = rope.inv_freq * 0.5
    assert torch.equal(rope.cos_sin(torch.tensor([9]), dtype)[0], rope._compute(torch.tensor([9]), dtype)[0])
    assert not torch.equal(rope.cos_sin(torch.tensor([9]), dtype)[0], one)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rope.cos_sin(torch.tensor([3, -1]), dtype)
    from mrt_engine.models import rope as rope_mod

    size = rope._tables_by_dtype[dtype][0].shape[0]
    far = torch.tensor([5, rope_mod._TABLE_POSITIONS])          # past the tables: computed, not grown
    assert torch.equal(rope.cos_sin(far, dtype)[0], rope._compute(far, dtype)[0])
    assert rope._tables_by_dtype[dtype][0].shape[0] == size < rope_mod._TABLE_POSITIONS
