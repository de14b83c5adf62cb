"""Shared test helpers: tiny random Hugging Face models (with a tokenizer) saved via save_pretrained.

`make_tiny_model(path, kind=...)` writes a folder that both `transformers` and `mrt_engine` load:
- "llama": LlamaForCausalLM, GQA (4 query heads / 2 KV heads), untied embeddings;
- "qwen2": Qwen2ForCausalLM, qkv bias, tied embeddings, GQA 4/2.
`rope` overrides the RoPE parameters (e.g. {"rope_type": "llama3", "factor": 8.0, ...}).
The weights use a large initializer_range so logits are far from flat and differential tests bite.

Fixtures: `tiny_llama_dir`, `tiny_qwen2_dir` (session scoped, built once), and `make_tiny_model`
(the function itself, for tests that need other shapes).
"""
from __future__ import annotations

import os

import pytest

# Triton kernels run on CPU only under the interpreter, which must be switched on before anything
# imports triton (transformers does); importing the kernels package does that when CUDA is absent.
import mrt_engine.kernels  # noqa: F401,E402

# Byte-level vocabulary: every byte is a token, so any text round-trips; specials follow the bytes.
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
TINY_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def make_tiny_tokenizer():
    """A deterministic byte-level BPE tokenizer without merges (no training), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert len(fast) == TINY_VOCAB_SIZE
    return fast


def make_tiny_model(path, kind: str = "llama", *, rope: dict | None = None, seed: int = 0,
                    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                    intermediate_size: int = 128, max_position_embeddings: int = 512,
                    initializer_range: float = 0.15, tie_word_embeddings: bool | None = None,
                    dtype=None, with_tokenizer: bool = True, **config_overrides) -> str:
    """Save a tiny random model of `kind` ("llama" | "qwen2" | "mistral") into `path`; returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    common.update({k: config_overrides.pop(k) for k in list(config_overrides) if k in common})
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    if rope:
        rope_parameters.update(rope)
    common["rope_parameters"] = rope_parameters
    if kind == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=bool(tie_word_embeddings), **config_overrides)
        cls = LlamaForCausalLM
    elif kind == "qwen2":
        tie = True if tie_word_embeddings is None else tie_word_embeddings
        cfg = Qwen2Config(**common, tie_word_embeddings=tie, use_sliding_window=False, **config_overrides)
        cls = Qwen2ForCausalLM
    elif kind == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        cfg = MistralConfig(**common, tie_word_embeddings=bool(tie_word_embeddings), sliding_window=None,
                            **config_overrides)
        cls = MistralForCausalLM
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if dtype is not None:
        model = model.to(dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if with_tokenizer:
        make_tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(name="make_tiny_model")
def _make_tiny_model_fixture():
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from threads, and on a busy 2-core machine their synchronisation makes
    each small step several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
