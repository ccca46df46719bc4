"""flows.core_slots.CoreSlots: at most `total` slots held at once, granted in arrival order."""

from __future__ import annotations

import threading
import time

import pytest

from flows.core_slots import CoreSlots


def test_slots_are_exclusive_and_capped():
    slots = CoreSlots(2)
    with slots.hold(5) as n:  # capped at the total
        assert n == 2 and slots.free == 0
    with slots.hold(0) as n:  # at least one
        assert n == 1 and slots.free == 1
    assert slots.free == 2
    with pytest.raises(ValueError):
        CoreSlots(0)


def test_a_waiting_wide_holder_is_not_overtaken():
    """A 2-slot request waiting behind a 1-slot holder is served before a 1-slot request that
    came after it, although that one would fit at once."""
    slots = CoreSlots(2)
    order, inside = [], []
    lock = threading.Lock()
    release_first = threading.Event()

    def worker(name, n, hold_until=None):
        with slots.hold(n):
            with lock:
                order.append(name)
                inside.append(name)
                assert sum({"first": 1, "wide": 2, "late": 1}[x] for x in inside) <= 2, inside
            if hold_until is not None:
                hold_until.wait(5)
            else:
                time.sleep(0.05)
            with lock:
                inside.remove(name)

    first = threading.Thread(target=worker, args=("first", 1, release_first))
    first.start()
    while slots.free != 1:
        time.sleep(0.001)
    wide = threading.Thread(target=worker, args=("wide", 2))
    wide.start()
    time.sleep(0.1)  # wide is now waiting for both slots
    late = threading.Thread(target=worker, args=("late", 1))
    late.start()
    time.sleep(0.1)
    assert order == ["first"]  # late fits in the free slot but waits its turn behind wide
    release_first.set()
    for t in (first, wide, late):
        t.join(5)
    assert order == ["first", "wide", "late"]
    assert slots.free == 2
