"""Small-vocabulary tokenizer for the toy task, built with `tokenizers` and saved for AutoTokenizer.

Character level over printable ASCII and newline, plus the task's fixed phrases as single tokens
(trigger words, `</think>`, `\\boxed{`, ...), so any ASCII text round-trips exactly and traces stay
short. Special tokens: <s> (BOS, prepended by the post-processor), </s> (EOS), <pad>, <unk>.
"""
from __future__ import annotations

import json
import os
import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mrt_engine.trainer.toy.traces import (CHECK_TRIGGER, FIRST_TRIGGER, THINK_END, TRIGGERS)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]  # pad id 0, bos 1, eos 2
# Multi-character pieces that get one id each. Order matters only for the ids.
PHRASES = [THINK_END, "<think>", "\\boxed{", "Find two of", "that sum to", FIRST_TRIGGER,
           *TRIGGERS, CHECK_TRIGGER, ", not ", ". Found it:", ". Yes.", "Time is up.", "\n\n"]
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]  # 94 visible, space, \t, \n


def build_tokenizer() -> Tokenizer:
    """The raw `tokenizers.Tokenizer`; deterministic (ids depend only on the lists above)."""
    vocab = {}
    for tok in SPECIALS + CHARS:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Each character is a word; phrases are matched first as added tokens, so they stay whole.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate pieces with nothing in between
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in PHRASES])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return tok


def save_tokenizer(out_dir: str, model_max_length: int = 512) -> str:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # the text must round-trip exactly
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation pads on the left
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}, f,
                  indent=2)
    return out_dir


def vocab_size() -> int:
    return build_tokenizer().get_vocab_size(with_added_tokens=True)
