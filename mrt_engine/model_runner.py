"""ModelRunner: the only place that turns a scheduled step into tensors, runs the model and samples.

Per step:
1. pending KV block copies (fork tails, copy-on-write) run on every layer's cache;
2. all integer step inputs (token ids, positions, slots, block tables, context lengths, decode
   sharing groups, logits rows) go into one flat int64 list -> one tensor -> one host-to-device
   copy, then views; every layer reuses the same AttentionMetadata (on a CPU the decode block
   tables stay host lists, made a tensor only if a backend asks: `AttentionMetadata.block_tables`);
3. forward, logits for only the rows that sample, the batched sampler, one device-to-host read.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from mrt_engine.attention.metadata import AttentionMetadata, PrefillSeq
from mrt_engine.profiling import section
from mrt_engine.sampling import Sampler, SamplingTensors, counter_keys
from mrt_engine.kv.step_plan import plan_decode_groups


class ModelRunner:
    def __init__(self, model, kv_caches, block_size: int, device, logprobs_mode: str | None = None):
        self.model = model
        self.logprobs_mode = logprobs_mode      # None (ours), "raw_logprobs", "processed_logprobs" (vLLM)
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.sampler = Sampler()
        self._logits_buf: torch.Tensor | None = None
        self._st_cache = None   # _sampling_tensors' knobs of the last all-decode step
        self._groups_memo = None  # (tables, usable blocks, groups) of the last decode step
        self.graphs = self._decode_graphs(model)

    def _decode_graphs(self, model):
        """Piecewise CUDA graphs for decode steps when MRT_CUDA_GRAPHS asks (models/cuda_graphs.py)."""
        from mrt_engine.models import cuda_graphs

        mode = cuda_graphs.mode_from_env()
        if mode is None or not hasattr(model, "layers"):
            return None
        if mode == "capture" and self.device.type != "cuda":
            import warnings

            warnings.warn(f"{cuda_graphs.ENV}=1 needs a CUDA device (this engine runs on {self.device}): "
                          "decode steps run eagerly", stacklevel=3)
            return None
        return cuda_graphs.PiecewiseDecode(model, mode)

    def _logits_buffer(self, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        """[rows, V] view of a flat logits buffer kept across steps (grown when needed)."""
        vocab = getattr(self.model, "vocab_size", None)
        if not isinstance(vocab, int):
            return None
        n = rows * vocab
        buf = self._logits_buf
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._logits_buf = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(rows, vocab)

    def end_call(self) -> None:
        """Drops what the runner kept from the last step for the next one (it holds that step's
        sequences): called when a generate call ends, so nothing of it outlives the call."""
        self._st_cache = None
        self._groups_memo = None

    # 1. KV block copies ------------------------------------------------------------------------
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        srcs = [a for a, _ in copies]
        dsts = [b for _, b in copies]
        if len(set(dsts)) == len(dsts) and not set(srcs) & set(dsts):
            src = torch.tensor(srcs, dtype=torch.int64).to(self.device)
            dst = torch.tensor(dsts, dtype=torch.int64).to(self.device)
            for k_cache, v_cache in self.kv_caches:
                k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
                v_cache.index_copy_(0, dst, v_cache.index_select(0, src))
            return
        for a, b in copies:   # a chain (a copy reading an earlier copy's target): keep the order
            for k_cache, v_cache in self.kv_caches:
                k_cache[b].copy_(k_cache[a])
                v_cache[b].copy_(v_cache[a])

    # 2. step tensors -------------------------------------------------------------------------
    def build(self, batch) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """-> (input_ids [N], metadata, logits_rows [M]) from a ScheduledBatch."""
        ids, pos, slots, logit_rows = [], [], [], []
        prefill_tables = []
        for s, start, n, sl, table in batch.prefills:
            a = len(ids)
            ids.extend(s.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(sl)
            prefill_tables.append((a, n, start + n, table))
            if start + n == len(s.token_ids):
                logit_rows.append(a + n - 1)
        num_prefill = len(ids)
        decodes = batch.decodes
        d = len(decodes)
        ctx = [len(s.token_ids) for s in decodes]
        ids.extend(s.token_ids[-1] for s in decodes)
        pos.extend(c - 1 for c in ctx)
        slots.extend(batch.decode_slots)
        logit_rows.extend(range(num_prefill, num_prefill + d))
        n_tok = len(ids)

        # one flat buffer: [ids | pos | slots | logit_rows | ctx | gptr | grows | gshared | tables...]
        flat = ids + pos + slots + logit_rows + ctx
        gptr = grows = gshared = []
        bmax = 0
        # on a CPU the padded [D, Bmax] tables tensor is built only if a backend asks for it
        # (AttentionMetadata.block_tables): the C++ kernel reads the host lists
        eager_tables = self.device.type != "cpu"
        if d:
            tables = batch.decode_block_tables
            gptr, grows, gshared = self._decode_groups(tables, ctx)
            flat += gptr
            flat += grows
            flat += gshared
            if eager_tables:
                bmax = max(len(t) for t in tables)
                for t in tables:
                    flat += t
                    if len(t) < bmax:
                        flat += [0] * (bmax - len(t))
        tables_off = len(flat)
        for _, _, _, t in prefill_tables:
            flat += t
        # numpy turns a long list of ints into an array ~3x faster than torch.tensor does
        host = torch.from_numpy(np.fromiter(flat, dtype=np.int64, count=len(flat)))
        dev = host.to(self.device, non_blocking=True) if self.device.type == "cuda" else host

        off = 0

        def take(k):
            nonlocal off
            v = dev.narrow(0, off, k)
            off += k
            return v

        input_ids, positions, slot_mapping = take(n_tok), take(n_tok), take(n_tok)
        logits_idx = take(len(logit_rows))
        context_lens = take(d)
        meta = AttentionMetadata(slot_mapping=slot_mapping, positions=positions, num_prefill_tokens=num_prefill)
        if d:
            meta.decode_context_lens = context_lens
            meta.group_ptr = take(len(gptr))
            meta.group_rows = take(len(grows))
            meta.group_num_shared = take(len(gshared))
            if eager_tables:
                meta.decode_block_tables = take(d * bmax).view(d, bmax)
            meta.group_ptr_host = gptr
            meta.group_num_shared_host = gshared
            # host copies for the Triton backend's plan (no device reads back)
            meta.decode_context_lens_host = ctx
            meta.group_rows_host = grows
            meta.decode_block_tables_host = tables
        assert off == tables_off
        for a, n, c, t in prefill_tables:
            meta.prefill_seqs.append(PrefillSeq(token_start=a, num_new=n, context_len=c, block_table=take(len(t)),
                                                block_table_host=t))
        return input_ids, meta, logits_idx

    def _decode_groups(self, tables: list[list[int]], ctx: list[int]) -> tuple[list[int], list[int], list[int]]:
        """plan_decode_groups of the step's decode rows, or the last step's lists when they must be
        the same: the plan depends only on each row's table up to its usable blocks, (ctx - 1) //
        block_size, so the same table lists (the scheduler hands the same list objects while a
        table is unchanged, and nothing writes them) with the same usable counts give the same
        groups. Most decode steps of a call are such steps; planning reads every table entry."""
        bs = self.block_size
        usable = [(c - 1) // bs for c in ctx]
        last = self._groups_memo
        if last is not None and last[1] == usable and all(map(operator.is_, tables, last[0])):
            return last[2]
        groups = plan_decode_groups(tables, ctx, bs)
        self._groups_memo = (tables, usable, groups)
        return groups

    # 3. forward + sample -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch, sample_rows, want_logprobs: bool = True):
        """Runs one step; returns (tokens, logprobs) lists, one entry per sample, in the order of
        sample_rows [(seq, k)]: k samples from that sequence's logits row."""
        with section("runner_other"):
            return self._execute(batch, sample_rows, want_logprobs)

    def _execute(self, batch, sample_rows, want_logprobs):
        with section("kv_copy"):
            self.copy_blocks(batch.copies)
        with section("step_build"):
            input_ids, meta, logits_idx = self.build(batch)
        if self.graphs is not None and self.graphs.eligible(input_ids, meta):
            hidden = self.graphs.forward(input_ids, meta, self.kv_caches)
        else:
            hidden = self.model.forward(input_ids, meta, self.kv_caches)
        prompt_rows = self._prompt_logprob_rows(batch)
        if prompt_rows:
            with section("prompt_logprobs"):
                self._prompt_logprobs(hidden, prompt_rows)
        if not sample_rows:
            return [], []
        # logits in the model dtype, into a buffer reused across steps; the sampler casts once
        logits = self.model.compute_logits(hidden.index_select(0, logits_idx), float32=False,
                                           out=self._logits_buffer(logits_idx.shape[0], hidden.dtype))

        with section("step_build"):
            decode_ctx = None if batch.prefills else meta.decode_context_lens_host
            st, alt_counts = self._sampling_tensors(sample_rows, decode_ctx)
        with section("sampler"):
            tokens, logprobs = self.sampler(logits, st, processed=self.logprobs_mode == "processed_logprobs")
            if self.logprobs_mode == "raw_logprobs" and want_logprobs:
                logprobs = self._raw_logprobs(logits, st, tokens, logprobs)
            if self.device.type == "cpu":
                out_tokens, out_lps = tokens.tolist(), (logprobs.tolist() if want_logprobs else None)
            else:
                # one device-to-host read: token ids are exact in float64
                both = torch.stack((tokens.to(torch.float64), logprobs.to(torch.float64))).cpu()
                out_tokens, out_lps = both[0].long().tolist(), (both[1].tolist() if want_logprobs else None)
            if out_lps is not None and alt_counts:
                self._add_ranks(logits, st, alt_counts, tokens, logprobs, out_lps,
                                self.logprobs_mode == "raw_logprobs", self.sampler.kept_counts)
            return out_tokens, out_lps

    @staticmethod
    def _prompt_logprob_rows(batch) -> list[tuple[int, object, int]]:
        """(step row, request, prompt position) for every prefill row whose next token is a prompt
        token of a request that asked for prompt logprobs (its sample 0 computes the prompt)."""
        rows, a = [], 0
        for s, start, n, _, _ in batch.prefills:
            req = s.request
            if req.computes_prompt_logprobs and s.sample_index == 0:
                last = min(start + n, len(req.prompt_token_ids) - 1)   # position p predicts p + 1
                rows.extend((a + p - start, req, p + 1) for p in range(start, last))
            a += n
        return rows

    def _prompt_logprobs(self, hidden: torch.Tensor, rows) -> None:
        """vLLM's prompt logprobs of the given rows, written into their requests (records as
        `_ranked`'s): log_softmax of the raw logits (float32) at the prompt token. Logits go in
        slices of ~128 MB, whatever the prompt length."""
        dev = hidden.device
        chunk = max(1, (1 << 25) // self.model.vocab_size)
        for i in range(0, len(rows), chunk):
            part = rows[i:i + chunk]
            idx = torch.tensor([r for r, _, _ in part], device=dev)
            x = self.model.compute_logits(hidden.index_select(0, idx), float32=True)      # [c, V]
            tgt = torch.tensor([req.prompt_token_ids[p] for _, req, p in part], device=dev)
            lp = x.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(x, dim=-1)
            records = self._ranked(x, tgt, lp, None, [req.params.prompt_logprobs for _, req, _ in part])
            for (_, req, p), rec in zip(part, records):
                req.prompt_logprobs[p] = rec

    @staticmethod
    def _ranked(x: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor, inv_t: torch.Tensor | None,
                counts: list[int], kept: torch.Tensor | None = None) -> list[tuple]:
        """Per row of x [P, V] (float32 logits) with its token and the token's logprob: (logprob,
        rank, [(id, logprob, rank)] of the counts[i] most likely ids), what the output turns into
        vLLM's Logprob dicts. Ranks count the row's strictly larger logits (1-based); an
        alternative's logprob is the token's plus its logit difference times inv_t (1 when None),
        so it is in the token's distribution to rounding; with `kept` (per row, how many of the
        most likely tokens a truncation kept) the others get -inf. One device-to-host read."""
        x_tok = x.gather(1, tokens[:, None])
        ranks = (x > x_tok).sum(1, keepdim=True) + 1
        kmax = min(max(counts), x.shape[1])
        cols = [logprobs.float()[:, None], ranks]
        if kmax:
            vals, ids = x.topk(kmax, dim=1)
            diff = vals - x_tok
            alt = logprobs.float()[:, None] + (diff if inv_t is None else diff * inv_t[:, None])
            if kept is not None:
                alt = alt.masked_fill(torch.arange(1, kmax + 1, device=x.device)[None, :] > kept[:, None],
                                      float("-inf"))
            cols += [ids, alt]
        # ids and ranks are exact in float64
        host = torch.cat([c.double() for c in cols], dim=1).cpu().tolist()
        return [(h[0], int(h[1]), [(int(h[2 + r]), h[2 + kmax + r], r + 1) for r in range(min(k, kmax))])
                for h, k in zip(host, counts)]

    @staticmethod
    def _logit_rows(st, idx: torch.Tensor) -> torch.Tensor:
        """The logits rows that sample rows `idx` drew from."""
        return idx if st.logit_rows is None else st.logit_rows.index_select(0, idx)

    @classmethod
    def _raw_logprobs(cls, logits, st, tokens, logprobs):
        """vLLM's raw_logprobs: log_softmax(logits)[token], no temperature; recomputed only for rows
        sampled at a temperature other than 1 (greedy rows' logprobs are already at T = 1, and the
        sampler's are before any truncation). Rows are picked on the host copies: no device sync."""
        redo = [i for i, t in enumerate(st.host[0]) if t not in (0.0, 1.0)]
        if not redo:
            return logprobs
        redo = torch.tensor(redo, device=logits.device)
        x = logits.index_select(0, cls._logit_rows(st, redo)).float()
        raw = x.gather(1, tokens.index_select(0, redo)[:, None])[:, 0] - torch.logsumexp(x, dim=-1)
        return logprobs.index_copy(0, redo, raw.to(logprobs.dtype))

    @classmethod
    def _add_ranks(cls, logits, st, alt_counts, tokens, logprobs, out_lps, raw=False, kept_counts=None) -> None:
        """For the samples of requests that asked in vLLM's spelling (`alt_counts`: (sample row, k)),
        replaces the float in out_lps by `_ranked`'s record: alternatives in the sampled token's
        distribution (logit differences over T; over 1 in raw_logprobs mode); in
        processed_logprobs mode a token the row's truncation dropped gets -inf, as in vLLM."""
        flat = [i for i, _ in alt_counts]
        pick = torch.tensor(flat, device=logits.device)
        x = logits.index_select(0, cls._logit_rows(st, pick)).float()            # [P, V]
        temps = [st.host[0][i] for i in flat]
        inv_t = torch.tensor([1.0 if raw or t == 0.0 else 1.0 / t for t in temps], device=logits.device)
        kept = None if kept_counts is None else kept_counts.index_select(0, pick)
        records = cls._ranked(x, tokens.index_select(0, pick), logprobs.index_select(0, pick), inv_t,
                              [k for _, k in alt_counts], kept)
        for (i, _), (_, rank, alts) in zip(alt_counts, records):
            out_lps[i] = (out_lps[i], rank, alts)

    def _sampling_tensors(self, sample_rows, decode_ctx=None) -> tuple[SamplingTensors, list[tuple[int, int]]]:
        """The step's sampling inputs, and (sample row, k) for samples whose request asked for
        logprobs in vLLM's spelling (`logprobs=k`: ranks and k alternatives to add). decode_ctx:
        in a step of decode rows only, their context lengths (sample row i is decode row i)."""
        # A decode step samples the same sequences as the step before, one sample each: their
        # knobs are kept from that step and only the step counters (the uniforms) are new. The
        # check compares the sequence objects by identity and the counters come from the context
        # lengths: the sequences themselves are not read (after the forward pass they are out of
        # the CPU caches, and reading 256 of them cost more than the rest of this method).
        seqs = [s for s, _ in sample_rows]
        cached = self._st_cache
        if decode_ctx is not None and cached is not None and cached[0] == seqs:
            _, prompt_lens, keys, alt_counts, knobs = cached
            steps = np.array(decode_ctx, dtype=np.int64) - prompt_lens
            return SamplingTensors.build(None, None, None, None, steps, self.device, knobs, keys), alt_counts
        rows, params, seeds, sample_idx, steps, alt_counts = [], [], [], [], [], []
        for m, (s, k) in enumerate(sample_rows):
            req = s.request
            if req.params.top_logprobs is not None:
                alt_counts.extend((len(rows) + j, req.params.top_logprobs) for j in range(k))
            if k == 1:
                rows.append(m)
                params.append(req.params)
                seeds.append(req.seed)
                sample_idx.append(s.sample_index)
                steps.append(s.num_output)
            else:   # a leader at its prompt end: the request's n samples share this row
                rows.extend([m] * k)
                params.extend([req.params] * k)
                seeds.extend([req.seed] * k)
                sample_idx.extend(range(k))
                steps.extend([0] * k)
        all_single = len(rows) == len(sample_rows)
        rows = None if all_single else rows
        knobs = SamplingTensors.knobs(rows, params)
        # kept for the next step only when every row is one sample of its own (a decode row then)
        self._st_cache = None if not all_single else (
            seqs, np.array([s.num_prompt_tokens for s in seqs], dtype=np.int64), counter_keys(seeds, sample_idx),
            alt_counts, knobs)
        return SamplingTensors.build(rows, params, seeds, sample_idx, steps, self.device, knobs), alt_counts
