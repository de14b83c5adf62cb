"""SamplingParams (vLLM names) and the batched sampler.

The sampler works on a whole step at once, [R, V] rows, with no Python loop over rows or vocab:
temperature (0 = greedy), top-k, top-p, min-p, then inverse-CDF sampling with one uniform per row.
The uniform of a row is a counter-based hash of (seed, sample index, step), so a seeded request
draws the same tokens whatever else shares its batch, and recompute after preemption re-draws the
same tokens. The returned logprob is log_softmax(logits / T) of the sampled token (T = 1 when
greedy) before any truncation: what a GRPO trainer recomputes.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from mrt_engine import sampling_cpu

_U64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 16          # None: until max_model_len (vLLM)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    # True: each sampled token's logprob as a float; vLLM's spellings: None (none) or a count k >= 0:
    # vLLM's shape, per token {sampled id: Logprob, then the k most likely ids: Logprob}
    logprobs: bool | int | None = True
    # vLLM's: per prompt token (the first has none) {prompt token: Logprob, then the k most likely
    # ids}, log_softmax of the raw logits (no temperature); the prompt is computed, not taken from
    # the prefix cache, for that. A Fork prompt computes only its suffix (and the re-fed token
    # before it): its prefix positions stay None, the suffix is scored at the cost of the suffix
    prompt_logprobs: int | None = None
    # vLLM's: None (the default) skips reading the prefix cache when prompt_logprobs is set, so
    # every position is scored; False reads it anyway (cached positions' prompt logprobs are then
    # None: only the rest of the prompt is computed); True skips it whatever else is asked
    skip_reading_prefix_cache: bool | None = None
    # vLLM's penalties, accepted at their neutral values (what TRL passes by default) so that its
    # calls port unchanged; the sampler does not implement them
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's text options, honoured: no text at all, special tokens kept, the matched stop string kept
    detokenize: bool = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # further vLLM fields a port passes (TRL passes guided_decoding / structured_outputs=None),
    # accepted at the values that mean what this engine does
    min_tokens: int = 0
    best_of: int | None = None
    guided_decoding: object = None
    structured_outputs: object = None
    bad_words: list | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self):
        # NumPy scalars count (sweeps and configs often produce them), stored as Python numbers
        def num(name, v):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a number, got {v!r}")
            return float(v)

        def integer(name, v):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {v!r}")
            setattr(self, name, int(v))
            return int(v)

        if integer("n", self.n) < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        self.temperature = num("temperature", self.temperature)
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        self.top_p = num("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if integer("top_k", self.top_k) < -1:
            raise ValueError(f"top_k must be -1 or 0 (off, as in vLLM; TRL passes 0) or >= 1, got {self.top_k}")
        if self.top_k == 0:
            self.top_k = -1
        self.min_p = num("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and integer("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        for t in self.stop_token_ids:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        for name in ("ignore_eos", "detokenize", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        if self.seed is not None:
            integer("seed", self.seed)
        for name, neutral in (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
            if num(name, getattr(self, name)) != neutral:
                raise ValueError(f"{name}={getattr(self, name)} is not supported (this engine's sampler has no "
                                 f"penalties); leave it at {neutral}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True (they are matched in the text); use "
                             "stop_token_ids with detokenize=False")
        if integer("min_tokens", self.min_tokens) != 0:
            raise ValueError(f"min_tokens={self.min_tokens} is not supported (the sampler never suppresses "
                             f"EOS or stops); leave it at 0")
        if self.best_of is not None and integer("best_of", self.best_of) != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported (every sample is returned); leave it at "
                             f"None or n")
        self.best_of = None     # equal to n: no information, and dataclasses.replace(p, n=...) stays valid
        for name in ("guided_decoding", "structured_outputs", "bad_words", "truncate_prompt_tokens"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported by this engine's sampler; leave it at None")
        if self.logprobs is None:
            self.logprobs = False                 # vLLM's default: none
        elif isinstance(self.logprobs, numbers.Integral) and not isinstance(self.logprobs, (bool, np.bool_)):
            # vLLM's count of top alternatives (logprobs=0, what TRL and veRL pass: the sampled
            # token's only), kept as an int: the output then takes vLLM's dict-of-Logprob shape
            if self.logprobs < 0:
                raise ValueError(f"logprobs must be True/False, None or a count >= 0, got {self.logprobs}")
            self.logprobs = int(self.logprobs)
        elif isinstance(self.logprobs, np.bool_):
            self.logprobs = bool(self.logprobs)
        elif not isinstance(self.logprobs, bool):
            raise TypeError(f"logprobs must be True/False, None or a count >= 0 (vLLM), got {self.logprobs!r}")
        if self.prompt_logprobs is not None and integer("prompt_logprobs", self.prompt_logprobs) < 0:
            raise ValueError(f"prompt_logprobs must be None or a count >= 0, got {self.prompt_logprobs}")
        if self.skip_reading_prefix_cache is None:
            self.skip_reading_prefix_cache = self.prompt_logprobs is not None
        elif not isinstance(self.skip_reading_prefix_cache, (bool, np.bool_)):
            raise TypeError(f"skip_reading_prefix_cache must be a bool or None, got {self.skip_reading_prefix_cache!r}")
        self.skip_reading_prefix_cache = bool(self.skip_reading_prefix_cache)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def returns_logprobs(self) -> bool:
        return self.logprobs is not False

    @property
    def top_logprobs(self) -> int | None:
        """vLLM's count of alternatives when logprobs were asked for in vLLM's spelling, else None
        (then logprobs are plain floats)."""
        return None if isinstance(self.logprobs, bool) else self.logprobs


# ---- counter-based uniforms ------------------------------------------------------------------

def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_keys(seeds: list[int], sample_indices: list[int]) -> np.ndarray:
    """The step-independent half of counter_uniforms: a uint64 key per row from (seed, sample
    index). A caller that samples the same rows at several steps computes it once."""
    s = np.array([x & _U64 for x in seeds], dtype=np.uint64)
    return _splitmix64(_splitmix64(s) ^ np.array(sample_indices, dtype=np.uint64))


def counter_uniforms(seeds: list[int], sample_indices: list[int], steps, keys: np.ndarray | None = None) -> np.ndarray:
    """One uniform in [0, 1) per row, a pure function of (seed, sample index, step); `keys`, when
    given, is counter_keys(seeds, sample_indices) (then those two are not read).

    23 random bits, so u * total stays strictly below total in float32 (see Sampler)."""
    if keys is None:
        keys = counter_keys(seeds, sample_indices)
    h = _splitmix64(keys ^ np.asarray(steps).astype(np.uint64))
    return (h >> np.uint64(41)).astype(np.float64) * (1.0 / (1 << 23))


def _flags(temps, top_k, top_p, min_p) -> dict:
    """A step's routing flags from its rows' knobs (host lists)."""
    all_greedy = all(t == 0.0 for t in temps)
    return dict(all_greedy=all_greedy, any_greedy=any(t == 0.0 for t in temps),
                any_top_k=not all_greedy and any(k != -1 for k in top_k),
                any_top_p=not all_greedy and any(p < 1.0 for p in top_p),
                any_min_p=not all_greedy and any(m > 0.0 for m in min_p),
                all_unit_temperature=all(t == 1.0 for t in temps))


@dataclass
class SamplingTensors:
    """Per-row sampling inputs for one step, all [R] on the logits' device."""
    logit_rows: torch.Tensor | None   # int64 rows of the logits to sample from (None: identity)
    temperature: torch.Tensor         # float32, 0 = greedy
    top_p: torch.Tensor               # float32
    top_k: torch.Tensor               # int64, -1 = off
    min_p: torch.Tensor               # float32
    uniform: torch.Tensor             # float32 in [0, 1)
    inv_temperature: torch.Tensor     # float32 1/T (1 for greedy rows), the sampler's logit scale
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    all_unit_temperature: bool = False   # every row T == 1: scaling the logits is a no-op
    # host copies of each row's knobs (temperature, top_k, top_p, min_p): the sampler routes rows
    # by them without a device sync
    host: tuple = ()

    @property
    def truncates(self) -> list[bool]:
        """Per row: does it sample a truncated distribution (top-k, top-p or min-p, not greedy)?"""
        return [t != 0.0 and (k != -1 or p < 1.0 or m > 0.0) for t, k, p, m in zip(*self.host)]

    def select(self, idx: list[int]) -> "SamplingTensors":
        """The rows `idx`, as their own step (flags recomputed from those rows only)."""
        i = torch.tensor(idx, dtype=torch.long, device=self.temperature.device)
        host = tuple([v[j] for j in idx] for v in self.host)
        return SamplingTensors(
            logit_rows=i if self.logit_rows is None else self.logit_rows.index_select(0, i),
            temperature=self.temperature.index_select(0, i), top_p=self.top_p.index_select(0, i),
            top_k=self.top_k.index_select(0, i), min_p=self.min_p.index_select(0, i),
            uniform=self.uniform.index_select(0, i), inv_temperature=self.inv_temperature.index_select(0, i),
            host=host, **_flags(*host))

    @staticmethod
    def knobs(rows, params) -> tuple:
        """What build() reads from the rows' params (and logits rows), not from their step counters:
        (host knobs, the step's [7, R] float32 buffer but for its uniforms (row 3), the step's flags).
        A caller that samples the same rows again passes it back to build() instead of the params."""
        host = tuple([getattr(p, name) for p in params] for name in ("temperature", "top_k", "top_p", "min_p"))
        temps, top_k, top_p, min_p = host
        # rows: temperature, top_p, min_p, (uniform), top_k, logits row, 1/T; ids and top-k are
        # exact in float32
        fixed = np.zeros((7, len(params)), dtype=np.float32)
        fixed[0], fixed[1], fixed[2], fixed[4] = temps, top_p, min_p, top_k
        if rows is not None:
            fixed[5] = rows
        # 1/T as the sampler computed it in float32 (a correctly rounded division of the clamped
        # T), 1 for greedy rows
        t = fixed[0]
        fixed[6] = 1.0
        np.divide(np.float32(1.0), np.maximum(t, np.float32(1e-30)), out=fixed[6], where=t != 0)
        return host, fixed, _flags(*host)

    @classmethod
    def build(cls, rows, params, seeds, sample_indices, steps, device, knobs=None, keys=None) -> "SamplingTensors":
        """rows: logits row per sample row (None when row i samples logits row i); params: one
        SamplingParams per row (unused when `knobs`, from knobs(rows, params), is given); keys:
        counter_keys(seeds, sample_indices), when the caller kept it (then those are not read)."""
        host, fixed, flags = knobs if knobs is not None else cls.knobs(rows, params)
        # one [7, R] float32 buffer, one host-to-device copy
        arr = fixed.copy()
        if not flags["all_greedy"]:
            arr[3] = counter_uniforms(seeds, sample_indices, steps, keys)
        buf = torch.from_numpy(arr)
        if torch.device(device).type != "cpu":
            buf = buf.to(device, non_blocking=True)
        return cls(
            logit_rows=None if rows is None else buf[5].long(),
            temperature=buf[0],
            top_p=buf[1],
            top_k=buf[4].long(),
            min_p=buf[2],
            uniform=buf[3],
            inv_temperature=buf[6],
            host=host,
            **flags,
        )


class Sampler:
    """logits [M, V] (any float dtype) -> (tokens [R] int64, logprobs [R] float32).

    Without top-k/top-p/min-p in the step (the common RL case) it samples by a two-level inverse
    CDF and never sorts, normalises or cumsums the whole vocabulary:
      1. w = exp(x/T - max) into a reused fp32 workspace (a fresh 100+ MB tensor per step costs
         page faults on every step), one pass;
      2. block sums of w over C ~ sqrt(V) consecutive ids, their cumsum per row (small);
      3. the block holding u * total, then the id inside that block by a cumsum of its C weights.
    That is inverse-CDF sampling of softmax(x/T) (the same distribution as one big cumsum), on the
    same counter-based uniform, so rows stay seeded and batch-invariant. The logprob is
    x[tok]/T - max - log(total) = log_softmax(x/T)[tok]. Rows share a logits row (a request's n
    samples at its prompt end) without copying it: the vocab-sized work runs once per logits row.
    Rows with top-k/top-p/min-p take the general path: one softmax, a sort, masks, one cumsum in id
    order. A step routes each row by its own knobs only, so rows stay batch-invariant.
    """

    def __init__(self):
        self._work: torch.Tensor | None = None
        # set by a call with processed=True: per sample row, how many of the most likely tokens
        # the row's top-k/top-p/min-p kept (the vocabulary size for rows that do not truncate)
        self.kept_counts: torch.Tensor | None = None

    def _workspace(self, shape, device) -> torch.Tensor:
        n = shape[0] * shape[1]
        if self._work is None or self._work.numel() < n or self._work.device != torch.device(device):
            self._work = torch.empty(n, dtype=torch.float32, device=device)
        return self._work[:n].view(shape)

    def __call__(self, logits: torch.Tensor, st: SamplingTensors,
                 processed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`processed`: a truncating row's logprob is taken in its truncated distribution (vLLM's
        processed_logprobs: log of p / the kept mass), and `kept_counts` is set."""
        self.kept_counts = None
        if not (st.any_top_k or st.any_top_p or st.any_min_p):
            if processed:
                self.kept_counts = torch.full((st.temperature.shape[0],), logits.shape[1], dtype=torch.long,
                                              device=logits.device)
            return self._sample_full(logits, st)
        truncates = st.truncates
        if all(truncates):
            tokens, logprobs, kept = self._sample_truncated(logits, st, processed)
            self.kept_counts = kept
            return tokens, logprobs
        # a mixed step: every row takes the path it takes alone, so a seeded row samples the same
        # token whatever shares its step (the two paths round differently)
        tokens = torch.empty(len(truncates), dtype=torch.long, device=logits.device)
        logprobs = torch.empty(len(truncates), dtype=torch.float32, device=logits.device)
        kept_all = torch.full((len(truncates),), logits.shape[1], dtype=torch.long, device=logits.device)
        for want in (False, True):
            idx = [i for i, t in enumerate(truncates) if t == want]
            sub = st.select(idx)
            rows = torch.tensor(idx, dtype=torch.long, device=logits.device)
            if want:
                tok, lp, kept = self._sample_truncated(logits, sub, processed)
                if processed:
                    kept_all.index_copy_(0, rows, kept)
            else:
                tok, lp = self._sample_full(logits, sub)
            tokens.index_copy_(0, rows, tok)
            logprobs.index_copy_(0, rows, lp)
        if processed:
            self.kept_counts = kept_all
        return tokens, logprobs

    def _sample_truncated(self, logits: torch.Tensor, st: SamplingTensors, processed: bool = False):
        """Every row truncates (or is greedy): one softmax, masks, one inverse CDF in id order.
        Returns (tokens, logprobs, kept counts or None); `processed`: logprobs in the truncated
        distribution."""
        x = logits if st.logit_rows is None else logits.index_select(0, st.logit_rows)
        x = x.float()
        greedy = st.temperature == 0
        if st.all_unit_temperature:   # x * 1.0 == x exactly: skip a vocab-sized multiply
            probs = torch.softmax(x, dim=-1)                           # [R, V]
        else:
            inv_t = st.inv_temperature
            # the max subtracted before scaling, as in _sample_full (accurate at a small T)
            x = x - x.amax(dim=-1, keepdim=True)
            probs = torch.softmax(x.mul_(inv_t[:, None]), dim=-1)      # [R, V]
        pmax, argmax = probs.max(dim=-1) if (st.any_greedy or st.any_min_p) else (None, None)
        tokens, kept_mass, kept = self._sample(probs, pmax, st, count=processed)
        if st.any_greedy:
            tokens = torch.where(greedy, argmax, tokens)
        logprobs = probs.gather(1, tokens[:, None])[:, 0].log_()
        if not processed:
            return tokens, logprobs, None
        # greedy rows keep their one distribution (vLLM applies no truncation to them)
        logprobs = torch.where(greedy, logprobs, logprobs - kept_mass.log())
        return tokens, logprobs, torch.where(greedy, torch.full_like(kept, probs.shape[1]), kept)

    def _sample_full(self, logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """No truncation in any row: two-level inverse CDF over the unique logits rows."""
        m_rows, V = logits.shape
        rows = st.logit_rows                                   # sample row -> logits row (None: same)
        # 1/T per logits row (rows sharing a logits row share their request's T); greedy: 1
        inv_t = st.inv_temperature
        if rows is not None:
            inv_t = torch.ones(m_rows, dtype=inv_t.dtype, device=inv_t.device).index_copy_(0, rows, inv_t)
        if sampling_cpu.usable(logits):
            return sampling_cpu.sample_full(logits, inv_t, rows if rows is not None else torch.arange(m_rows),
                                            st.uniform, st.temperature == 0)
        w = self._workspace((m_rows, V), logits.device)
        w.copy_(logits)                                        # the one cast / copy of the logits
        mx = w.amax(dim=-1)                                    # [M] exact: a max has no rounding
        # the max is subtracted before scaling by 1/T: at a small T, x / T is huge (1e7 at T = 1e-6,
        # a float32 ulp of 1) and x / T - max(x / T) would carry errors of that size
        w.sub_(mx[:, None])
        if not st.all_unit_temperature:
            w.mul_(inv_t[:, None])
        w.exp_()                                               # weights in (0, 1], max 1
        C = math.isqrt(V - 1) + 1 if V > 1 else 1              # block size ~ sqrt(V)
        full = V // C
        bsum = w.as_strided((m_rows, full, C), (V, C, 1)).sum(dim=-1)      # [M, full]
        if full * C < V:
            bsum = torch.cat((bsum, w[:, full * C:].sum(dim=-1, keepdim=True)), dim=1)
        cb = bsum.cumsum(dim=-1)                               # [M, B]
        total = cb[:, -1]
        if rows is not None:
            cb, total, mx_r = cb.index_select(0, rows), total.index_select(0, rows), mx.index_select(0, rows)
        else:
            mx_r = mx
        r = cb.shape[0]
        ar = torch.arange(r, device=w.device)
        if st.all_greedy:
            tokens = logits.argmax(dim=-1) if rows is None else logits.argmax(dim=-1).index_select(0, rows)
        else:
            # u < 1 with 23 bits: target < total strictly, so the block found has weight > 0
            target = st.uniform * total
            b = torch.searchsorted(cb, target[:, None], right=True)[:, 0].clamp_(max=cb.shape[1] - 1)
            before = torch.where(b > 0, cb.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(target))
            cols = b[:, None] * C + torch.arange(C, device=w.device)[None, :]          # [R, C]
            src = ar if rows is None else rows
            wb = w.view(-1).index_select(0, (src[:, None] * V + cols.clamp(max=V - 1)).view(-1)).view(r, C)
            wb = wb.masked_fill_(cols >= V, 0.0)
            cc = wb.cumsum(dim=-1)
            j = torch.searchsorted(cc, (target - before)[:, None], right=True)
            # rounding (block sum vs its cumsum) may put the residual past the block's last
            # weight: stop at the last id of positive weight, never on a zero-weight id
            last = torch.searchsorted(cc, cc[:, -1:].contiguous(), right=False)
            tokens = b * C + torch.minimum(j, last)[:, 0]
            if st.any_greedy:
                best = logits.argmax(dim=-1)
                tokens = torch.where(st.temperature == 0, best if rows is None else best.index_select(0, rows), tokens)
        src = ar if rows is None else rows
        x_tok = logits[src, tokens].float() - mx_r
        scale = inv_t if rows is None else inv_t.index_select(0, rows)
        if not st.all_unit_temperature:
            x_tok = x_tok * scale
        logprobs = x_tok - total.log()
        return tokens, logprobs

    @staticmethod
    def _sample(probs: torch.Tensor, pmax, st: SamplingTensors, count: bool = False):
        """-> (tokens, kept probability mass, kept token count or None) per row."""
        V = probs.shape[-1]
        if st.any_top_k or st.any_top_p:
            # 1. sort once; top-k, then top-p on the top-k mass, then min-p, all as masks
            sp, si = probs.sort(dim=-1, descending=True, stable=True)   # [R, V]
            rank = torch.arange(V, device=probs.device)
            k = torch.where(st.top_k < 0, torch.full_like(st.top_k, V), st.top_k.clamp(max=V))
            sp = sp.masked_fill(rank[None, :] >= k[:, None], 0.0)
            if st.any_top_p:
                cum = sp.cumsum(dim=-1)
                # keep a token while the mass before it is under top_p; the first always stays
                sp = sp.masked_fill(cum - sp >= st.top_p[:, None] * cum[:, -1:], 0.0)
            if st.any_min_p:
                sp = sp.masked_fill(sp < (st.min_p * sp[:, 0])[:, None], 0.0)
            # 2. the mask back in id order, then sample in id order like the untruncated rows: a
            # min-p-only row then draws the same token whether or not top-k rows share its step
            keep = torch.zeros_like(sp, dtype=torch.bool).scatter_(1, si, sp > 0)
            return Sampler._inverse_cdf(probs.masked_fill(~keep, 0.0), st.uniform, count)
        if st.any_min_p:
            # a masked copy: probs still has to give the logprobs
            return Sampler._inverse_cdf(probs.masked_fill(probs < (st.min_p * pmax)[:, None], 0.0), st.uniform,
                                        count)
        return Sampler._inverse_cdf(probs, st.uniform, count)

    @staticmethod
    def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor, count: bool = False):
        """Index i with cum[i-1] <= u * total < cum[i] (never a zero-weight entry), the total and
        (`count`) the number of nonzero weights per row."""
        cum = weights.cumsum(dim=-1)
        total = cum[:, -1]
        target = (u * total)[:, None].contiguous()
        idx = torch.searchsorted(cum, target, right=True)[:, 0]
        return idx.clamp_(max=weights.shape[-1] - 1), total, ((weights > 0).sum(dim=-1) if count else None)
