"""Synthetic two-modality classification data with a domain-gap knob gamma.

gamma in [0, 1] is the share of the teacher modality's decisive features that the student
modality does NOT see: 0 = every decisive feature of the teacher is shared with the student,
1 = none is (DESIGN.md). Generators are registered in `GENERATORS`; each returns
(teacher [N, D] float32, student [N, D] float32, labels [N] int64) for one gamma.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from cmkd.data.registry import register_dataset
from cmkd.utils.atomic import write_json
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
def ntdh_sklearn(n_samples: int, n_features: int, n_classes: int, gamma: float, seed: int,
                 student_noise: float = 0.0, **_: Any) -> Generated:
    """NTDH's scikit-learn setting: the student modality x^b is fixed; the teacher modality
    x^a keeps the first (1 - gamma) share of x^b's decisive features and replaces the rest by
    other decisive features of the same labels, so the label information stays while the
    domain gap grows with gamma.

    make_classification draws 2 * n_features informative features for one labelling; the
    first half (A) is x^b's, the second half (B) the replacement pool.

    student_noise: std of Gaussian noise, in units of each feature's own std, added to the
    student modality only (a weaker sensor: depth next to RGB). 0 is NTDH's setting, where both
    modalities carry the same amount of label information and the teacher has nothing to
    teach; > 0 makes the teacher the better model while the student still sees (noisy copies
    of) the modality-general decisive features the teacher shares with it.
    """
    from sklearn.datasets import make_classification  # slow to import: only where data is drawn

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
    if student_noise:
        # Its own stream (seed, 2): the teacher and the labels do not depend on the knob.
        noise = np.random.default_rng([seed, 2]).standard_normal(a.shape)
        student = a + float(student_noise) * a.std(axis=0, keepdims=True) * noise
    return teacher.astype(np.float32), student.astype(np.float32), y.astype(np.int64)


@dataclass(frozen=True)
class MFHLayout:
    """Where MFH's decisive features live, for one (gamma, alpha) setting.

    Latent decisive features z [N, n_latent] ~ N(0, I) fix the label. The student sees latents
    [0, n_decisive); the teacher sees the window [n_decisive - n_general, n_decisive - n_general
    + n_teacher_decisive), whose first `n_general` latents are the student's last ones (the
    modality-general decisive features) and the rest are teacher-specific. This is MFH's
    construction (Appendix, synthetic Gaussian): with alpha = 0 the window has n_decisive latents
    and slides as gamma grows (their Fig. 2); with gamma = 0 and alpha > 0 the teacher keeps every
    student latent and gains extra specific ones (their Fig. 3).
    """

    n_features: int
    n_decisive: int
    n_general: int
    n_extra: int
    n_latent: int
    #: teacher channel -> latent index it copies (-1: pure noise channel), after the channel shuffle
    teacher_latent: np.ndarray
    #: student channel -> latent index it copies (-1: pure noise channel)
    student_latent: np.ndarray

    @property
    def n_teacher_decisive(self) -> int:
        return self.n_decisive + self.n_extra

    @property
    def general_latents(self) -> np.ndarray:
        return np.arange(self.n_decisive - self.n_general, self.n_decisive)

    @property
    def teacher_general_mask(self) -> np.ndarray:
        """[n_features] bool: teacher channels that hold a modality-general decisive feature."""
        return np.isin(self.teacher_latent, self.general_latents)

    @property
    def teacher_specific_share(self) -> float:
        """Share of the teacher's decisive features that the student does not see (DESIGN's gamma)."""
        return 1.0 - self.n_general / self.n_teacher_decisive

    @property
    def mfh_gamma(self) -> float:
        """MFH's own gamma: modality-general decisive features over all decisive features seen
        by either modality (their Eq. in Sec. 4; the code prints o / (2d - o))."""
        union = self.n_decisive + (self.n_teacher_decisive - self.n_general)
        return self.n_general / union


def mfh_layout(
    n_features: int,
    gamma: float,
    seed: int,
    n_decisive: int | None = None,
    alpha: float = 0.0,
    n_latent: int | None = None,
    n_extra: int | None = None,
    student_features: int | None = None,
) -> MFHLayout:
    """The feature layout of `mfh_gaussian` (no data drawn), so callers can know the truth.

    n_decisive: decisive features per modality at alpha = 0 (default n_features // 4).
    gamma: share of those teacher decisive features that are modality-specific; the teacher
        keeps round((1 - gamma) * n_decisive) of the student's decisive features.
    alpha: MFH's alpha knob. The teacher gains round(alpha / (1 - alpha) * n_decisive) extra
        modality-specific decisive features, so that with gamma = 0 exactly an alpha share of the
        teacher's decisive features is modality-specific; alpha = 0 adds none.
    n_latent: latent features the label depends on (default: every latent either modality
        sees). Latents nobody sees act as label noise, as in MFH; keep it fixed across a sweep.
    n_extra: the number of extra teacher-specific decisive features, given directly instead of
        through alpha (MFH's Table 2 keeps it at 10 while the shared part grows).
    student_features: the student modality's width (default n_features); MFH's Fig. 2 uses 25
        teacher and 50 student channels.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError("gamma", f"must be in [0, 1], got {gamma}")
    if not 0.0 <= alpha < 1.0:
        raise ConfigError("alpha", f"must be in [0, 1), got {alpha}")
    d = int(n_decisive) if n_decisive is not None else max(1, n_features // 4)
    if d < 1:
        raise ConfigError("n_decisive", f"must be >= 1, got {d}")
    k = n_shared(d, gamma)
    if n_extra is not None and alpha:
        raise ConfigError("n_extra", "give alpha or n_extra, not both")
    extra = int(n_extra) if n_extra is not None else int(round(alpha / (1.0 - alpha) * d))
    if extra < 0:
        raise ConfigError("n_extra", f"must be >= 0, got {extra}")
    width_b = n_features if student_features is None else int(student_features)
    teacher_d = d + extra
    used = d + teacher_d - k  # latents seen by at least one modality
    latent = used if n_latent is None else int(n_latent)
    if latent < used:
        raise ConfigError("n_latent", f"must be >= {used} (latents seen by teacher or student) for gamma={gamma}, alpha={alpha}; got {latent}")
    if n_features < teacher_d:
        raise ConfigError("n_features", f"must be >= {teacher_d} (the teacher's decisive features); got {n_features}")
    if width_b < d:
        raise ConfigError("student_features", f"must be >= {d} (the student's decisive features); got {width_b}")
    student_latent = np.full(width_b, -1, np.int64)
    student_latent[:d] = np.arange(d)
    teacher_latent = np.full(n_features, -1, np.int64)
    teacher_latent[:teacher_d] = np.arange(d - k, d - k + teacher_d)
    # Shuffle the teacher's channels (seeded), so that where a feature sits says nothing about it.
    teacher_latent = teacher_latent[np.random.default_rng([seed, 1]).permutation(n_features)]
    return MFHLayout(n_features, d, k, extra, latent, teacher_latent, student_latent)


def mfh_general_channels(n_features: int, gamma: float, seed: int, **params: Any) -> np.ndarray:
    """[n_features] bool mask of the teacher channels that are truly modality-general decisive
    features in `mfh_gaussian(n_features=..., gamma=..., seed=..., **params)`."""
    return mfh_layout(n_features, gamma, seed, **_layout_params(params)).teacher_general_mask


def _layout_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: params[k] for k in _MFH_PARAMS if k in params and k != "label_weights"}


_NTDH_PARAMS = ("student_noise",)
_MFH_PARAMS = ("n_decisive", "alpha", "n_latent", "n_extra", "student_features", "label_weights")


@register_generator("mfh")
def mfh_gaussian(
    n_samples: int,
    n_features: int,
    n_classes: int,
    gamma: float,
    seed: int,
    n_decisive: int | None = None,
    alpha: float = 0.0,
    n_latent: int | None = None,
    n_extra: int | None = None,
    student_features: int | None = None,
    label_weights: str = "gaussian",
    **_: Any,
) -> Generated:
    """MFH's synthetic Gaussian data (Xue et al., ICLR 2023, Sec. 4 and Appendix).

    Latent decisive features z ~ N(0, I) decide the label through a random linear rule:
    y = argmax_c (z @ W)_c with W ~ N(0, 1) [n_latent, n_classes]; for two classes that is
    MFH's y = 1[delta^T z > 0] with a random Gaussian hyperplane delta. Each modality copies its
    decisive latents into some channels (see `mfh_layout`) and fills every other channel with
    N(0, 1) noise. Returns (teacher [N, n_features], student [N, student_features], labels [N]).

    label_weights: "gaussian" (the random hyperplane of MFH's Figs. 2 and 3) or "ones" (two
    classes only: y = 1[sum of the decisive latents > 0], every decisive feature weighted
    equally, as MFH's Table 2 code does with delta = (1, ..., 1)).
    """
    if n_classes < 2:
        raise ConfigError("n_classes", f"must be >= 2, got {n_classes}")
    if label_weights not in ("gaussian", "ones"):
        raise ConfigError("label_weights", f"must be gaussian or ones, got {label_weights!r}")
    if label_weights == "ones" and n_classes != 2:
        raise ConfigError("label_weights", "ones (MFH's equal-weight hyperplane) needs n_classes = 2")
    layout = mfh_layout(n_features, gamma, seed, n_decisive=n_decisive, alpha=alpha, n_latent=n_latent,
                        n_extra=n_extra, student_features=student_features)
    rng = np.random.default_rng([seed, 0])
    z = rng.standard_normal((n_samples, layout.n_latent))
    weights = rng.standard_normal((layout.n_latent, n_classes))
    if label_weights == "ones":
        weights = np.tile([-1.0, 1.0], (layout.n_latent, 1))  # class 1 iff sum(z) > 0
    labels = np.argmax(z @ weights, axis=1)

    def modality(channel_latent: np.ndarray) -> np.ndarray:
        x = rng.standard_normal((n_samples, len(channel_latent)))
        decisive = channel_latent >= 0
        x[:, decisive] = z[:, channel_latent[decisive]]
        return x.astype(np.float32)

    return modality(layout.teacher_latent), modality(layout.student_latent), labels.astype(np.int64)


def validate(cfg: Mapping[str, Any], key: str) -> None:
    if cfg.get("generator", "ntdh") not in GENERATORS:
        raise ConfigError(f"{key}.generator", f"unknown generator {cfg.get('generator')!r}; known: {sorted(GENERATORS)}")
    gammas = cfg.get("gammas")
    if not isinstance(gammas, list) or not gammas:
        raise ConfigError(f"{key}.gammas", "must be a non-empty list of numbers in [0, 1]")
    for g in list(gammas) + [cfg.get("gamma", 0.0)]:
        if not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0:
            raise ConfigError(f"{key}.gammas", f"gamma {g!r} is not a number in [0, 1]")
    extra = cfg.get("generator_params") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"{key}.generator_params", "must be a mapping of generator keyword arguments")
    if cfg.get("generator", "ntdh") == "ntdh":
        unknown = sorted(set(extra) - set(_NTDH_PARAMS))
        if unknown:
            raise ConfigError(f"{key}.generator_params.{unknown[0]}", f"not a parameter of the ntdh generator {_NTDH_PARAMS}")
        noise = extra.get("student_noise", 0.0)
        if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
            raise ConfigError(f"{key}.generator_params.student_noise", f"must be a number >= 0, got {noise!r}")
    if cfg.get("generator", "ntdh") == "mfh":
        unknown = sorted(set(extra) - set(_MFH_PARAMS))
        if unknown:
            raise ConfigError(f"{key}.generator_params.{unknown[0]}", f"not a parameter of the mfh generator {_MFH_PARAMS}")
        for g in list(gammas) + [cfg.get("gamma", 0.0)]:
            try:
                mfh_layout(int(cfg["n_features"]), float(g), 0, **_layout_params(extra))
            except ConfigError as err:
                raise ConfigError(f"{key}.generator_params.{err.key}", err.problem) from None
    split = cfg.get("split", [0.6, 0.2, 0.2])
    if len(split) != 3 or abs(sum(split) - 1.0) > 1e-6 or min(split) <= 0:
        raise ConfigError(f"{key}.split", f"must be three positive fractions summing to 1, got {split}")


def variant_name(generator: str, gamma: float) -> str:
    return f"{generator}_gamma_{gamma:.2f}"


def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True) -> None:
    """Nothing to fetch: the data is generated in `prepare`. Record that, for provenance."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_json(raw_dir / "SOURCE.json", {"source": "generated", "generators": sorted(GENERATORS)})


@register_dataset("synthetic")
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
    extra = dict(cfg.get("generator_params") or {})  # e.g. mfh: n_decisive, alpha, n_latent
    with PreparedWriter(out_path, attrs) as writer:
        for root, gamma in [("", float(cfg["gamma"]))] + [(variant_name(gen_name, float(g)), float(g)) for g in cfg["gammas"]]:
            teacher, student, y = GENERATORS[gen_name](gamma=gamma, seed=seed, **common, **extra)
            for split, idx in stratified_split(y, fractions, seed).items():
                writer.write(split, {"teacher": teacher[idx], "student": student[idx], "labels": y[idx]}, root=root)
