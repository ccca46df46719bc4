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


def _wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_waiting_wide_holder_is_not_overtaken():
    """A 2-slot request waiting behind a 1-slot holder is served before a 1-slot request that
    came after it, although that one would fit at once; and never more than 2 slots are held."""
    slots = CoreSlots(2)
    width = {"first": 1, "wide": 2, "late": 1}
    order, inside, overfull = [], [], []
    lock = threading.Lock()
    release_first = threading.Event()

    def worker(name, hold_until=None):
        with slots.hold(width[name]):
            with lock:
                order.append(name)
                inside.append(name)
                if sum(width[x] for x in inside) > 2:
                    overfull.append(list(inside))
            if hold_until is not None:
                hold_until.wait(5)
            else:
                time.sleep(0.05)
            with lock:
                inside.remove(name)

    threads = {"first": threading.Thread(target=worker, args=("first", release_first)),
               "wide": threading.Thread(target=worker, args=("wide",)),
               "late": threading.Thread(target=worker, args=("late",))}
    threads["first"].start()
    _wait_until(lambda: order == ["first"])
    threads["wide"].start()
    _wait_until(lambda: slots._next_ticket == 2)  # wide holds the next ticket and waits
    threads["late"].start()
    _wait_until(lambda: slots._next_ticket == 3)
    time.sleep(0.1)
    assert order == ["first"]  # late fits in the free slot but waits its turn behind wide
    release_first.set()
    for t in threads.values():
        t.join(5)
    assert order == ["first", "wide", "late"]
    assert overfull == []
    assert slots.free == 2
