"""LLM: the public, vLLM-shaped facade of the engine.

    llm = LLM(model)                       # a Hugging Face folder (vLLM's argument name)
    outs = llm.generate(prompts, SamplingParams(...), keep=True)
    branches = llm.fork(outs[0].outputs[0].handle, at=[100, 200], suffix=" Answer:", n=8)
    llm.release(handle); llm.update_weights(state_dict); llm.kv_stats()

Everything a call receives is validated before the engine state changes, so a bad input raises
ValueError/TypeError and the engine keeps working. A call that fails mid-way (e.g. all blocks
pinned by kept handles) frees what it allocated before re-raising.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
import numbers
import os
import random
import warnings
from array import array

import torch

from mrt_engine.config import EngineConfig, check_vllm_engine_args
from mrt_engine.kv.cache import KVCacheManager
from mrt_engine.model_runner import ModelRunner
from mrt_engine.outputs import CompletionOutput, Logprob, RequestOutput
from mrt_engine.sampling import SamplingParams
from mrt_engine.scheduler import Scheduler
from mrt_engine.sequence import Fork, Request, Sequence, SequenceHandle, StopChecker, final_text

_malloc_trim = None   # glibc's malloc_trim once looked up, or False where there is none


def _trim_heap() -> None:
    """Gives the C heap's free memory back to the OS (glibc's malloc_trim; elsewhere nothing).

    A freed cache tensor is not always unmapped: glibc serves even a 40 MB allocation from its heap
    when the heap has that much free (left by earlier frees), and a freed heap chunk stays in the
    process until trimmed; seen in the full test suite, where 1-2 of 4 freed 40 MB caches kept
    their RSS."""
    global _malloc_trim
    if _malloc_trim is None:
        # the process's own symbols (libc among them): no library search, which spawns ldconfig
        _malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) or False
    if _malloc_trim:
        _malloc_trim(0)


class LLM:
    def __init__(self, model=None, dtype: str = "auto", device: str = "cpu", block_size: int = 16,
                 num_blocks: int | None = None, max_model_len: int | None = None, seed: int = 0,
                 attention_backend: str = "auto", max_num_batched_tokens: int = 4096,
                 max_num_seqs: int | None = 256, kv_cache_memory_gb: float = 2.0,
                 gpu_memory_utilization: float = 0.85, enable_prefix_caching: bool = True,
                 deterministic: bool | None = None, *, model_dir=None, logprobs_mode: str | None = None,
                 tokenizer=None, skip_tokenizer_init: bool = False, max_logprobs: int = 20,
                 load_format: str = "auto", enable_sleep_mode: bool = False, **vllm_kwargs):
        """`model`: a Hugging Face model folder (vLLM's argument name; `model_dir=` also works).

        vLLM's `tokenizer=` (another folder to load the tokenizer from) and `logprobs_mode`
        ("raw_logprobs": log_softmax(logits); "processed_logprobs": after temperature and
        top-k/top-p/min-p; None, the default: after temperature, before truncation) work as in vLLM;
        so do `load_format="dummy"` (placeholder weights, no checkpoint read: for a trainer that
        pushes its weights before the first generate, as veRL's rollout does) and
        `enable_sleep_mode` (see `sleep`). Its parallelism and quantization arguments are accepted
        at the values that describe this engine (one device, no quantization) and refused otherwise."""
        check_vllm_engine_args(vllm_kwargs)
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            raise TypeError(f"tokenizer must be a folder path, got {type(tokenizer).__name__}")
        if not isinstance(skip_tokenizer_init, bool):
            raise TypeError(f"skip_tokenizer_init must be a bool, got {skip_tokenizer_init!r}")
        from mrt_engine.models import allocate_kv_caches, kv_cache_bytes_per_block, load_config, load_model
        from mrt_engine.models import resolve_dtype

        if model_dir is not None:
            if model is not None:
                raise ValueError("pass the model folder once: model= (vLLM's name) or model_dir=")
            model = model_dir
        if model is None:
            raise TypeError("LLM needs a model folder: LLM('path/to/hf-folder') or LLM(model=...)")
        cfg = EngineConfig(model, dtype, device, block_size, num_blocks, max_model_len, seed,
                           attention_backend, max_num_batched_tokens, max_num_seqs, kv_cache_memory_gb,
                           gpu_memory_utilization, enable_prefix_caching, deterministic, logprobs_mode,
                           max_logprobs, load_format, enable_sleep_mode)
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
        # 1. model (config and weights are checked by the loader: FileNotFoundError / ValueError)
        hf_config = load_config(cfg.model)
        torch_dtype = resolve_dtype(cfg.dtype, hf_config)
        if cfg.dtype == "auto" and cfg.device == "cpu" and torch_dtype == torch.float16:
            torch_dtype = torch.float32   # fp16 matmuls are slow or missing on CPU
        self.model, self.hf_config = load_model(cfg.model, torch_dtype, cfg.device, cfg.attention_backend,
                                                deterministic=cfg.deterministic,
                                                dummy=cfg.load_format == "dummy", seed=cfg.seed)
        self.dtype = torch_dtype
        self.vocab_size = self.model.vocab_size

        # 2. lengths and KV cache size
        max_pos = getattr(hf_config, "max_position_embeddings", None)
        if cfg.max_model_len is None:
            cfg.max_model_len = int(max_pos) if max_pos else 4096
        elif max_pos and cfg.max_model_len > max_pos:
            raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's "
                             f"max_position_embeddings {max_pos}")
        self.bytes_per_block = kv_cache_bytes_per_block(self.model, cfg.block_size)
        if cfg.num_blocks is None:
            cfg.num_blocks = self._auto_num_blocks(cfg)
        self.config = cfg
        self.kv_caches = allocate_kv_caches(self.model, cfg.num_blocks, cfg.block_size)
        self.kv = KVCacheManager(cfg.num_blocks, cfg.block_size)

        # 3. tokenizer (optional: token-id prompts work without one) and stop rules
        if skip_tokenizer_init:     # vLLM's: token ids in and out, no text
            self.tokenizer = None
        elif tokenizer is None:
            self.tokenizer = self._load_tokenizer(cfg.model)
        else:
            self.tokenizer = self._load_tokenizer(os.fspath(tokenizer), required=True)
        self.eos_token_ids = self._eos_ids(cfg.model, hf_config, self.tokenizer)
        self._stop = StopChecker(self.tokenizer, self.eos_token_ids, cfg.max_model_len)

        self.scheduler = Scheduler(self.kv, cfg.block_size, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                   cfg.enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.kv_caches, cfg.block_size, cfg.device, cfg.logprobs_mode)
        self._rng = random.Random(cfg.seed)
        self._handles: dict[int, SequenceHandle] = {}
        self._num_requests = 0
        self._asleep: set[str] = set()     # sleep-mode tags not woken up yet

    # ---- construction helpers -----------------------------------------------------------------
    def _auto_num_blocks(self, cfg) -> int:
        if cfg.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
            budget = free * cfg.gpu_memory_utilization - 2 * 2**30   # headroom for activations
        else:
            budget = cfg.kv_cache_memory_gb * 2**30
        blocks = int(budget // self.bytes_per_block)
        # no more than a full batch of max-length sequences twice over (cache + kept handles)
        cap = 2 * cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size)
        blocks = min(blocks, cap)
        if blocks < 1:
            raise ValueError(f"no memory for the KV cache ({budget / 2**30:.2f} GiB budget, "
                             f"{self.bytes_per_block} bytes per block); pass num_blocks")
        return blocks

    @staticmethod
    def _load_tokenizer(model_dir, required: bool = False):
        has_tok = any(os.path.isfile(os.path.join(model_dir, f))
                      for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
        if not has_tok and required:
            raise FileNotFoundError(f"tokenizer={model_dir!r} holds no tokenizer (tokenizer.json, "
                                    f"tokenizer_config.json, tokenizer.model or vocab.json)")
        if not has_tok:
            warnings.warn(f"no tokenizer in {model_dir!r}: only token-id prompts work, outputs have no text")
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # transformers raises many types for a broken tokenizer
            raise ValueError(f"cannot load the tokenizer in {model_dir!r}: {exc}") from exc

    @staticmethod
    def _eos_ids(model_dir, hf_config, tokenizer) -> set[int]:
        ids = set()

        def add(v):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(x for x in v if isinstance(x, int))

        add(getattr(hf_config, "eos_token_id", None))
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            import json

            try:
                with open(gen_path) as f:
                    add(json.load(f).get("eos_token_id"))
            except ValueError:
                pass
        if tokenizer is not None:
            add(tokenizer.eos_token_id)
        return ids

    # ---- public API ----------------------------------------------------------------------------
    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 keep: bool = False, use_tqdm: bool = False, lora_request=None,
                 priority=None) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids or Fork); outputs come in input order.
        vLLM's `lora_request` and `priority` (veRL passes lora_request=None) are accepted as None."""
        if not isinstance(keep, bool):
            raise TypeError(f"keep must be a bool, got {keep!r}")
        if lora_request is not None or priority is not None:
            raise ValueError("lora_request and priority are not supported (no LoRA adapters, FIFO scheduling); "
                             "leave them at None")
        items = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(items)
        elif isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(items):
                raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(items)} prompts; "
                                 "pass one, or one per prompt")
            params = list(sampling_params)
            for p in params:
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        else:
            raise TypeError(f"sampling_params must be SamplingParams or a list of them, "
                            f"got {type(sampling_params).__name__}")
        reqs = [self._make_request(i, item, p, keep) for i, (item, p) in enumerate(zip(items, params))]
        base, self._num_requests = self._num_requests, self._num_requests + len(reqs)
        return self._run(reqs, use_tqdm, base)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             keep: bool = False) -> list[RequestOutput]:
        """vLLM's `chat`: one conversation (a list of {"role": ..., "content": ...} messages) or a
        list of them, rendered by the tokenizer's chat template (or `chat_template`), then generated
        like `generate` (TRL calls this for conversational datasets). The rendered text is encoded
        without adding special tokens (the template writes its own) and is each output's `prompt`."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer and this model folder has none; render the prompt "
                             "yourself and pass token ids to generate")
        template = chat_template if chat_template is not None else getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("the tokenizer has no chat template; pass chat_template= (a Jinja template, as "
                             "in vLLM) or render the prompt yourself and call generate")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be True "
                             "(continue_final_message extends the last message; pass add_generation_prompt=False)")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages must be a conversation (a non-empty list of {'role', 'content'} dicts) or "
                            f"a list of conversations, got {messages!r:.80}")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        for c in conversations:
            if not isinstance(c, (list, tuple)) or not c or not all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in c):
                raise TypeError("each conversation must be a non-empty list of dicts with 'role' and 'content', "
                                f"got {c!r:.80}")
        texts = [self.tokenizer.apply_chat_template(
            list(c), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
            for c in conversations]
        # vLLM's prompt dicts: the ids are what runs, the text is what the output shows
        return self.generate([{"prompt_token_ids": self._encode(t, "the rendered conversation", special=False),
                               "prompt": t} for t in texts], sampling_params, keep=keep, use_tqdm=use_tqdm)

    def fork(self, handle: SequenceHandle, at, n: int | None = None, suffix=None,
             params: SamplingParams | None = None, keep: bool = False,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """n branches from each position of `at` (an int or a list): one RequestOutput per position.
        n defaults to params.n; when both are given, n wins."""
        positions = [at] if _is_int(at) else at
        if not isinstance(positions, (list, tuple)):
            raise TypeError(f"at must be an int or a list of ints, got {type(at).__name__}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if n is not None and n != params.n:
            params = dataclasses.replace(params, n=n)
        return self.generate([Fork(handle, t, suffix) for t in positions], params, keep=keep, use_tqdm=use_tqdm)

    def release(self, handle: SequenceHandle) -> None:
        """Unpin a kept sequence's KV. Releasing twice (or a foreign handle) is a ValueError."""
        self._check_handle(handle)
        del self._handles[handle.seq_id]
        handle.released = True
        self.kv.free_sequence(handle.seq_id)

    def release_all(self) -> None:
        for h in list(self._handles.values()):
            self.release(h)

    def update_weights(self, state_dict) -> None:
        """Load new weights (Hugging Face names, any subset) in place; the prefix cache of the old
        weights is dropped, so no KV computed with them is reused by new requests."""
        if not hasattr(state_dict, "items"):
            try:
                state_dict = dict(state_dict)
            except (TypeError, ValueError) as exc:
                raise TypeError("update_weights takes a mapping or an iterable of (name, tensor) pairs "
                                f"({exc})") from exc
        self.model.load_weights(state_dict)
        old = self.scheduler.version
        self.scheduler.version = old + 1
        self.kv.drop_version(old)

    @property
    def llm_engine(self):
        """The path vLLM-based trainers take to push weights into a colocated engine,
        `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(pairs)` (TRL's
        colocate mode, once per parameter): here it is `update_weights`, which also drops the
        prefix cache of the old weights. Nothing else of vLLM's engine object exists."""
        return _VllmEnginePath(self)

    @property
    def weight_version(self) -> int:
        return self.scheduler.version

    def get_rng_state(self) -> dict:
        """The engine's sampling-seed state: what draws the seed of every request whose
        SamplingParams.seed is None. Save it with a training checkpoint for exact resume."""
        return {"seed_rng": self._rng.getstate(), "num_requests": self._num_requests}

    def set_rng_state(self, state: dict) -> None:
        """Restore a state from get_rng_state(): the next unseeded requests draw the same seeds."""
        if not isinstance(state, dict) or set(state) != {"seed_rng", "num_requests"}:
            raise ValueError("expected the dict returned by LLM.get_rng_state() "
                             "(keys 'seed_rng' and 'num_requests')")
        num = state["num_requests"]
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise ValueError(f"num_requests must be a non-negative int, got {num!r}")
        rng = random.Random()
        try:
            # a checkpoint round trip may turn the state's tuples into lists
            st = state["seed_rng"]
            rng.setstate((st[0], tuple(st[1]), st[2]))
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"seed_rng is not a random.Random state: {exc}") from exc
        self._rng, self._num_requests = rng, num

    def reset_prefix_cache(self) -> None:
        self.kv.clear_prefix_cache()

    # ---- vLLM's sleep mode ---------------------------------------------------------------------
    _SLEEP_TAGS = ("weights", "kv_cache")

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode (needs `LLM(enable_sleep_mode=True)`): frees the KV cache between
        generate calls, e.g. while a colocated trainer steps, and drops the prefix cache with it.
        Level 2 also drops the prepacked copies of the linear weights (a second copy of them on a
        CPU; rebuilt at the next forward). The weights stay where they are: vLLM offloads them
        (level 1) or discards them (level 2), which on a CPU gives no memory back; on CUDA they are
        not offloaded. On a CPU the C heap is trimmed after the cache is freed, so its memory goes
        back to the OS even where the allocator had placed it in its heap. Generating needs
        `wake_up()` first. Kept handles pin KV blocks, so sleep refuses while any is kept
        (release them first); nothing is freed then."""
        self._check_sleep_mode()
        if isinstance(level, bool) or level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        if self._handles:
            raise RuntimeError(f"{len(self._handles)} kept handle(s) hold KV blocks that sleep() would free: "
                               "release them (LLM.release / release_all) first")
        self.kv.clear_prefix_cache()
        if self.kv.num_free_blocks() != self.kv.num_blocks:
            raise RuntimeError("KV blocks are still in use; sleep() is only possible between generate calls")
        empty = torch.empty(0, dtype=self.dtype, device=self.config.device)
        self.kv_caches[:] = [(empty, empty)] * len(self.kv_caches)
        if level == 2:
            self.model.drop_packed_weights()
        gc.collect()   # a cache tensor still reachable only from garbage cycles goes now, not at some later collection
        if self.config.device.startswith("cuda"):
            torch.cuda.empty_cache()
        else:
            _trim_heap()
        self._asleep = set(self._SLEEP_TAGS)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undoes `sleep` for `tags` ("weights", "kv_cache"; None: both), as vLLM's: the usual
        order is wake_up(["weights"]), push the new weights, wake_up(["kv_cache"]). The KV cache
        comes back zeroed and empty; waking what is awake does nothing."""
        self._check_sleep_mode()
        if tags is None:
            tags = list(self._SLEEP_TAGS)
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise TypeError(f"tags must be a list of strings, got {tags!r}")
        unknown = [t for t in tags if t not in self._SLEEP_TAGS]
        if unknown:
            raise ValueError(f"unknown wake_up tag(s) {unknown}; expected some of {list(self._SLEEP_TAGS)}")
        if "kv_cache" in tags and "kv_cache" in self._asleep:
            from mrt_engine.models import allocate_kv_caches

            self.kv_caches[:] = allocate_kv_caches(self.model, self.config.num_blocks, self.config.block_size)
        self._asleep -= set(tags)

    def _check_sleep_mode(self) -> None:
        if not self.config.enable_sleep_mode:
            raise ValueError("sleep mode is off: create the engine with LLM(..., enable_sleep_mode=True)")

    def kv_stats(self) -> dict:
        kv = self.kv
        total, free, cached = kv.num_blocks, kv.num_free_blocks(), kv.num_cached_blocks()
        st = dict(self.scheduler.stats)
        st.update(total_blocks=total, free_blocks=free, cached_blocks=cached, used_blocks=total - free - cached,
                  shared_blocks=kv.num_shared_blocks(), kept_handles=len(self._handles),
                  block_size=self.config.block_size, bytes_per_block=self.bytes_per_block,
                  weight_version=self.scheduler.version)
        return st

    def reset_stats(self) -> None:
        for k in self.scheduler.stats:
            self.scheduler.stats[k] = 0

    # ---- input checking ------------------------------------------------------------------------
    def _normalize_prompts(self, prompts) -> list:
        if isinstance(prompts, (str, Fork, dict)):
            return [prompts]
        if isinstance(prompts, tuple):
            prompts = list(prompts)
        if not isinstance(prompts, list):
            raise TypeError("prompts must be a str, a list of str, a list of token-id lists, vLLM-style dicts "
                            f"({{'prompt_token_ids': [...]}} or {{'prompt': str}}) or Fork items; got "
                            f"{type(prompts).__name__}")
        if prompts and all(_is_int(x) for x in prompts):
            return [prompts]   # one token-id prompt
        return prompts

    def _check_tokens(self, ids, what) -> list[int]:
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"{what} must be a str or a list of token ids, got {type(ids).__name__}")
        out = []
        for t in ids:
            if not _is_int(t):
                raise TypeError(f"{what} must hold ints, got {t!r}")
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} in {what} is outside the vocabulary [0, {self.vocab_size})")
            out.append(t)
        return out

    def _encode(self, text, what, special: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{what} is text but the model folder has no tokenizer; pass token ids")
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, SequenceHandle):
            raise TypeError(f"expected a SequenceHandle (CompletionOutput.handle with keep=True), "
                            f"got {type(handle).__name__}")
        if handle._owner != id(self):
            raise ValueError("this handle belongs to another LLM instance")
        if handle.released or handle.seq_id not in self._handles:
            raise ValueError(f"handle of sequence {handle.seq_id} was already released")

    def _make_request(self, index, item, params, keep) -> Request:
        # vLLM's check: a dict of k alternatives per token adds up (the vocabulary at worst)
        for name, k in (("logprobs", params.top_logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if k is not None and k > self.config.max_logprobs:
                raise ValueError(f"prompt {index}: {name}={k} is more than max_logprobs="
                                 f"{self.config.max_logprobs} (raise it with LLM(max_logprobs=...))")
        fork_source, fork_at, prompt = None, 0, None
        if isinstance(item, dict):
            # vLLM's TokensPrompt / TextPrompt: its text or ids take the paths below (the ids win
            # when both are given, as in vLLM; the text is then only what the output shows)
            other = set(item) - {"prompt", "prompt_token_ids"}
            if other or not item:
                raise ValueError(f"prompt {index}: a dict prompt takes 'prompt_token_ids' and/or 'prompt' only "
                                 f"(multi-modal inputs are not supported), got keys {sorted(item)}")
            if "prompt" in item and not isinstance(item["prompt"], str):
                raise TypeError(f"prompt {index}: 'prompt' must be a str, got {type(item['prompt']).__name__}")
            ids = item.get("prompt_token_ids")
            if ids is not None and not isinstance(ids, (list, tuple)):
                raise TypeError(f"prompt {index}: 'prompt_token_ids' must be a list of token ids, got "
                                f"{type(ids).__name__}")
            prompt = item.get("prompt")
            item = prompt if ids is None else ids
        if isinstance(item, Fork):
            self._check_handle(item.handle)
            h = item.handle
            if h.version != self.scheduler.version:
                raise ValueError(f"handle of sequence {h.seq_id} holds KV of weight version {h.version}, "
                                 f"the model is now at {self.scheduler.version}; fork before update_weights")
            if not _is_int(item.at) or not 1 <= item.at <= len(h):
                raise ValueError(f"fork position must be an int in [1, {len(h)}] (the kept sequence's "
                                 f"length), got {item.at!r}")
            at = int(item.at)     # NumPy positions (boundaries computed with NumPy) as well
            if item.suffix is None:
                suffix = []
            elif isinstance(item.suffix, str):
                suffix = self._encode(item.suffix, "fork suffix", special=False) if item.suffix else []
            else:
                suffix = self._check_tokens(item.suffix, "fork suffix")
            ids = list(h.token_ids[:at]) + suffix
            if at >= 2:
                # the first at-1 tokens have KV; token at-1 is re-fed so its logits exist
                fork_source, fork_at = h.seq_id, at - 1
        elif isinstance(item, str):
            if not item:
                raise ValueError(f"prompt {index} is empty")
            prompt = item
            ids = self._encode(item, f"prompt {index}", special=True)
        else:
            ids = self._check_tokens(item, f"prompt {index}")
        if not ids:
            raise ValueError(f"prompt {index} is empty (it must hold at least one token)")
        max_len = self.config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; max_model_len is {max_len}, which "
                             "leaves no room to generate")
        total = max_len if params.max_tokens is None else min(len(ids) + params.max_tokens, max_len)
        need = -(-total // self.config.block_size)
        if need > self.kv.num_blocks:
            raise ValueError(f"prompt {index} needs up to {need} KV blocks ({total} tokens) but the cache has "
                             f"{self.kv.num_blocks}; lower max_tokens or raise num_blocks")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and the model folder has none; use stop_token_ids")
        if params.seed is None:
            seed = self._rng.getrandbits(64)
        else:
            # the prompt goes into the seed so that one seed shared by many prompts (e.g. every
            # fork of a call) does not give them all the same uniforms; same seed + same prompt
            # still means the same tokens, whatever else is in the batch
            digest = hashlib.blake2b(array("q", ids).tobytes(), digest_size=8).digest()
            seed = (params.seed ^ int.from_bytes(digest, "little")) & ((1 << 64) - 1)
        return Request(index, prompt, ids, params, seed, keep, fork_source, fork_at)

    # ---- the generation loop -------------------------------------------------------------------
    def _run(self, reqs: list[Request], use_tqdm: bool, base: int) -> list[RequestOutput]:
        if self._asleep:
            raise RuntimeError(f"the engine is asleep ({', '.join(sorted(self._asleep))} not woken up): "
                               "call wake_up() before generating")
        sched = self.scheduler
        for r in reqs:
            leader = Sequence(sched.new_seq_id(), r, 0, r.prompt_token_ids, spawn=r.params.n)
            r.seqs[0] = leader
            sched.add(leader)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(reqs), desc="generate", unit="req")
        remaining = sum(1 for r in reqs if not r.finished)
        try:
            while remaining:
                batch = sched.schedule()
                rows = sched.sample_rows(batch)
                tokens, logprobs = self.runner.execute(batch, rows)
                finished = sched.update(batch, tokens, logprobs, self._stop)
                done = len({id(s.request) for s in finished if s.request.finished})
                remaining -= done
                if bar is not None and done:
                    bar.update(done)
        except BaseException:
            sched.abort([s for r in reqs for s in r.seqs if s is not None])
            raise
        finally:
            self.runner.end_call()
            if bar is not None:
                bar.close()
        assert not sched.has_unfinished(), "a generate call left sequences behind"
        return [self._output(r, str(base + r.index)) for r in reqs]

    def _output(self, r: Request, request_id: str) -> RequestOutput:
        outs = []
        for s in r.seqs:
            handle = None
            if r.keep:
                handle = SequenceHandle(s.seq_id, s.token_ids, s.num_prompt_tokens, self.scheduler.version, id(self))
                self._handles[s.seq_id] = handle
            outs.append(CompletionOutput(
                index=s.sample_index, text=final_text(self.tokenizer, s), token_ids=s.output_token_ids,
                logprobs=self._logprobs_out(r.params, s) if r.params.returns_logprobs else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason, handle=handle))
        prompt_lps = None
        if r.prompt_logprobs is not None:
            prompt_lps = self._logprob_dicts(r.prompt_token_ids, r.prompt_logprobs)
        return RequestOutput(request_id=request_id, prompt=r.prompt,
                             prompt_token_ids=list(r.prompt_token_ids), outputs=outs, finished=True,
                             num_cached_tokens=r.num_cached_tokens, prompt_logprobs=prompt_lps)

    def _logprobs_out(self, params, s) -> list:
        """A sample's logprobs: floats, or vLLM's {id: Logprob} per token for a count (see
        ModelRunner._add_ranks for what the runner recorded)."""
        if params.top_logprobs is None:
            return list(s.logprobs)
        return self._logprob_dicts(s.output_token_ids, s.logprobs)

    def _logprob_dicts(self, toks, records) -> list[dict[int, Logprob] | None]:
        """vLLM's {id: Logprob} per token from (logprob, rank, [(id, logprob, rank)]) records; None
        where the record is (a prompt's first token, a Fork's reused prefix)."""
        text = {}
        if self.tokenizer is not None:    # each distinct id decoded once, in one call
            ids = sorted({t for t, rec in zip(toks, records) if rec is not None}
                         | {a for rec in records if rec is not None for a, _, _ in rec[2]})
            text = dict(zip(ids, self.tokenizer.batch_decode([[i] for i in ids])))
        out = []
        for tok, rec in zip(toks, records):
            if rec is None:
                out.append(None)
                continue
            lp, rank, alts = rec
            entry = {tok: Logprob(lp, rank, text.get(tok))}       # the token itself first, as in vLLM
            for alt, alt_lp, alt_rank in alts:
                if alt not in entry:
                    entry[alt] = Logprob(alt_lp, alt_rank, text.get(alt))
            out.append(entry)
        return out


class _VllmEnginePath:
    """`llm_engine.model_executor.driver_worker[.worker].model_runner.model` of vLLM (veRL's path has
    `.worker`), ending in load_weights."""

    def __init__(self, llm: LLM):
        self._llm = llm

    def __getattr__(self, name):
        if name in ("model_executor", "driver_worker", "worker", "model_runner", "model"):
            return self
        raise AttributeError(f"{name!r}: this engine mirrors only vLLM's weight-loading path "
                             f"(llm_engine.model_executor.driver_worker.model_runner.model.load_weights); "
                             f"use LLM.update_weights")

    def load_weights(self, weights) -> set[str]:
        pairs = list(weights.items() if hasattr(weights, "items") else weights)
        self._llm.update_weights(pairs)
        return {name for name, _ in pairs}


def _is_int(x) -> bool:
    """A token id or a position: any integer (Python or NumPy) but a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
