"""Per-step attention metadata: built once per step by model_runner.py, read by every layer.

Shape letters: N new tokens in the step, P prefill/extend sequences, D decode sequences,
G decode sharing groups, Bmax padded blocks per table, bs block size, Hkv KV heads, Dh head dim.
The paged cache of one layer is a pair (k_cache, v_cache), each [num_blocks, bs, Hkv, Dh].

Token order in a step: the new tokens of the P prefill/extend sequences first (sequence after
sequence, each a contiguous run), then one token per decode sequence, in decode-row order.

Decode sharing (the cascade structure, DESIGN.md §2): decode rows are partitioned into groups; the
rows of group g are `group_rows[group_ptr[g]:group_ptr[g+1]]` and all of them share the first
`group_num_shared[g]` blocks of their block tables (identical block ids, all full). Attention of a
row = LSE-merge(attention over the group's shared blocks, attention over the row's remaining
tokens). Reading the shared blocks once per group instead of once per row is the point. A group of
one row, or num_shared = 0, degenerates to plain paged attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSeq:
    token_start: int        # index of its first new token in the step's N tokens
    num_new: int            # new tokens this step (a chunk of the prompt, a fork suffix, ...)
    context_len: int        # tokens in cache after this step (cached prefix + num_new)
    block_table: torch.Tensor  # [ceil(context_len / bs)] int64, on the model's device
    # the same block ids on the host (model_runner has them): the Triton backend packs them into
    # its one per-step copy instead of reading the device tensor back; None = not given
    block_table_host: list[int] | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [N] int64: block * bs + offset where each new K/V goes
    positions: torch.Tensor             # [N] int64: RoPE position of each new token
    num_prefill_tokens: int             # tokens [0, num_prefill_tokens) belong to prefill seqs
    prefill_seqs: list[PrefillSeq] = field(default_factory=list)
    # decode part (D rows; tensors empty when D == 0)
    decode_block_tables: torch.Tensor | None = None  # [D, Bmax] int64, padded with 0
    decode_context_lens: torch.Tensor | None = None  # [D] int64, including this step's token
    group_ptr: torch.Tensor | None = None            # [G + 1] int64 (CSR over group_rows)
    group_rows: torch.Tensor | None = None           # [D] int64: decode rows ordered by group
    group_num_shared: torch.Tensor | None = None     # [G] int64: shared leading full blocks
    # host copies of the small CSR arrays, so the torch backend can loop over groups without syncs
    group_ptr_host: list[int] = field(default_factory=list)
    group_num_shared_host: list[int] = field(default_factory=list)
    # more host copies (model_runner holds them anyway), so the Triton backend plans a step with no
    # device-to-host reads; empty = not given, the backend then reads the device tensors (one sync each)
    decode_context_lens_host: list[int] = field(default_factory=list)   # [D]
    group_rows_host: list[int] = field(default_factory=list)            # [D]
    decode_block_tables_host: list = field(default_factory=list)        # [D] unpadded block-id lists
    # per-step derived tensors a backend builds on its first layer and reuses for the others
    # (e.g. the torch backend's padded gather plan); the model runner leaves it empty
    backend_cache: dict = field(default_factory=dict)

    def block_tables(self) -> torch.Tensor | None:
        """decode_block_tables; on a CPU step the runner leaves it out (the C++ kernel reads the host
        lists) and it is built from decode_block_tables_host on first use, padded with 0."""
        if self.decode_block_tables is None and self.decode_block_tables_host:
            tables = self.decode_block_tables_host
            width = max(len(t) for t in tables)
            self.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                    dtype=torch.int64, device=self.slot_mapping.device)
        return self.decode_block_tables

    @property
    def num_decode(self) -> int:
        return 0 if self.decode_context_lens is None else int(self.decode_context_lens.shape[0])
