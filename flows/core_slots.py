"""The cores a flow run's stages share: `jobs` slots, a stage holding one per intra-op thread.

`flows.pipeline -j N` runs up to N independent stages side by side. Most stages compute on one
thread (their seed workers are single-threaded processes), but a stage that asks for more
(the synthetic experiments: 2 OpenMP threads, `meta: {threads: 2}` in dvc.yaml) must not
share the cores with another one: OpenMP threads spin-wait for each other, and two 2-thread
experiment stages side by side on 2 cores each ran several times slower than alone
(`exp_ntdh_gap` 87 s alone, 11 minutes beside `exp_mfh_alg1`). So a stage takes
min(threads, N) slots before it starts and returns them when it ends; slots are granted in
the order stages ask for them, so a waiting multi-thread stage is not overtaken forever by
single-thread ones.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class CoreSlots:
    """`total` slots, granted first come, first served, `n` at a time."""

    def __init__(self, total: int):
        if total < 1:
            raise ValueError(f"CoreSlots needs at least one slot, got {total}")
        self.total = total
        self._free = total
        self._next_ticket = 0
        self._serving = 0
        self._cond = threading.Condition()

    @property
    def free(self) -> int:
        with self._cond:
            return self._free

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[int]:
        """Hold min(max(n, 1), total) slots for the body; yields how many."""
        n = max(1, min(int(n), self.total))
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket and self._free >= n)
            self._free -= n
            self._serving += 1
            self._cond.notify_all()  # the next ticket may fit in what is left
        try:
            yield n
        finally:
            with self._cond:
                self._free += n
                self._cond.notify_all()
