"""The prefix tree over decode sharing groups, shared by both attention backends.

Groups forked from one trace at several boundaries share that trace's leading blocks; each tree
segment is a run of blocks common to every group below it, so a backend reads the run once per step
for all those rows instead of once per group.
"""
from __future__ import annotations


def prefix_tree_segments(items: list[tuple[list[int], list[int]]]) -> list[tuple[int, int, list[int], int]]:
    """Prefix tree over sharing groups given as (shared block ids, rows).

    Returns segments (start, end, rows, parent) in block units: blocks [start, end) are common to
    every group listed below the segment, whose rows are `rows`; `parent` indexes the enclosing
    segment (-1 at a root) and always precedes its children. A row's segments tile its shared
    blocks from 0 to its group's end.
    """
    out: list = []

    def walk(group_items, start, parent):
        end = min(len(blocks) for blocks, _ in group_items)
        ref = group_items[0][0]
        for blocks, _ in group_items[1:]:
            e = start
            while e < end and blocks[e] == ref[e]:
                e += 1
            end = e
        here = parent
        if end > start:
            out.append((start, end, [r for _, rows in group_items for r in rows], parent))
            here = len(out) - 1
        children: dict[int, list] = {}
        for blocks, rows in group_items:
            if len(blocks) > end:
                children.setdefault(blocks[end], []).append((blocks, rows))
        for child in children.values():
            walk(child, end, here)

    if items:
        walk(items, 0, -1)
    return out


# the last (items, segments): decode steps in a row usually share the same groups and blocks, and
# comparing the items is far cheaper than walking the tree again (a pure function of its input)
_last: tuple = ([], [])


def segment_blocks(items: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """The prefix tree's segments as (block ids, rows): each run of blocks once, with every row below it.
    The list is the caller's (a fresh list each call); its block and row lists must not be changed."""
    global _last
    key, segments = _last
    if items != key:
        blocks_of = {r: blocks for blocks, rows in items for r in rows}
        segments = [(blocks_of[rows[0]][start:end], rows) for start, end, rows, _ in prefix_tree_segments(items)]
        _last = ([(list(b), list(r)) for b, r in items], segments)
    return list(segments)
