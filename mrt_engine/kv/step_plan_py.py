"""Pure-Python twin of csrc/step_plan.*: group decode rows that share leading KV blocks.

The cascade decode kernel reads a group's shared blocks once for all of its rows (DESIGN.md §2), so
the plan partitions the D decode rows into groups (CSR: `group_ptr`, `group_rows`,
`group_num_shared`, see attention/metadata.py). This file is the specification; the C++ twin must
return identical lists, and tests/test_step_plan.py checks that.

Algorithm:
1. Row r may share block j only if the block is full and lies entirely before the token being
   decoded: (j + 1) * block_size <= context_len - 1, i.e. j < u_r = (context_len - 1) // block_size.
2. Sort rows by their usable prefix `block_table[:u_r]` (ties by row index). Sorting makes the
   rows of one fork point adjacent, and the longest common prefix (LCP) of any run of sorted rows
   is the minimum of the LCPs of adjacent rows inside it.
3. The adjacent LCPs define a tree of runs (the fork tree): a run of height h splits, at the
   positions where the adjacent LCP equals h, into child runs of greater height. Bottom-up, a run
   becomes one group when that saves at least as many block reads, h * (rows - 1), as the best
   grouping of its children, and h >= min_shared_blocks; otherwise the children's groups stand.
   Single rows are groups with num_shared 0. Groups come out in sorted-row order.
4. Runs of adjacent single rows left over at different tree levels are regrouped with step 3
   until nothing changes. This greedy is not always optimal (an exact contiguous partition is an
   O(D^2) dynamic program, too slow per step for thousands of rows); on random fork trees it
   saves ~97% of the optimum's block reads.
"""
from __future__ import annotations


def _check(block_tables, context_lens, block_size, min_shared_blocks):
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if (not isinstance(min_shared_blocks, int) or isinstance(min_shared_blocks, bool)
            or min_shared_blocks < 1):
        raise ValueError(f"min_shared_blocks must be an int >= 1, got {min_shared_blocks!r}")
    if len(block_tables) != len(context_lens):
        raise ValueError(f"block_tables and context_lens differ in length: "
                         f"{len(block_tables)} vs {len(context_lens)}")
    for r, (table, n) in enumerate(zip(block_tables, context_lens)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"context_lens[{r}] must be an int >= 1, got {n!r}")
        if len(table) * block_size < n:
            raise ValueError(f"block_tables[{r}] has {len(table)} blocks, too few for "
                             f"context_len {n} at block_size {block_size}")


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _tree_groups(lcp: list[int], lo: int, hi: int, min_shared: int) -> list[tuple[int, int, int]]:
    """Best grouping of sorted rows [lo, hi) over their run tree, as (lo, hi, shared) triples.

    Iterative: fork trees can be deeper than Python's recursion limit. A frame is
    [lo, hi, h, child runs, next child to solve, saving so far, groups so far].
    """
    def open_frame(a, b):
        h = min(lcp[a:b - 1])
        children, start = [], a
        for k in range(a, b - 1):
            if lcp[k] == h:
                children.append((start, k + 1))
                start = k + 1
        children.append((start, b))
        return [a, b, h, children, 0, 0, []]

    if hi - lo == 1:
        return [(lo, hi, 0)]
    result = None                 # (saving, groups) of the last finished run
    stack = [open_frame(lo, hi)]
    while stack:
        f = stack[-1]
        if result is not None:    # a child just finished: fold it in
            f[5] += result[0]
            f[6].extend(result[1])
            result = None
        if f[4] < len(f[3]):
            a, b = f[3][f[4]]
            f[4] += 1
            if b - a == 1:
                result = (0, [(a, b, 0)])
            else:
                stack.append(open_frame(a, b))
            continue
        stack.pop()
        whole = f[2] * (f[1] - f[0] - 1)
        if f[2] >= min_shared and whole >= f[5]:
            result = (whole, [(f[0], f[1], f[2])])
        else:
            result = (f[5], f[6])
    return result[1]


def _merge_singletons(lcp: list[int], groups: list[tuple[int, int, int]],
                      min_shared: int) -> list[tuple[int, int, int]]:
    """Regroup maximal runs of adjacent single-row groups (left over at different tree levels)
    until no run yields a multi-row group."""
    changed = True
    while changed:
        changed = False
        out, i = [], 0
        while i < len(groups):
            j = i
            while j < len(groups) and groups[j][1] - groups[j][0] == 1:
                j += 1
            if j - i >= 2:
                sub = _tree_groups(lcp, groups[i][0], groups[j - 1][1], min_shared)
                changed = changed or len(sub) < j - i
                out.extend(sub)
                i = j
            else:
                out.append(groups[i])
                i += 1
        groups = out
    return groups


def plan_decode_groups(block_tables: list[list[int]], context_lens: list[int], block_size: int,
                       min_shared_blocks: int = 1) -> tuple[list[int], list[int], list[int]]:
    """Partition decode rows into groups sharing identical leading full blocks.

    Returns (group_ptr [G + 1], group_rows [D], group_num_shared [G]); every row appears exactly
    once; a row without a partner is a group of one with num_shared 0.
    """
    _check(block_tables, context_lens, block_size, min_shared_blocks)
    n = len(block_tables)
    if n == 0:
        return [0], [], []
    prefixes = [list(t[:(c - 1) // block_size]) for t, c in zip(block_tables, context_lens)]
    order = sorted(range(n), key=lambda r: (prefixes[r], r))                     # step 2
    lcp = [_lcp(prefixes[order[i]], prefixes[order[i + 1]]) for i in range(n - 1)]

    groups = _tree_groups(lcp, 0, n, min_shared_blocks)                        # step 3
    groups = _merge_singletons(lcp, groups, min_shared_blocks)                   # step 4

    group_ptr, group_num_shared = [0], []
    for lo, hi, h in groups:
        group_ptr.append(hi)
        group_num_shared.append(h)
    return group_ptr, order, group_num_shared
