"""Utilities every layer may use (the lowest layer: imports nothing else of cmkd but errors):
atomic writes, process helpers, pinned CPU kernels, statistics, exact float math, one registry."""
