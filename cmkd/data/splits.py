"""Seeded, stratified train/val/test splits."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Indices of a stratified (train, val, test) split with the given fractions."""
    from sklearn.model_selection import train_test_split  # seconds to import: only where a split is drawn

    train_f, val_f, test_f = fractions
    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, train_size=train_f, stratify=labels, random_state=seed)
    val, test = train_test_split(
        rest, test_size=test_f / (val_f + test_f), stratify=labels[rest], random_state=seed + 1
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
