"""PromptSampler: the training data order — seeded shuffles, epoch after epoch, and its position.

The order of epoch e is a permutation drawn from (seed, e) alone, so the position (epoch, cursor)
is the whole state a checkpoint needs; every rank walks the same global order and keeps its own
slice of each draw (`take(n)[rank * k:(rank + 1) * k]`).
"""
from __future__ import annotations

import random
from typing import List


class PromptSampler:
    def __init__(self, num_items: int, seed: int):
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> List[int]:
        order = list(range(self.num_items))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> List[int]:
        """The next n item indices (crossing into the next epoch's shuffle when one ends)."""
        out = []
        while len(out) < n:
            if self.cursor == self.num_items:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(n - len(out), self.num_items - self.cursor)
            out.extend(self._order[self.cursor:self.cursor + k])
            self.cursor += k
        return out

    def state_dict(self) -> dict:
        return {"num_items": self.num_items, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_items") != self.num_items or state.get("seed") != self.seed:
            raise ValueError(f"checkpoint data position is for {state.get('num_items')} items / seed "
                             f"{state.get('seed')}, this run has {self.num_items} / {self.seed}: "
                             "the dataset or seed changed")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
