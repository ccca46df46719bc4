"""Synthetic two-modality classification data with a domain-gap knob gamma.

gamma in [0, 1] is the share of the teacher modality's decisive features that the student
modality does NOT see: 0 = every decisive feature of the teacher is shared with the student,
1 = none is (DESIGN.md). Generators are registered in `GENERATORS`; each returns
(teacher [N, D] float32, student [N, D] float32, labels [N] int64) for one gamma.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from sklearn.datasets import make_classification

from cmkd.atomic import write_json
from cmkd.data.h5 import PreparedWriter
from cmkd.data.splits import stratified_split
from cmkd.errors import ConfigError

Generated = tuple[np.ndarray, np.ndarray, np.ndarray]
GENERATORS: dict[str, Callable[..., Generated]] = {}


def register_generator(name: str):
    def wrap(fn: Callable[..., Generated]) -> Callable[..., Generated]:
        GENERATORS[name] = fn
        return fn

    return wrap


def n_shared(n_decisive: int, gamma: float) -> int:
    """How many of the teacher's decisive features the student also sees."""
    return int(round((1.0 - gamma) * n_decisive))


@register_generator("ntdh")
def ntdh_sklearn(n_samples: int, n_features: int, n_classes: int, gamma: float, seed: int, **_: Any) -> Generated:
    """NTDH's scikit-learn setting: the student modality x^b is fixed; the teacher modality
    x^a keeps the first (1 - gamma) share of x^b's decisive features and replaces the rest by
    other decisive features of the same labels, so the label information stays while the
    domain gap grows with gamma.

    make_classification draws 2 * n_features informative features for one labelling; the
    first half (A) is x^b's, the second half (B) the replacement pool.
    """
    x, y = make_classification(
        n_samples=n_samples, n_features=2 * n_features, n_informative=2 * n_features, n_redundant=0,
        n_repeated=0, n_classes=n_classes, n_clusters_per_class=2, class_sep=1.0, flip_y=0.0,
        shuffle=False, random_state=seed,
    )
    a, b = x[:, :n_features], x[:, n_features:]
    # Columns are shuffled once (seeded) so "shared" features are not always the strongest ones.
    perm = np.random.default_rng(seed).permutation(n_features)
    a, b = a[:, perm], b[:, perm]
    k = n_shared(n_features, gamma)
    teacher = np.concatenate([a[:, :k], b[:, k:]], axis=1)
    student = a
    return teacher.astype(np.float32), student.astype(np.float32), y.astype(np.int64)


def validate(cfg: Mapping[str, Any], key: str) -> None:
    if cfg.get("generator", "ntdh") not in GENERATORS:
        raise ConfigError(f"{key}.generator", f"unknown generator {cfg.get('generator')!r}; known: {sorted(GENERATORS)}")
    gammas = cfg.get("gammas")
    if not isinstance(gammas, list) or not gammas:
        raise ConfigError(f"{key}.gammas", "must be a non-empty list of numbers in [0, 1]")
    for g in list(gammas) + [cfg.get("gamma", 0.0)]:
        if not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0:
            raise ConfigError(f"{key}.gammas", f"gamma {g!r} is not a number in [0, 1]")
    split = cfg.get("split", [0.6, 0.2, 0.2])
    if len(split) != 3 or abs(sum(split) - 1.0) > 1e-6 or min(split) <= 0:
        raise ConfigError(f"{key}.split", f"must be three positive fractions summing to 1, got {split}")


def variant_name(generator: str, gamma: float) -> str:
    return f"{generator}_gamma_{gamma:.2f}"


def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True) -> None:
    """Nothing to fetch: the data is generated in `prepare`. Record that, for provenance."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_json(raw_dir / "SOURCE.json", {"source": "generated", "generators": sorted(GENERATORS)})


def prepare(cfg: Mapping[str, Any], raw_dir: Path, out_path: Path, progress: bool = True) -> None:
    """Write the main variant at the root and every (generator, gamma) variant as a group."""
    validate(cfg, "data.synthetic")
    gen_name = cfg.get("generator", "ntdh")
    common = dict(n_samples=int(cfg["n_samples"]), n_features=int(cfg["n_features"]), n_classes=int(cfg["n_classes"]))
    attrs = {
        "task": "classification",
        "class_names": [f"class_{i}" for i in range(common["n_classes"])],
        "modalities": ["teacher", "student"],
        "teacher_modality": "teacher",
        "student_modality": "student",
        "ignore_index": None,
        "source_checksum": "generated",
        "variants": [variant_name(gen_name, float(g)) for g in cfg["gammas"]],
        "generator": gen_name,
        "gamma": float(cfg["gamma"]),
    }
    fractions = cfg.get("split", [0.6, 0.2, 0.2])
    seed = int(cfg.get("seed", 0))
    with PreparedWriter(out_path, attrs) as writer:
        for root, gamma in [("", float(cfg["gamma"]))] + [(variant_name(gen_name, float(g)), float(g)) for g in cfg["gammas"]]:
            teacher, student, y = GENERATORS[gen_name](gamma=gamma, seed=seed, **common)
            for split, idx in stratified_split(y, fractions, seed).items():
                writer.write(split, {"teacher": teacher[idx], "student": student[idx], "labels": y[idx]}, root=root)
