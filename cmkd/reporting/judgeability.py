"""Can a dataset's KD rows be judged at all? Only when its TEACHER knows something the STUDENT
does not: a teacher at chance level, or below the no-KD student, hands every KD row noise to
distil, and any difference those rows show is not knowledge moving from one modality to the other.

The rule, declared before any result (docs/datasets.md, "Samples"):

- **chance level** of the primary metric, per seed from that seed's test split (SUN RGB-D has
  one split per seed): the best score of three label-blind guesses, computed in closed form on
  the *expected* confusion matrix from the test split's class counts: always the majority class,
  a uniform draw over the K classes, and a draw in proportion to the class frequencies. Weighted
  F1 for classification (1/K for balanced classes), mIoU over the classes present in prediction
  or ground truth for segmentation (cmkd.training.metrics.segmentation_scores). The best of the
  three, so a teacher has to beat every guess that never looks at its input.
- **judgeable** when TEACHER is above that chance level and above STUDENT, each paired by seed
  (cmkd.utils.stats.paired): the lower end of the 95% t interval of TEACHER - chance and of
  TEACHER - STUDENT above 0. With one seed there is no interval: the point differences decide,
  and the record says so (`rule`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmkd.utils.stats import paired

RULE = ("judgeable when the lower end of the 95% paired t interval (over seeds) of TEACHER - chance and of "
        "TEACHER - STUDENT is above 0; chance: the best of three label-blind guesses (majority class, uniform "
        "over the K classes, in proportion to the class frequencies) on each seed's test split")
RULE_ONE_SEED = "one seed, no interval: the point differences TEACHER - chance and TEACHER - STUDENT decide"
NOTE = ("**Nothing can be judged here:** the teacher ({teacher}) is {reasons}; every KD row distils noise. "
        "(Rule: {rule}; {metric} × 100, means over seeds.)\n\n")


def chance_levels(counts: Sequence[float], task: str) -> dict[str, float]:
    """The primary metric of each label-blind guess, from the test split's class counts
    (`counts[k]`: samples, or labelled pixels, of class k; K = len(counts) classes to guess from)."""
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or np.any(n < 0) or n.sum() <= 0:
        raise ValueError(f"class counts must be a non-empty 1-d array of non-negative counts with a positive sum, "
                         f"got {counts!r}")
    k = len(n)
    p = n / n.sum()
    major = int(np.argmax(p))
    if task == "classification":  # weighted F1: sum_k p_k F1_k
        return {"majority": float(p[major] * 2 * p[major] / (1 + p[major])),
                # precision p_k, recall 1/K
                "uniform": float(np.sum(p * 2 * p / (k * p + 1))),
                # precision = recall = p_k
                "proportional": float(np.sum(p * p))}
    if task == "segmentation":  # mean IoU over the classes with a non-empty union
        present = p > 0
        return {"majority": float(p[major] / present.sum()),
                # every class predicted on N/K pixels: TP n_k/K, union n_k + N/K - n_k/K
                "uniform": float(np.mean(p / (k * p + 1 - p))),
                # class k predicted on p_k N pixels: TP p_k n_k, union 2 n_k - p_k n_k
                "proportional": float(np.mean(p[present] / (2 - p[present])))}
    raise ValueError(f"unknown task {task!r}")


def chance_level(counts: Sequence[float], task: str) -> float:
    """The best label-blind guess's score (chance_levels' maximum)."""
    return max(chance_levels(counts, task).values())


def split_class_counts(prepared: str | Path, seeds: Sequence[int | str], split: str = "test") -> dict[str, list[int]]:
    """{seed: class counts of its `split`} from a prepared file (the ignore label, < 0, dropped)."""
    from cmkd.data.h5 import PreparedSplit, read_attrs, seed_root

    attrs = read_attrs(prepared)
    k = len(attrs["class_names"])
    by_root: dict[str, list[int]] = {}
    out = {}
    for seed in seeds:
        root = seed_root(attrs, int(seed))
        if root not in by_root:
            counts = np.zeros(k, dtype=np.int64)
            for _, arrays in PreparedSplit(prepared, split, root).iter_chunks(["labels"]):
                labels = arrays["labels"].reshape(-1).astype(np.int64)
                counts += np.bincount(labels[labels >= 0], minlength=k)[:k]
            by_root[root] = [int(c) for c in counts]
        out[str(seed)] = by_root[root]
    return out


def _by_seed(stat: Mapping[str, Any]) -> dict[str, float]:
    seeds = stat.get("seeds") or [str(i) for i in range(stat["n"])]
    return {str(s): float(v) for s, v in zip(seeds, stat["values"])}


def _above(diff: Mapping[str, Any]) -> bool:
    return diff["ci95"][0] > 0 if diff["ci95"] is not None else diff["mean"] > 0


def judgeability(report: Mapping[str, Any], counts: Mapping[str, Sequence[float]]) -> dict[str, Any] | None:
    """The record for a report of `collect` (its `teacher` and `student` rows) and the test split's
    class counts per seed: {judgeable, teacher, student, chance, chance_by_guess, teacher_vs_chance,
    teacher_vs_student, seeds, rule, metric}; None when TEACHER or STUDENT has no value to judge by."""
    metric, task, rows = report["metric"], report["task"], report["rows"]
    teacher, student = (rows.get(r, {}).get(metric) for r in ("teacher", "student"))
    if teacher is None or student is None:
        return None
    t, s = _by_seed(teacher), _by_seed(student)
    seeds = [seed for seed in t if seed in s and seed in counts]
    if not seeds:
        return None
    missing = sorted(set(t) - set(counts))
    if missing:
        raise ValueError(f"no test-split class counts for seed(s) {missing}")
    guesses = {seed: chance_levels(counts[seed], task) for seed in seeds}
    chance = [max(guesses[seed].values()) for seed in seeds]
    vs_chance = paired([t[x] for x in seeds], chance)
    vs_student = paired([t[x] for x in seeds], [s[x] for x in seeds])
    above_chance, above_student = _above(vs_chance), _above(vs_student)
    by_guess = {g: float(np.mean([guesses[x][g] for x in seeds])) for g in next(iter(guesses.values()))}
    return {"judgeable": above_chance and above_student, "above_chance": above_chance, "above_student": above_student,
            "metric": metric, "seeds": seeds, "teacher": float(np.mean([t[x] for x in seeds])),
            "student": float(np.mean([s[x] for x in seeds])), "chance": float(np.mean(chance)),
            "chance_by_guess": by_guess,
            "teacher_vs_chance": {k: vs_chance[k] for k in ("mean", "ci95", "n")},
            "teacher_vs_student": {k: vs_student[k] for k in ("mean", "ci95", "n")},
            "rule": RULE if len(seeds) > 1 else RULE_ONE_SEED}


def judgeability_note(record: Mapping[str, Any] | None) -> str:
    """The note a table or diagnosis starts with when nothing can be judged; "" otherwise."""
    if not record or record["judgeable"]:
        return ""

    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    def bound(diff: Mapping[str, Any]) -> str:
        ci = diff["ci95"]
        return f"paired difference {pct(diff['mean'])}" + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else " (one seed)")

    reasons = []
    if not record["above_chance"]:
        reasons.append(f"not above chance ({pct(record['chance'])}; {bound(record['teacher_vs_chance'])})")
    if not record["above_student"]:
        reasons.append(f"not above the student ({pct(record['student'])}; {bound(record['teacher_vs_student'])})")
    return NOTE.format(teacher=pct(record["teacher"]), reasons=" / ".join(reasons), rule=record["rule"],
                       metric=record["metric"].replace("_", " "))
