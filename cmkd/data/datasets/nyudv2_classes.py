"""NYU-Depth-V2 label sets: the 894 raw classes of `labels` mapped to 40 and to 13 classes.

* 40 classes: Gupta, Arbelaez, Malik (CVPR 2013), the `mapClass` vector of their
  `classMapping40.mat` (raw class i, 1-based, -> 40-class id `MAP_894_TO_40[i - 1]`, 1-based),
  as distributed with the nyuv2-meta-data and used by FCN and most RGB-D segmentation code.
* 13 classes: Couprie et al. (ICLR 2013), from the 40 classes (`map40to13.m` of the
  nyudv2_class_mapping tools; class13Mapping.mat of nyuv2-meta-data).

Raw label 0 is "unlabeled" in every set (prepared files write it as -1, ignored).
"""

from __future__ import annotations

import numpy as np

NUM_RAW_CLASSES = 894

CLASSES_40: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor_mat",
    "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower_curtain", "box", "whiteboard",
    "person", "night_stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)

CLASSES_13: tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv", "wall", "window",
)

# raw class 1..894 -> 40-class id 1..40 (classMapping40.mat, mapClass)
_MAP_894_TO_40 = """
    40 40  3 22  5 40 12 38 40 40  2 39 40 40 26 40 24 40  7 40  1 40 40 34
    38 29 40  8 40 40 40 40 38 40 40 14 40 38 40 40 40 15 39 40 30 40 40 39
    40 39 38 40 38 40 37 40 38 38  9 40 40 38 40 11 38 40 40 40 40 40 40 40
    40 40 40 40 40 40 38 13 40 40  6 40 23 40 39 10 16 40 40 40 40 38 40 40
    40 40 40 40 40 40 40 38 40 39 40 40 40 40 39 38 40 40 40 40 40 40 18 40
    40 19 28 33 40 40 40 40 40 40 40 40 40 38 27 36 40 40 40 40 21 40 20 35
    40 40 40 40 40 40 40 40 38 40 40 40  4 32 40 40 39 40 39 40 40 40 40 40
    17 40 40 25 40 39 40 40 40 40 40 40 40 40 39 40 40 40 40 40 40 40 40 40
    40 40 40 40 40 40 40 40 40 40 40 39 40 40 40 40 40 40 40 40 40 39 38 38
    40 40 39 40 39 40 38 39 38 40 40 40 40 40 40 40 40 40 40 39 40 38 40 40
    38 38 40 40 40 40 40 40 40 40 40 40 40 40 40 38 40 40 40 40 40 39 40 40
    40 40 40 40 40 40 40 40 40 40 40 40 40 39 40 40 40 40 40 40 40 40 40 40
    40 40 39 40 40 40 38 40 40 39 40 40 38 40 40 40 40 40 40 40 40 40 40 40
    39 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 31 40 40 40 40 40
    40 40 38 40 40 38 39 39 40 40 40 40 40 40 40 40 40 38 40 39 40 40 39 40
    40 40 38 40 40 40 40 40 40 40 40 38 39 40 40 40 40 40 40 38 40 40 40 40
    40 40 40 40 40 40 40 38 39 40 40 40 40 40 40 40 39 40 40 40 40 40 40 38
    40 40 40 38 40 39 40 40 40 39 39 40 40 40 40 40 40 40 40 40 40 39 40 40
    40 40 40 40 40 40 40 40 40 40 39 39 40 40 39 39 40 40 40 40 38 40 40 38
    39 39 40 39 40 39 38 40 40 40 40 40 40 40 40 40 40 40 39 40 38 40 39 40
    40 40 40 40 39 39 40 40 40 40 40 40 39 39 40 40 38 39 39 40 40 40 40 40
    40 40 40 40 39 39 40 40 40 40 39 40 40 40 40 40 39 40 40 39 40 40 40 40
    40 40 40 40 40 40 40 40 40 40 40 39 38 40 40 40 40 40 40 40 39 38 39 40
    38 39 40 39 40 39 40 40 40 40 40 40 40 40 38 40 40 40 40 40 38 40 40 39
    40 40 40 39 40 38 40 40 40 40 40 40 40 40 38 40 40 40 40 40 40 40 40 40
    40 40 40 40 40 40 40 39 38 40 40 38 40 40 38 40 40 40 40 40 40 40 40 40
    39 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 38 40 40 38 40 40 40
    40 40 40 40 40 40 40 40 38 38 38 40 40 40 38 40 40 40 38 38 40 40 40 40
    40 40 40 40 40 40 40 40 40 40 40 40 40 38 40 40 40 40 40 40 40 40 40 40
    40 40 40 38 40 38 39 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40
    40 40 40 40 40 40 40 40 40 40 40 40 40 39 40 40 40 40 40 40 40 40 40 40
    40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40 40
    40 39 40 39 40 40 40 40 38 38 40 40 40 38 40 40 40 40 40 40 40 40 40 40
    40 40 40 40 39 40 40 39 40 40 39 39 40 40 40 40 40 40 40 40 39 39 39 40
    40 40 40 39 40 40 40 40 40 40 40 40 39 40 40 40 40 40 39 40 40 40 40 40
    40 40 40 40 40 40 40 40 40 38 40 40 40 40 40 40 40 39 40 40 38 40 39 40
    40 40 40 38 40 40 40 40 40 38 40 40 40 40 40 40 40 39 40 40 40 40 40 40
    40 40 40 39 40 40
"""
MAP_894_TO_40: np.ndarray = np.array(_MAP_894_TO_40.split(), dtype=np.int64)

# 40-class id 1..40 -> 13-class id 1..13 (map40to13.m)
MAP_40_TO_13: np.ndarray = np.array([
    12, 5, 6, 1, 4, 9, 10, 12, 13, 6,    # wall .. bookshelf
    8, 6, 13, 10, 6, 13, 6, 7, 7, 5,     # picture .. floor_mat
    7, 3, 2, 6, 11, 7, 7, 7, 7, 7,       # clothes .. whiteboard
    7, 6, 7, 7, 7, 7, 7, 7, 6, 7,        # person .. otherprop
], dtype=np.int64)


def class_names(n_classes: int) -> tuple[str, ...]:
    return CLASSES_40 if n_classes == 40 else CLASSES_13


def raw_to_train_ids(n_classes: int) -> np.ndarray:
    """A lookup table [895] from raw label (0 = unlabeled, 1..894) to a 0-based class of the
    chosen set, -1 for unlabeled."""
    to40 = MAP_894_TO_40
    ids = to40 if n_classes == 40 else MAP_40_TO_13[to40 - 1]
    return np.concatenate([[-1], ids - 1]).astype(np.int64)
