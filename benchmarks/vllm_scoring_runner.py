"""Baseline of bench_scoring.py: scoring a forced suffix at fork points with vLLM's prompt_logprobs.

    <vllm-python> vllm_scoring_runner.py JOB.json RESULT.json

JOB.json (written by bench_scoring.py): model_dir, dtype, traces (token ids), positions, suffixes
(one per timed repetition, plus warmup_suffix), seed, modes. Only the standard library and vllm
are imported: this runs in a venv without mrt_engine.

The traces are prefilled once (untimed) so their blocks are in vLLM's prefix cache. Per repetition
and mode, one timed generate() over every point's prompt trace[:t] + suffix with
SamplingParams(max_tokens=1, prompt_logprobs=0):
  "default": vLLM's default for prompt_logprobs, which skips reading the prefix cache (every
             position of every prompt is computed);
  "reuse":   skip_reading_prefix_cache=False, vLLM's switch to reuse the cached prefix (then only
             the uncached tail is scored), where the installed vLLM has it.
RESULT.json: per mode the walls and, from the last repetition, each point's suffix tokens' prompt
logprobs (None where vLLM gave none for the token: see run()), vLLM's version, startup time.
"""
from __future__ import annotations

import json
import sys
import time

from vllm_fork_runner import load_job   # same folder: the script's directory is on sys.path


def main() -> int:
    job = load_job(__doc__)
    if job is None:
        return 2
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    traces, positions = job["traces"], job["positions"]
    longest = max(len(t) for t in traces) + len(job["warmup_suffix"]) + 2
    t0 = time.perf_counter()
    llm = LLM(model=job["model_dir"], dtype=job["dtype"], enable_prefix_caching=True, skip_tokenizer_init=True,
              max_model_len=longest + 16, seed=job["seed"], max_num_seqs=256)
    startup = time.perf_counter() - t0
    llm.generate([TokensPrompt(prompt_token_ids=tr) for tr in traces],
                 SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False), use_tqdm=False)

    def params(mode):
        kw = dict(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        if mode == "reuse":
            kw["skip_reading_prefix_cache"] = False
        return SamplingParams(**kw)

    modes = []
    for mode in job["modes"]:
        try:
            params(mode)
            modes.append(mode)
        except TypeError:   # a vLLM without skip_reading_prefix_cache
            pass

    def run(mode, suffix):
        prompts = [TokensPrompt(prompt_token_ids=tr[:t] + suffix) for tr in traces for t in positions]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params(mode), use_tqdm=False)
        wall = time.perf_counter() - t0
        # per point, each suffix token's logprob; None where vLLM returned none for it (in "reuse"
        # mode the first suffix token after a block-aligned cut: its logits are at a cached position)
        scores = []
        for o in outs:
            lps, ids = o.prompt_logprobs[-len(suffix):], o.prompt_token_ids[-len(suffix):]
            scores.append([d[i].logprob if d is not None and i in d else None for d, i in zip(lps, ids)])
        return wall, scores

    result = {"vllm": vllm.__version__, "engine_startup_s": round(startup, 2), "modes": {}}
    for mode in modes:
        run(mode, job["warmup_suffix"])
    for mode in modes:
        walls, scores = [], None
        for suffix in job["suffixes"]:
            wall, scores = run(mode, suffix)
            walls.append(round(wall, 4))
        result["modes"][mode] = {"walls_s": walls, "token_logprobs": scores}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
