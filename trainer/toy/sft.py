"""SFT of the tiny reasoner: a few-M-parameter Llama trained on noisy-searcher traces, on CPU.

    python -m mrt_engine.trainer.toy.sft --seed 0 --out trainer/toy/model

Deterministic from the seed (data order, init and CPU kernels). Each batch mixes full traces with
forced-termination examples (a trace cut at a random token, at an episode boundary, or at a boundary
after the pair was found, then FORCED_SUFFIX and the answer found so far, or a guess). One CPU
thread by default: the weights are bitwise reproducible for a fixed thread count. The loss skips the prompt and the forced suffix, so the
model never learns to emit "Time is up." on its own. Saves safetensors + tokenizer into `--out`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from typing import List, Tuple

import torch

from mrt_engine.trainer.toy import task, traces
from mrt_engine.trainer.toy.tokenizer import build_tokenizer, save_tokenizer

IGNORE = -100


def model_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                 kv_heads: int = 2, intermediate: int = 384, max_len: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


class ExampleMaker:
    """Token ids + loss labels for full and forced-termination examples, built in id space.

    Pieces are tokenized separately and concatenated, exactly as the engine sees them at a fork:
    prompt ids + generated ids + suffix ids (joined text could tokenize differently at the seams).
    """

    def __init__(self, rng: random.Random, difficulties=(4, 5, 5, 6), p_forced: float = 0.5):
        self.tok = build_tokenizer()
        self.rng = rng
        self.difficulties = difficulties
        self.p_forced = p_forced
        self.eos = self.tok.token_to_id("</s>")
        self.bos = self.tok.token_to_id("<s>")
        self.suffix = self._ids(traces.FORCED_SUFFIX)

    def _ids(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def make(self) -> Tuple[List[int], List[int]]:
        rng = self.rng
        problem = task.generate_problem(rng, rng.choice(self.difficulties))
        trace = traces.searcher_trace(problem, rng)
        prompt = [self.bos] + self._ids(problem.prompt())
        if rng.random() >= self.p_forced:
            comp = self._ids(trace.completion()) + [self.eos]
            return prompt + comp, [IGNORE] * len(prompt) + comp
        think = self._ids(trace.thinking)
        # episode starts (after each "\n\n" token) and the end: where J is measured
        sep = self.tok.token_to_id(traces.EPISODE_SEP)
        bounds = [0] + [i + 1 for i, t in enumerate(think) if t == sep] + [len(think)]
        kind = rng.random()
        if kind < 1 / 3:
            cut = rng.choice(bounds)
        elif kind < 2 / 3:
            cut = rng.randint(0, len(think))  # a token budget cuts anywhere
        else:
            # after the pair was found: rare among uniform cuts, yet it is what makes J rise
            cut = rng.choice(bounds[trace.found_at + 1:])
        prefix = think[:cut]
        answer = traces.forced_answer(problem, self.tok.decode(prefix), rng)
        tail = self._ids(traces.boxed(answer)) + [self.eos]
        ids = prompt + prefix + self.suffix + tail
        labels = [IGNORE] * len(prompt) + prefix + [IGNORE] * len(self.suffix) + tail
        return ids, labels

    def batches(self, size: int, pool: int = 8):
        """Endless batches; `pool` batches are drawn at once and cut by length to save padding."""
        while True:
            rows = sorted((self.make() for _ in range(size * pool)), key=lambda r: len(r[0]))
            chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
            self.rng.shuffle(chunks)  # no short-to-long curriculum
            for chunk in chunks:
                yield self.collate(chunk)

    @staticmethod
    def collate(rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = len(rows)
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(size, width, dtype=torch.long)
        labels = torch.full((size, width), IGNORE, dtype=torch.long)
        mask = torch.zeros(size, width, dtype=torch.long)
        for r, (x, y) in enumerate(rows):  # right padding: positions stay 0..len-1
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(y)] = torch.tensor(y)
            mask[r, :len(x)] = 1
        return ids, labels, mask


def train(seed: int = 0, out: str = "trainer/toy/model", steps: int = 800, batch_size: int = 32,
          lr: float = 3e-3, warmup: int = 100, hidden: int = 128, layers: int = 4,
          intermediate: int = 384, threads: int = 1, log_every: int = 50) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    maker = ExampleMaker(random.Random(seed))
    config = model_config(maker.tok.get_vocab_size(), hidden=hidden, layers=layers,
                          intermediate=intermediate)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    print(f"model: {n_params / 1e6:.2f}M params, {layers} layers, hidden {hidden}; "
          f"{steps} steps x {batch_size} examples", flush=True)
    t0 = time.time()
    tokens = 0
    ema = None
    stream = maker.batches(batch_size)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, labels, mask = next(stream)
        tokens += int(mask.sum())
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"step {step + 1}/{steps} loss {ema:.4f} lr {lr_at(step):.2e} "
                  f"{time.time() - t0:.0f}s {tokens / (time.time() - t0):.0f} tok/s", flush=True)
    elapsed = time.time() - t0

    os.makedirs(out, exist_ok=True)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out, model_max_length=config.max_position_embeddings)
    stats = {"seed": seed, "steps": steps, "batch_size": batch_size, "params": n_params,
             "train_seconds": round(elapsed, 1), "train_tokens": tokens, "final_loss_ema": ema,
             "threads": threads}
    print(json.dumps(stats), flush=True)
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="trainer/toy/model")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; the result is bitwise reproducible for a fixed count")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {a.steps}, {a.batch_size}")
    train(seed=a.seed, out=a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
          hidden=a.hidden, layers=a.layers, intermediate=a.intermediate, threads=a.threads)


if __name__ == "__main__":
    main()
