"""Thin DVC stage entry points, run from the repository root as `python -m stages <name> ...`.

Importing this package (or any stage module) changes nothing: the entry point, stages/__main__.py,
pins torch's CPU kernels before anything imports torch (cmkd/utils/determinism.py, docs/portability.md).
"""
