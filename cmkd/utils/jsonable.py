"""Results as plain JSON values (one helper for every writer of results)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def jsonable(obj: Any) -> Any:
    """`obj` with mappings as dicts with str keys, tuples as lists, and NumPy scalars and arrays
    and torch tensors as Python numbers and lists (their `tolist()`); anything else as is."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if callable(getattr(obj, "tolist", None)):  # np.generic, np.ndarray, torch.Tensor
        return obj.tolist()
    if callable(getattr(obj, "item", None)):
        return obj.item()
    return obj
