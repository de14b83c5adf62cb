"""Continuous-batching scheduler over the KV bookkeeping (no torch).

Each step (`schedule`):
1. every running sequence with one uncomputed token decodes (one new token each);
2. running sequences mid-prompt continue their chunked prefill within the token budget;
3. waiting sequences are admitted in FIFO order: a prefix-cache match (`add_sequence`) or, for
   forks, a share of the kept parent's blocks (`fork`), then a first prefill chunk; a sequence is
   admitted only when the blocks for the rest of its prompt are available.
When the blocks for the decode rows are missing, the newest running sequence is preempted: its KV
is freed and it waits to be recomputed (its sampled tokens are kept, so nothing is lost). When a
step could schedule nothing at all, the newest running sequence is preempted and the step retried.

`update` applies a step's sampled tokens: a request with n > 1 prefills its prompt once in a
leader sequence, and when the prompt is done its n samples are drawn from the leader's last logits;
samples 1..n-1 become sequences forked from the leader (full blocks shared, the partial tail block
copied). Their tail copies are reserved when the completing chunk is scheduled: `schedule` keeps
one block budget for the whole step (the pool's count does not know the reservations, so it is
read after the decode rows take their blocks and then only decreased), so forking in `update`
never runs out of blocks. A leader whose n samples cannot run together (more tail copies than an
idle engine has blocks, or n above max_num_seqs) has its samples queued as sequences of their own
instead (`_split`), as vLLM runs an n > 1 request as n child requests: OutOfBlocks then means a
single sequence cannot fit.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mrt_engine.errors import OutOfBlocks
from mrt_engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    prefills: list = field(default_factory=list)         # (seq, start, num_new, slots, block_table)
    decodes: list = field(default_factory=list)          # sequences, one token each
    decode_slots: list = field(default_factory=list)
    decode_block_tables: list = field(default_factory=list)
    copies: list = field(default_factory=list)           # (src_block, dst_block) to run before the forward
    sample_seqs: list = field(default_factory=list)      # (seq, samples) in logits-row order

    @property
    def num_tokens(self) -> int:
        return sum(p[2] for p in self.prefills) + len(self.decodes)


class Scheduler:
    def __init__(self, kv, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                 enable_prefix_caching: bool = True):
        self.kv = kv
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_prefix_caching = enable_prefix_caching
        self.version = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_id = 0
        self._tables: dict[int, list[int]] = {}   # the last step's decode rows: seq id -> block table
        self.stats = dict(num_preemptions=0, prefix_cache_hit_tokens=0, prefill_tokens=0,
                          decode_tokens=0, peak_used_blocks=0, num_steps=0)

    def new_seq_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling --------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        while True:
            batch = self._try_schedule()
            if batch.prefills or batch.decodes:
                break
            if self.running:
                self._preempt(self.running[-1])
                continue
            if self.waiting and self.waiting[0].spawn > 1:
                # the head's n samples' tail copies do not fit at once even in an idle engine:
                # let its samples in one by one instead of failing
                self._split(self.waiting[0])
                continue
            raise OutOfBlocks(
                f"cannot admit a sequence: {self.kv.num_available_blocks()} of {self.kv.num_blocks} KV "
                f"blocks are free or evictable, the rest are pinned by kept sequences (handles of earlier "
                f"calls, or this call's keep=True outputs); release handles (LLM.release), keep fewer "
                f"outputs, or give the engine more num_blocks")
        # a sample spawned in the last update() and preempted above before its tail copy ran
        # has freed the copy's target: drop such copies (the block is no one's, or is a fresh
        # block of a sequence that writes it itself)
        batch.copies = [(src, dst) for src, dst in self.kv.take_copies() if self.kv.ref_count(dst) > 0]
        used = self.kv.num_blocks - self.kv.num_available_blocks()
        st = self.stats
        st["peak_used_blocks"] = max(st["peak_used_blocks"], used)
        st["num_steps"] += 1
        st["decode_tokens"] += len(batch.decodes)
        st["prefill_tokens"] += sum(p[2] for p in batch.prefills)
        return batch

    def _try_schedule(self) -> ScheduledBatch:
        kv, batch = self.kv, ScheduledBatch()
        budget = self.max_num_batched_tokens

        # 1. decode rows; preempt the newest sequences until their blocks fit (append_decode is all
        # or nothing: OutOfBlocks, before any change, when they do not)
        preempted = False
        while True:
            decodes = [s for s in self.running if s.spawn == 1 and s.num_computed == len(s.token_ids) - 1]
            decodes = decodes[:budget]
            slots = None
            if decodes:
                try:
                    slots = kv.append_decode([s.seq_id for s in decodes], [s.token_ids[-1] for s in decodes])
                except OutOfBlocks:
                    pass
            if slots is not None or not decodes or len(self.running) <= 1:
                break
            self._preempt(self.running[-1])
            preempted = True
        prev, self._tables = self._tables, {}
        if slots is not None:
            batch.decode_slots = slots
            batch.decodes = decodes
            batch.decode_block_tables = self._decode_tables(decodes, slots, prev)
            budget -= len(decodes)
        avail = kv.num_available_blocks()

        # 2. running sequences mid-prefill continue
        for s in self.running:
            if budget <= 0:
                break
            if s.num_computed >= len(s.token_ids) - (s.spawn == 1):
                continue   # decode rows (scheduled or not) are not prefill work
            n, need = self._fit(s, budget, avail)
            if n:
                self._schedule_prefill(batch, s, n)
                budget -= n
                avail -= need

        # 3. admit waiting sequences (FIFO) while tokens, blocks and sequence slots last; not in a
        # step that had to preempt (the victim would come straight back and be preempted again)
        # a running leader becomes its n samples when its prompt completes: slots count them all
        slots = sum(r.spawn for r in self.running) if self.waiting else 0
        while self.waiting and budget > 0 and not (preempted and self.running):
            s = self.waiting[0]
            if s.spawn > self.max_num_seqs:
                self._split(s)     # its n samples could never run together
            if slots + s.spawn > self.max_num_seqs:
                break
            before = kv.num_available_blocks()
            cached = self._admit(s)
            if cached is None:
                break
            # `avail` is this step's budget, not the pool's count: the tail copies reserved for
            # rows scheduled above are not allocated until update(), so re-reading the pool here
            # would hand them out again (and their fork in update() would find no block)
            avail -= before - kv.num_available_blocks()
            # admit only when the whole rest of the prompt fits: a sequence that could only take a
            # first chunk would be preempted and re-admitted forever
            n, need = self._fit(s, budget, avail)
            if n == 0 or self._blocks_for(s, s.num_uncomputed) > avail:
                kv.free_sequence(s.seq_id)
                s.num_computed = 0
                break
            self.waiting.popleft()
            self.stats["prefix_cache_hit_tokens"] += cached
            if s.sample_index == 0 and s.num_output == 0:
                s.request.num_cached_tokens = cached
            s.status = Status.RUNNING
            self.running.append(s)
            slots += s.spawn
            self._schedule_prefill(batch, s, n)
            budget -= n
            avail -= need
        return batch

    def _decode_tables(self, decodes: list[Sequence], slots: list[int], prev: dict) -> list[list[int]]:
        """The decode rows' block tables after their append, kept (in _tables) for the next step
        only. Between two steps that decode a sequence nothing but its own decode appends changes
        its blocks (preemption, prefill, finishing or forking it all take it out of the decode rows
        of at least the step in between, which starts _tables afresh), and a decode token lands in
        its table's last block: so when that is the last block of the table from the step before
        (`prev`), the table is unchanged and the same list is handed out (its consumers only read
        it); a new block or a copied-on-write tail is fetched."""
        kv, bs, out = self.kv, self.block_size, []
        for s, slot in zip(decodes, slots):
            t = prev.get(s.seq_id)
            if t is None or t[-1] != slot // bs:
                t = kv.block_table(s.seq_id)
            self._tables[s.seq_id] = t
            out.append(t)
        return out

    def _admit(self, s: Sequence) -> int | None:
        """Put a waiting sequence in the KV cache, sharing what is already there; returns the
        tokens it got without computing them (None: no block for a fork's tail copy)."""
        kv, req = self.kv, s.request
        try:
            if req.fork_source is not None and kv.has_sequence(req.fork_source):
                kv.fork(req.fork_source, s.seq_id, req.fork_at)
                cached = req.fork_at
            else:
                # vLLM's skip_reading_prefix_cache (on by default with prompt logprobs, which then
                # need every position's logits): sample 0 computes the prompt, the others share it
                lookup = self.enable_prefix_caching and not (req.params.skip_reading_prefix_cache
                                                             and s.sample_index == 0)
                cached = kv.add_sequence(s.seq_id, s.token_ids, self.version, lookup)
        except OutOfBlocks:
            return None
        s.num_computed = cached
        return cached

    def _fit(self, s: Sequence, budget: int, avail: int) -> tuple[int, int]:
        """Largest prefill chunk of s within budget and avail blocks -> (tokens, blocks)."""
        want = min(s.num_uncomputed, budget)
        need = lambda n: self._blocks_for(s, n)  # noqa: E731

        if need(want) <= avail:
            return want, need(want)
        lo, hi = 0, want - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if need(mid) <= avail:
                lo = mid
            else:
                hi = mid - 1
        return lo, need(lo)

    def _blocks_for(self, s: Sequence, n: int) -> int:
        blocks = self.kv.blocks_needed(s.seq_id, n)
        if n == s.num_uncomputed and s.spawn > 1 and len(s.token_ids) % self.block_size:
            blocks += s.spawn - 1   # tail copies of the samples forked in update()
        return blocks

    def _schedule_prefill(self, batch: ScheduledBatch, s: Sequence, n: int) -> None:
        start = s.num_computed
        slots = self.kv.append_tokens(s.seq_id, s.token_ids[start:start + n])
        batch.prefills.append((s, start, n, slots, self.kv.block_table(s.seq_id)))

    def _split(self, leader: Sequence) -> None:
        """Turn a waiting leader's samples 1..n-1 into sequences of their own, queued right after
        it: each shares the prompt through the prefix cache (or its fork source) and is admitted
        when its own blocks fit, as vLLM runs an n > 1 request as n child requests. Sample j's
        first token is drawn with the same seed stream as a spawned sample j's, from its own pass
        over the same prompt: the outputs match the leader path's (logprobs to the rounding of
        another batch, as after a preemption)."""
        req = leader.request
        children = [Sequence(self.new_seq_id(), req, j, leader.token_ids) for j in range(1, leader.spawn)]
        for child in children:
            req.seqs[child.sample_index] = child
        leader.spawn = 1
        at = self.waiting.index(leader) + 1
        for child in reversed(children):
            self.waiting.insert(at, child)

    def _preempt(self, s: Sequence) -> None:
        self.kv.free_sequence(s.seq_id)
        self.running.remove(s)
        s.num_computed = 0
        s.status = Status.WAITING
        self.waiting.appendleft(s)
        self.stats["num_preemptions"] += 1

    # ---- applying a step's results -------------------------------------------------------------
    def sample_rows(self, batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """(sequence, number of samples) for each logits row of the step, in row order: prefill
        sequences whose last chunk this is, then the decode rows."""
        rows = [(s, s.spawn) for s, start, n, _, _ in batch.prefills if start + n == len(s.token_ids)]
        rows.extend((s, 1) for s in batch.decodes)
        batch.sample_seqs = rows
        return rows

    def update(self, batch: ScheduledBatch, tokens: list[int], logprobs: list[float] | None,
               stop_checker) -> list[Sequence]:
        """Record the sampled tokens (one per sample, in sample_rows order); returns the sequences
        that finished this step (freed, or left pinned when their request keeps them)."""
        kv = self.kv
        for s, start, n, _, _ in batch.prefills:
            s.num_computed = start + n
            if s.num_computed == len(s.token_ids) and self.enable_prefix_caching:
                kv.cache_sequence(s.seq_id)
        for s in batch.decodes:
            s.num_computed += 1
        finished, i = [], 0
        for s, k in batch.sample_seqs:
            targets = [s]
            if k > 1:
                targets.extend(self._spawn(s, j) for j in range(1, k))
                s.spawn = 1
            for t in targets:
                tok = tokens[i]
                t.token_ids.append(tok)
                if logprobs is not None:
                    t.logprobs.append(logprobs[i])
                i += 1
                if stop_checker(t, tok):
                    t.status = Status.FINISHED
                    t.request.num_finished += 1
                    finished.append(t)
                    if not t.request.keep:
                        kv.free_sequence(t.seq_id)
        if finished:
            self.running = [s for s in self.running if s.status is Status.RUNNING]
        return finished

    def _spawn(self, leader: Sequence, j: int) -> Sequence:
        child = Sequence(self.new_seq_id(), leader.request, j, leader.token_ids)
        leader.request.seqs[j] = child
        try:
            self.kv.fork(leader.seq_id, child.seq_id, leader.num_computed)
        except OutOfBlocks as exc:   # _fit reserved the tail copies
            raise AssertionError(f"fork of reserved sample failed: {exc}") from exc
        child.num_computed = leader.num_computed
        child.status = Status.RUNNING
        self.running.append(child)
        return child

    def abort(self, seqs) -> None:
        """Drop sequences of a failed generate call, freeing their KV."""
        dead = {id(s) for s in seqs}
        for s in seqs:
            if s is not None and s.status is not Status.WAITING and self.kv.has_sequence(s.seq_id):
                self.kv.free_sequence(s.seq_id)
            if s is not None:
                s.status = Status.FINISHED
        self.waiting = deque(s for s in self.waiting if id(s) not in dead)
        self.running = [s for s in self.running if id(s) not in dead]
