"""The papers' synthetic experiments as pure functions: each sweep takes its configuration (an
`experiments.<name>` entry of params.yaml) and returns a JSON-ready result dict.

- `mfh_sweep`: MFH's Gaussian data (`cmkd.data.datasets.synthetic.mfh_gaussian`): a teacher, a no-KD
  student and a KD student at every sweep point and seed (MFH Fig. 2 when gamma moves, Fig. 3
  when alpha moves).
- `mfh_algorithm1_sweep`: MFH Table 2: Algorithm 1 ranks the teacher's channels, a
  modality-general teacher is trained on the top ones, and MG-KD is compared with KD.
- `ntdh_gap_sweep`: NTDH Fig. 3 on the sklearn generator: KD gain, target and non-target
  divergence across gamma, and KD with the NTDH masks.
- `digits_noise_sweep`: the MNIST / MNIST-M noise test on digits -> digits-M.

How runs are made: every (sweep point, seed) pair is a "slice" with its own data (the generator
called with that seed) and its own networks, initialised as `build_model` does after
`torch.manual_seed(seed)`; the no-KD and KD students of a slice start from the same weights, so
the KD gain is a paired difference. All slices of a sweep train together as one
`cmkd.experiments.batched.BatchedMLP` (each slice gets exactly the gradient it would get alone), with the
project's distillers and losses. As in the papers' synthetic code, networks train for a fixed
number of full-batch epochs and are evaluated once, on a held-out test split.

Result layout (what claims.yaml reads): ``points`` (one entry per sweep point, each metric as
``{"mean", "std", "sem", "n", "values"}`` over seeds), ``series`` (per metric, the means over the
points in sweep order, and ``<metric>_sem``), and ``derived`` (the scalars the claims test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cmkd.config import STUDENT_RUN, TEACHER_RUN
from cmkd.data.datasets.synthetic import GENERATORS, mfh_layout
from cmkd.errors import ConfigError
from cmkd.experiments.batched import BatchedMLP, slice_accuracy, train_batched
from cmkd.losses import DIVERGENCE_FORMS, cross_entropy, to_rows
from cmkd.methods import build_distiller
from cmkd.models import build_model
from cmkd.training.activity import part_record, summarise
from cmkd.utils.jsonable import jsonable

MFH_LAYOUT_KEYS = ("n_decisive", "alpha", "n_latent", "n_extra", "student_features")
_TRAIN_KEYS = {"epochs", "lr", "optimizer", "momentum", "weight_decay", "batch_size"}


# --------------------------------------------------------------------------- statistics

def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std, standard error of the mean, n and the values themselves."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "sem": std / math.sqrt(n) if n else float("nan"), "n": n,
            "values": [float(x) for x in v]}


def seeds_needed(pilot_std: float, target_sem: float, minimum: int = 3) -> int:
    """Seeds so that the standard error pilot_std / sqrt(n) is at most `target_sem`."""
    if target_sem <= 0:
        raise ValueError("target_sem must be > 0")
    return max(minimum, int(math.ceil((pilot_std / target_sem) ** 2)))


# --------------------------------------------------------------------------- stacked data

@dataclass
class Slices:
    """One split of S slices: teacher [N, S, Dt], student [N, S, Ds], target [N, S, 1]."""

    teacher: torch.Tensor
    student: torch.Tensor
    target: torch.Tensor
    teacher_logits: torch.Tensor | None = None

    @property
    def n_slices(self) -> int:
        return self.target.shape[1]

    def batch(self) -> dict[str, torch.Tensor]:
        out = {"teacher_input": self.teacher, "student_input": self.student, "target": self.target}
        if self.teacher_logits is not None:
            out["teacher_logits"] = self.teacher_logits
        return out

    def with_teacher(self, teacher: torch.nn.Module) -> Slices:
        """The split with the frozen teacher's logits cached (they never change during KD)."""
        with torch.no_grad():
            logits = teacher(self.teacher)
        return Slices(self.teacher, self.student, self.target, logits)

    def with_teacher_channels(self, channels: torch.Tensor) -> Slices:
        """The teacher modality reduced to per-slice channels [S, k] (MFH's MG teacher input)."""
        idx = channels.unsqueeze(0).expand(self.teacher.shape[0], -1, -1)
        return Slices(torch.gather(self.teacher, 2, idx), self.student, self.target)

    def slice(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slice i as plain arrays: teacher [N, Dt], student [N, Ds], target [N]."""
        return self.teacher[:, i], self.student[:, i], self.target[:, i, 0]


def split_indices(n: int, counts: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """A seeded random split of n rows into `counts` ({"train": .., "test": ..})."""
    names = [name for name in ("train", "val", "test") if name in counts]
    sizes = [int(counts[name]) for name in names]
    if sum(sizes) > n or min(sizes) < 1:
        raise ConfigError("split", f"split sizes {dict(counts)} must be >= 1 and fit the {n} samples")
    order = np.random.default_rng([seed, 7]).permutation(n)
    bounds = np.cumsum([0] + sizes)
    return {name: np.sort(order[bounds[i]:bounds[i + 1]]) for i, name in enumerate(names)}


def stack(datasets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
          indices: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Slices]:
    """Stack per-slice (teacher, student, labels) arrays, split by per-slice indices."""
    out = {}
    for split in indices[0]:
        parts = [(t[idx[split]], s[idx[split]], y[idx[split]]) for (t, s, y), idx in zip(datasets, indices)]
        out[split] = Slices(
            teacher=torch.from_numpy(np.stack([p[0] for p in parts], axis=1).astype(np.float32)),
            student=torch.from_numpy(np.stack([p[1] for p in parts], axis=1).astype(np.float32)),
            target=torch.from_numpy(np.stack([p[2] for p in parts], axis=1).astype(np.int64)[..., None]),
        )
    return out


# --------------------------------------------------------------------------- training blocks

def fit_slices(run_cfg: Mapping[str, Any], net: Mapping[str, Any], data: Slices, seeds: Sequence[int], num_classes: int,
               teacher: torch.nn.Module | None = None, key: str = "experiments") -> BatchedMLP:
    """Train one network per slice with the method `run_cfg` describes.

    net: {"model": an `mlp` models entry, "train": {epochs, lr, optimizer, [momentum,
    weight_decay, batch_size]}}; seeds: the init seed of each slice.
    """
    run = dict(run_cfg)
    x = data.teacher if run.get("method") == "teacher" else data.student
    model = BatchedMLP.build(net["model"], int(np.prod(x.shape[2:])), num_classes, seeds)
    distiller = build_distiller(run, model, teacher, num_classes, key=f"{key}.kd")
    train_batched(distiller, data.batch(), data.n_slices, seed=int(seeds[0]), **_train_options(net, key))
    return model


class PerSliceWeights:
    """A KD sample-weight hook (e.g. the NTDH sample mask) applied to each slice on its own.

    The hook sees one slice at a time, so a mask that ranks a batch's samples (NTDH drops the
    `drop_ratio` largest non-target divergences) ranks only that slice's rows. The weights are
    then rescaled so that every slice's weights sum to N: the KD term's weighted mean over all
    rows becomes the mean over slices of each slice's own weighted mean, i.e. each slice gets
    exactly the loss it would get alone (a slice whose rows are all dropped gets 0 either way,
    but then the other slices' share grows by S / (S - 1); the drop rule never drops every row).
    A hook with `normalise_by_weights = False` (NTDH's PSSM) passes through unchanged.
    """

    def __init__(self, hook: Callable[..., torch.Tensor]):
        self.hook = hook

    @property
    def normalise_by_weights(self) -> bool:
        return getattr(self.hook, "normalise_by_weights", True)

    @property
    def last_scale(self) -> torch.Tensor | None:
        return getattr(self.hook, "last_scale", None)

    def __call__(self, batch: Mapping[str, torch.Tensor], student_kd: torch.Tensor,
                 teacher_kd: torch.Tensor) -> torch.Tensor:
        target = batch["target"]  # [N, S, 1]
        if not self.normalise_by_weights:
            # NTDH's PSSM: independent per row, and its KD sum is divided by the number of rows
            # (`NTDHMask` scales by sum(w) / rows over all N * S rows = the mean over slices of
            # each slice's own sum(w * KD) / N): nothing to rescale per slice.
            return self.hook(batch, student_kd, teacher_kd)
        if hasattr(self.hook, "per_column"):  # the hook ranks every slice apart in one pass
            weights = self.hook.per_column({"target": target}, student_kd, teacher_kd)
        else:
            weights = torch.cat([self.hook({"target": target[:, i:i + 1]}, student_kd[:, :, i:i + 1],
                                           teacher_kd[:, :, i:i + 1])
                                 for i in range(target.shape[1])], dim=1)
        total = (weights * (target >= 0)).sum(dim=(0, 2), keepdim=True)
        return torch.where(total > 0, weights * target.shape[0] / total.clamp_min(1e-12), torch.zeros_like(weights))


def ntdh_feature_teachers(run_cfg: Mapping[str, Any], nets: Mapping[str, Any], train: Slices, seeds: Sequence[int],
                          num_classes: int,
                          key: str = "experiments") -> tuple[BatchedMLP, torch.Tensor]:
    """NTDH's feature mask for every slice: MFH's Algorithm 1 (`cmkd.methods.mfh.algorithm1`)
    with the run's non-target divergence as the distance - its joint pair trained for all slices
    at once (`train_pair_slices`), each slice's input channels ranked on its own pair - and a
    teacher per slice trained on its most salient channels only (`keep_ratio`; auto: NTDH's
    `mask_dim` of them; the others removed, as NTDH's sklearn code does).
    Returns (the retrained teachers, the kept channels [S, k])."""
    from cmkd.methods.mfh import algorithm1
    from cmkd.methods.ntdh import FEATURE_DISTANCES, NTDHMask, feature_mask_rules

    cfg = {**NTDHMask.defaults, **run_cfg}
    if cfg["level"] not in ("auto", "input"):
        raise ConfigError(f"{key}.level",
                          f"the batched experiments rank input channels (auto or input), got {cfg['level']!r}")
    if cfg["channels"] is not None:
        raise ConfigError(f"{key}.channels",
                          "the batched experiments choose the channels with Algorithm 1 (channels: null)")
    # vector data: NTDH's sklearn rules (permutation tags, a retrained teacher) are the only ones here
    k, saliency, retrain = feature_mask_rules(cfg, True, int(train.teacher.shape[2]))
    if saliency != "permute" or not retrain:
        raise ConfigError(f"{key}.saliency",
                          "the batched experiments tag input channels by permutation and retrain the teacher "
                          "(saliency: auto or permute, retrain: auto or true)")
    distance = FEATURE_DISTANCES[cfg["divergence_form"]]
    pair_t, pair_s = train_pair_slices(nets, train, seeds, num_classes, pair_epochs=int(cfg["pair_epochs"]),
                                       pair_lr=float(cfg["pair_lr"]),
                                       distance=distance, batch_size=cfg["pair_batch_size"],
                                       seed=int(seeds[0]), key=key)
    chosen = []
    for i, seed in enumerate(seeds):
        x_t, x_s, y = train.slice(i)
        channels, _ = algorithm1(pair_t.unstack(i), pair_s.unstack(i), x_t, x_s, y, k, train_pair=False,
                                 n_repeats=int(cfg["n_repeats"]),
                                 distance=distance, generator=torch.Generator().manual_seed(int(seed)),
                                 batch_size=1 << 16)
        chosen.append(torch.as_tensor(channels, dtype=torch.long))
    channels = torch.stack(chosen)
    teacher = fit_slices(TEACHER_RUN, nets["teacher"], train.with_teacher_channels(channels), seeds,
                         num_classes, key=key)
    return teacher, channels


def fit_mask_slices(run_cfg: Mapping[str, Any], nets: Mapping[str, Any], cached: Slices, seeds: Sequence[int],
                    num_classes: int, teacher: BatchedMLP,
                    key: str = "experiments") -> tuple[BatchedMLP, tuple[BatchedMLP, torch.Tensor] | None,
                                                       dict[str, Any] | None]:
    """`fit_slices` for the NTDH masks (method `ntdh_mask`), each slice as `ntdh_mask` trains it.

    nets: {"teacher": ..., "student": ...} (model + train). Feature mask (mode feature / both):
    per slice, Algorithm 1 with NTDH's distance and a teacher retrained on the kept channels
    (`ntdh_feature_teachers`); KD then distils from that teacher (its logits fixed, so cached).
    Sample masks: the method's own hook, applied slice by slice (`PerSliceWeights`). Returns the
    students; for feature masks, (the retrained teachers, the kept channels [S, k]); and the
    mask's activity record over every slice (`cmkd.training.activity.summarise`; None for a run
    without a mask), so a claim about the mask can see when it did nothing.
    """
    from cmkd.methods.ntdh import FEATURE_MASK_SPEC, NTDHMask

    run = dict(run_cfg)
    if run.get("method") != "ntdh_mask":
        return fit_slices(run, nets["student"], cached, seeds, num_classes, teacher=teacher, key=key), None, None
    mode = {**NTDHMask.defaults, **run}["mode"]
    data = cached
    feature = None
    parts = []
    if mode in ("feature", "both"):
        new_teacher, channels = ntdh_feature_teachers(run, nets, cached, seeds, num_classes, key=key)
        width, kept = int(cached.teacher.shape[2]), int(channels.shape[1])
        parts.append(part_record(FEATURE_MASK_SPEC, (width - kept) * channels.shape[0], width * channels.shape[0],
                                 unit="teacher input channels"))
        data = Slices(cached.teacher, cached.student, cached.target).with_teacher_channels(channels)
        with torch.no_grad():
            data = Slices(data.teacher, data.student, data.target, new_teacher(data.teacher))
        feature = (new_teacher, channels)
        teacher = new_teacher
        # KD from the retrained teacher's cached logits: the base method, plus PSSM with `both`
        run = {**run, "mode": "sample"} if mode == "both" else dict({**NTDHMask.defaults, **run}["base"])
    model = BatchedMLP.build(nets["student"]["model"], int(np.prod(data.student.shape[2:])), num_classes, seeds)
    distiller = build_distiller(run, model, teacher, num_classes, key=key)
    hook = None
    if run.get("method") == "ntdh_mask":
        hook = distiller.inner.sample_weight_hook
        distiller.inner.sample_weight_hook = PerSliceWeights(hook)
    train_batched(distiller, data.batch(), data.n_slices, seed=int(seeds[0]), **_train_options(nets["student"], key))
    if hook is not None and hasattr(hook, "activity"):
        parts.append(part_record(hook.activity.spec, *hook.activity.take()))
    return model, feature, summarise([parts])


def _train_options(net: Mapping[str, Any], key: str) -> dict[str, Any]:
    train = dict(net["train"])
    unknown = sorted(set(train) - _TRAIN_KEYS)
    if unknown:
        raise ConfigError(f"{key}.nets.train.{unknown[0]}", f"unknown training option; known: {sorted(_TRAIN_KEYS)}")
    return train


@torch.no_grad()
def slice_divergences(teacher_logits: torch.Tensor, student_logits: torch.Tensor, target: torch.Tensor,
                      temperature: float = 1.0,
                      form: str = "ntdh") -> dict[str, np.ndarray]:
    """Per-slice mean target / non-target divergence (NTDH) of logits [N, C, S, 1]:
    `target_div` / `non_target_div` in `form` (ntdh: NTDH's 0.5 [KL(m || p_s) + KL(m || p_t)];
    js: textbook JS), and the same in the other form with its name as a suffix (`_js` / `_ntdh`)."""
    from cmkd.losses import DIVERGENCE_FORMS, non_target_divergence, target_divergence

    if form not in DIVERGENCE_FORMS:
        raise ValueError(f"unknown divergence form {form!r}; known: {list(DIVERGENCE_FORMS)}")
    n, s = target.shape[0], target.shape[1]
    zt, zs, y = to_rows(teacher_logits), to_rows(student_logits), target.reshape(-1).long()
    out = {}
    for f in (form, *(other for other in DIVERGENCE_FORMS if other != form)):
        suffix = "" if f == form else f"_{f}"
        out[f"target_div{suffix}"] = target_divergence(zs, zt, y, temperature, form=f).reshape(n, s).mean(0).numpy()
        out[f"non_target_div{suffix}"] = (non_target_divergence(zs, zt, y, temperature, form=f)
                                          .reshape(n, s).mean(0).numpy())
    return out


@torch.no_grad()
def diagnosis_indicators(teacher: BatchedMLP, nokd: BatchedMLP, test: Slices) -> dict[str, np.ndarray]:
    """`cmkd.diagnosis.indicators` of every slice's teacher and no-KD student on the test
    split (one vectorised call; the no-KD student's penultimate features feed the probes),
    as `diag_<name>` per slice: the conditions the KD-gain predictor is fit and checked on."""
    from cmkd.diagnosis.indicators import indicators

    def slice_major(z: torch.Tensor) -> torch.Tensor:  # [N, C, S, 1] -> [S, N, C]
        return z.squeeze(-1).permute(2, 0, 1)

    values = indicators(slice_major(teacher(test.teacher)), slice_major(nokd(test.student)), test.target[..., 0].t(),
                        nokd.features(test.student))
    return {f"diag_{name}": v for name, v in values.items()}


def teacher_student_kd(splits: Mapping[str, Slices], nets: Mapping[str, Any], kd: Mapping[str, Any], num_classes: int,
                       seeds: Sequence[int], key: str,
                       with_nokd: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Teacher, no-KD student (unless `with_nokd` is False) and KD student of every slice;
    per-slice test accuracies and the KD gain."""
    train, test = splits["train"], splits["test"]
    teacher = fit_slices(TEACHER_RUN, nets["teacher"], train, seeds, num_classes, key=key)
    cached = train.with_teacher(teacher)
    kd_student = fit_slices(kd, nets["student"], cached, seeds, num_classes, teacher=teacher, key=key)
    models = {"teacher": teacher, "kd": kd_student}
    if with_nokd:
        models["nokd"] = fit_slices(STUDENT_RUN, nets["student"], train, seeds, num_classes, key=key)
    with torch.no_grad():
        logits = {name: net(test.teacher if name == "teacher" else test.student) for name, net in models.items()}
    acc = {f"{name}_acc": slice_accuracy(z, test.target).numpy() for name, z in logits.items()}
    if with_nokd:
        acc["kd_gain"] = acc["kd_acc"] - acc["nokd_acc"]
        acc.update(diagnosis_indicators(models["teacher"], models["nokd"], test))
    return acc, {**models, "cached": cached, "test_logits": logits}


def train_pair_slices(nets: Mapping[str, Any], data: Slices, seeds: Sequence[int], num_classes: int, *,
                      pair_epochs: int = 200,
                      pair_lr: float = 0.01, momentum: float = 0.9, distance: str = "mse", distance_weight: float = 1.0,
                      batch_size: int | None = None, seed: int = 0,
                      key: str = "experiments") -> tuple[BatchedMLP, BatchedMLP]:
    """Step 1 of MFH's Algorithm 1 (`cmkd.methods.mfh.train_modality_pair`) for every slice at
    once: a teacher-modality and a student-modality network per slice, initialised one after
    the other after torch.manual_seed(seed), trained with SGD (momentum) on
    CE(teacher) + CE(student) + distance_weight * dist(teacher logits, student logits), full
    batch, or with `batch_size` minibatches in one shuffled row order per epoch (from `seed`)
    shared by the slices. `distance`: mse, l1 (MFH) or ntdh / non_target_js (NTDH's non-target
    divergence, per row then averaged, as `cmkd.methods.mfh.PAIR_DISTANCES`)."""
    from cmkd.methods.mfh import PAIR_DISTANCES

    if distance not in PAIR_DISTANCES:
        raise ConfigError(f"{key}.algorithm1.distance", f"must be one of {sorted(PAIR_DISTANCES)}, got {distance!r}")
    teachers, students = [], []
    for seed in seeds:
        torch.manual_seed(int(seed))
        teachers.append(build_model(nets["teacher"]["model"], (data.teacher.shape[2],), num_classes))
        students.append(build_model(nets["student"]["model"], (data.student.shape[2],), num_classes))
    pair_t, pair_s = BatchedMLP.from_models(teachers), BatchedMLP.from_models(students)
    opt = torch.optim.SGD(list(pair_t.parameters()) + list(pair_s.parameters()), lr=pair_lr, momentum=momentum)
    n, n_slices = data.target.shape[0], data.n_slices
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(int(pair_epochs)):
        order = torch.randperm(n, generator=gen) if batch_size else None
        for start in range(0, n, batch_size or n):
            rows = order[start:start + batch_size] if order is not None else slice(None)
            y = data.target[rows]
            zt, zs = pair_t(data.teacher[rows]), pair_s(data.student[rows])
            if distance in ("mse", "l1"):
                gap = ((zt - zs).pow(2) if distance == "mse" else (zt - zs).abs()).mean()
            else:  # [N, S, 1] per-row divergences: their mean is the mean over slices of each slice's
                gap = PAIR_DISTANCES[distance](zt, zs, y).mean()
            # every term is a mean over all slices' rows: times S, each slice's own loss
            loss = n_slices * (cross_entropy(zt, y) + cross_entropy(zs, y) + distance_weight * gap)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return pair_t.eval(), pair_s.eval()


# --------------------------------------------------------------------------- sweeps: plumbing

def sweep_points(sweep: Mapping[str, Sequence[Any]], key: str) -> list[dict[str, Any]]:
    """Zip the per-parameter lists of a sweep into one dict per point."""
    if not isinstance(sweep, Mapping) or not sweep:
        raise ConfigError(key, "must map generator parameters to equally long lists")
    lengths = {name: len(values) for name, values in sweep.items() if isinstance(values, (list, tuple))}
    if len(lengths) != len(sweep) or len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
        raise ConfigError(key, f"every entry must be a non-empty list, all of one length; got {dict(sweep)}")
    n = next(iter(lengths.values()))
    return [{name: sweep[name][i] for name in sweep} for i in range(n)]


def _check_common(cfg: Mapping[str, Any], key: str) -> list[int]:
    seeds = cfg.get("seeds")
    if isinstance(seeds, int) and seeds > 0:
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{key}.seeds", "must be a positive count or a non-empty list of integers")
    for name in ("teacher", "student"):
        net = (cfg.get("nets") or {}).get(name)
        if not isinstance(net, Mapping) or "model" not in net or "train" not in net:
            raise ConfigError(f"{key}.nets.{name}", "must have `model` and `train` entries")
    if not isinstance(cfg.get("kd"), Mapping) or "method" not in cfg["kd"]:
        raise ConfigError(f"{key}.kd", "must be a run config with a `method`")
    return seeds


def _aggregate(points: list[dict[str, Any]], per_slice: Mapping[str, np.ndarray], n_seeds: int) -> dict[str, Any]:
    """Per-point summaries over seeds (slice i = point i // n_seeds, seed i % n_seeds) and `series`."""
    for i, point in enumerate(points):
        for metric, values in per_slice.items():
            point[metric] = summarize(np.asarray(values)[i * n_seeds:(i + 1) * n_seeds])
    series: dict[str, list] = {m: [p[m]["mean"] for p in points] for m in per_slice}
    series.update({f"{m}_sem": [p[m]["sem"] for p in points] for m in per_slice})
    for name, value in points[0].items():  # the sweep's own coordinates (gamma, shares, ...)
        if name not in per_slice and isinstance(value, (int, float)) and not isinstance(value, bool):
            series[name] = [p[name] for p in points]
    return {"points": points, "series": series}


def _layout(params: Mapping[str, Any], seed: int):
    return mfh_layout(int(params["n_features"]), float(params.get("gamma", 0.0)), seed,
                      **{k: params[k] for k in MFH_LAYOUT_KEYS if k in params})


def _layout_info(params: Mapping[str, Any]) -> dict[str, Any]:
    layout = _layout(params, 0)
    return {
        "n_general": layout.n_general,
        "n_teacher_decisive": layout.n_teacher_decisive,
        "general_share": layout.n_general / layout.n_teacher_decisive,
        "teacher_specific_share": layout.teacher_specific_share,
        "mfh_gamma": layout.mfh_gamma,
    }


def _mfh_points(cfg: Mapping[str, Any], key: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    generator = dict(cfg["generator"])
    settings = sweep_points(cfg["sweep"], f"{key}.sweep")
    points = []
    for setting in settings:  # a bad layout fails here, before any training
        try:
            points.append({**setting, **_layout_info({**generator, **setting})})
        except ConfigError as err:
            raise ConfigError(f"{key}.sweep.{err.key}", err.problem) from None
    return generator, settings, points


def _generate(name: str, generator: Mapping[str, Any], settings: Sequence[Mapping[str, Any]], seeds: Sequence[int],
              split: Mapping[str, int]) -> tuple[dict[str, Slices], list[int]]:
    """Data of every (setting, seed) slice, split and stacked; returns the slices and their seeds."""
    n = sum(int(v) for v in split.values())
    datasets, indices, slice_seeds = [], [], []
    for setting in settings:
        for seed in seeds:
            datasets.append(GENERATORS[name](n_samples=n, seed=seed, **{**generator, **setting}))
            indices.append(split_indices(n, split, seed))
            slice_seeds.append(seed)
    return stack(datasets, indices), slice_seeds


# --------------------------------------------------------------------------- MFH: gamma and alpha sweeps

def mfh_sweep(cfg: Mapping[str, Any], key: str = "experiments.mfh") -> dict[str, Any]:
    """Teacher, no-KD and KD student accuracy at every point of an MFH sweep.

    cfg: generator (fixed mfh_gaussian kwargs incl. n_features, n_classes), sweep (kwargs ->
    lists, zipped into points), split (train / test counts), nets (teacher / student: model +
    train), kd (the KD run config), seeds (count or list).
    """
    seeds = _check_common(cfg, key)
    generator, settings, points = _mfh_points(cfg, key)
    splits, slice_seeds = _generate("mfh", generator, settings, seeds, cfg["split"])
    acc, _ = teacher_student_kd(splits, cfg["nets"], cfg["kd"], int(generator["n_classes"]), slice_seeds, key)
    result = _aggregate(points, acc, len(seeds))
    result["seeds"] = seeds
    return result


def _point_values(result: Mapping[str, Any], metric: str) -> np.ndarray:
    """Per-seed values of `metric` at every point: [points, seeds] (same seed order at every point)."""
    return np.array([p[metric]["values"] for p in result["points"]], dtype=np.float64)


def derive_mfh_gamma(result: Mapping[str, Any]) -> dict[str, Any]:
    """The gamma sweep seen by the claims: KD gain ordered by the share of modality-general
    decisive features in the teacher (means), and the per-seed KD gain (a summary with its
    values) where that share is 0 and where it is largest."""
    s = result["series"]
    order = [int(i) for i in np.argsort(s["general_share"], kind="stable")]
    by_share = {name: [s[name][i] for i in order]
                for name in ("general_share", "kd_gain", "kd_gain_sem", "teacher_acc", "nokd_acc", "kd_acc")}
    no_general = [i for i in order if s["general_share"][i] == 0.0]
    points = result["points"]
    return {
        "by_general_share": by_share,
        "kd_gain_all_specific": dict(points[no_general[0]]["kd_gain"]) if no_general else None,
        "kd_gain_all_general": dict(points[order[-1]]["kd_gain"]),
    }


def band_ratio_bootstrap(gain: np.ndarray, teacher: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """(max - min over points of the mean gain) / (last - first point of the mean teacher
    accuracy), with its bootstrap standard error over seeds (seeds resampled jointly at every
    point, so their pairing is kept). gain, teacher: [points, seeds]."""
    n = gain.shape[1]

    def ratio(g: np.ndarray, t: np.ndarray) -> np.ndarray:
        teacher_gain = t[-1] - t[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(teacher_gain > 0, (g.max(axis=0) - g.min(axis=0)) / teacher_gain, np.inf)

    estimate = float(ratio(gain.mean(axis=1)[:, None], teacher.mean(axis=1)[:, None])[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = ratio(gain[:, idx].mean(axis=2), teacher[:, idx].mean(axis=2))
    se = float(boot.std(ddof=1)) if n > 1 and np.all(np.isfinite(boot)) else None
    return {"mean": estimate if math.isfinite(estimate) else None, "sem": se, "n": int(n),
            "method": f"bootstrap over seeds ({n_boot} resamples)"}


def derive_mfh_alpha(result: Mapping[str, Any]) -> dict[str, Any]:
    """The alpha sweep seen by the claims: the teacher's gain from the first to the last point
    (per seed, a summary), the band (max - min over points) of the KD student's accuracy and of
    its KD gain (means), and the band over the teacher's gain with a bootstrap standard error."""
    s = result["series"]
    teacher = _point_values(result, "teacher_acc")
    gain = _point_values(result, "kd_gain")
    return {
        "teacher_gain": summarize(teacher[-1] - teacher[0]),
        "kd_student_gain": summarize(_point_values(result, "kd_acc")[-1] - _point_values(result, "kd_acc")[0]),
        "kd_student_band": max(s["kd_acc"]) - min(s["kd_acc"]),
        "kd_gain_band": max(s["kd_gain"]) - min(s["kd_gain"]),
        "kd_gain_band_over_teacher_gain": band_ratio_bootstrap(gain, teacher),
    }


# --------------------------------------------------------------------------- MFH: Algorithm 1 (Table 2)

Algorithm1 = Callable[..., tuple[np.ndarray, np.ndarray]]


def mfh_algorithm1_sweep(cfg: Mapping[str, Any], key: str = "experiments.mfh_alg1",
                         algorithm1: Algorithm1 | None = None) -> dict[str, Any]:
    """MFH Table 2: at every sweep point, the regular teacher and KD student, Algorithm 1's
    channel choice (as many channels as there are truly modality-general ones, as MFH does),
    the fraction of true modality-general channels it recovers, the modality-general (MG)
    teacher trained on the chosen channels only (the others removed, as MFH does), and the
    MG-KD student.

    Algorithm 1 is `cmkd.methods.mfh.algorithm1`: its step 1 (the jointly trained pair) runs for
    all slices at once (`train_pair_slices`), then the method ranks each slice's channels on
    that slice's pair (train_pair=False).
    """
    if algorithm1 is None:
        from cmkd.methods.mfh import algorithm1
    seeds = _check_common(cfg, key)
    generator, settings, points = _mfh_points(cfg, key)
    num_classes = int(generator["n_classes"])
    alg_cfg = dict(cfg.get("algorithm1") or {})
    pair_keys = {"pair_epochs", "pair_lr", "distance"}
    unknown = sorted(set(alg_cfg) - pair_keys - {"n_repeats"})
    if unknown:
        raise ConfigError(f"{key}.algorithm1.{unknown[0]}", f"unknown; known: {sorted(pair_keys | {'n_repeats'})}")
    for setting, point in zip(settings, points):
        if point["n_general"] == 0:
            raise ConfigError(f"{key}.sweep",
                              f"point {setting} has no modality-general channel for Algorithm 1 to find")
    splits, slice_seeds = _generate("mfh", generator, settings, seeds, cfg["split"])
    acc, _ = teacher_student_kd(splits, cfg["nets"], cfg["kd"], num_classes, slice_seeds, key)
    train = splits["train"]
    pair_t, pair_s = train_pair_slices(cfg["nets"], train, slice_seeds, num_classes, key=key,
                                       **{k: alg_cfg[k] for k in pair_keys if k in alg_cfg})
    n_seeds = len(seeds)
    recovered = np.zeros(len(slice_seeds))
    mg_teacher_acc, mgkd_acc = np.zeros(len(slice_seeds)), np.zeros(len(slice_seeds))
    for p, (setting, point) in enumerate(zip(settings, points)):
        k = point["n_general"]
        rows = range(p * n_seeds, (p + 1) * n_seeds)
        chosen = []
        for i in rows:
            seed = slice_seeds[i]
            x_t, x_s, y = train.slice(i)
            channels, _ = algorithm1(pair_t.unstack(i), pair_s.unstack(i), x_t, x_s, y, k, train_pair=False,
                                     n_repeats=int(alg_cfg.get("n_repeats", 10)),
                                     distance=alg_cfg.get("distance", "mse"),
                                     generator=torch.Generator().manual_seed(seed))
            channels = np.asarray(channels, dtype=np.int64)
            truth = np.flatnonzero(_layout({**generator, **setting}, seed).teacher_general_mask)
            recovered[i] = len(np.intersect1d(channels, truth)) / k
            chosen.append(channels)
        channels = torch.from_numpy(np.stack(chosen))
        point_splits = {name: Slices(*(t[:, rows.start:rows.stop] for t in (split.teacher,
                                                                            split.student, split.target)))
                        for name, split in splits.items()}
        mg = {name: split.with_teacher_channels(channels) for name, split in point_splits.items()}
        mg_acc, _ = teacher_student_kd(mg, cfg["nets"], cfg["kd"], num_classes, slice_seeds[rows.start:rows.stop], key,
                                       with_nokd=False)
        mg_teacher_acc[rows.start:rows.stop] = mg_acc["teacher_acc"]
        mgkd_acc[rows.start:rows.stop] = mg_acc["kd_acc"]
    acc.update(recovered_fraction=recovered, mg_teacher_acc=mg_teacher_acc, mgkd_acc=mgkd_acc,
               mgkd_minus_kd=mgkd_acc - acc["kd_acc"])
    result = _aggregate(points, acc, n_seeds)
    result["seeds"] = seeds
    return result


def derive_mfh_alg1(result: Mapping[str, Any]) -> dict[str, Any]:
    s = result["series"]
    every_run = [v for p in result["points"] for v in p["recovered_fraction"]["values"]]
    return {
        "recovered_fraction_mean": float(np.mean(every_run)),
        "recovered_fraction_worst_point": min(s["recovered_fraction"]),
        "teacher_drop": [a - b for a, b in zip(s["teacher_acc"], s["mg_teacher_acc"])],
    }


# --------------------------------------------------------------------------- NTDH gap sweep

def ntdh_gap_sweep(cfg: Mapping[str, Any], key: str = "experiments.ntdh_gap") -> dict[str, Any]:
    """NTDH Fig. 3: at every gamma, teacher / no-KD / KD accuracy, the KD gain, the teacher-KD
    student target and non-target divergences on the test split (and teacher-no-KD student's),
    and KD with each NTDH mask (cfg `masks`: name -> run config, trained like the KD student)."""
    seeds = _check_common(cfg, key)
    generator = dict(cfg["generator"])
    name = generator.pop("name", "ntdh")
    settings = sweep_points(cfg["sweep"], f"{key}.sweep")
    num_classes = int(generator["n_classes"])
    splits, slice_seeds = _generate(name, generator, settings, seeds, cfg["split"])
    acc, out = teacher_student_kd(splits, cfg["nets"], cfg["kd"], num_classes, slice_seeds, key)
    test, temperature = splits["test"], float(cfg.get("divergence_temperature", 1.0))
    form = cfg.get("divergence_form", "ntdh")
    if form not in DIVERGENCE_FORMS:
        raise ConfigError(f"{key}.divergence_form", f"must be one of {list(DIVERGENCE_FORMS)}, got {form!r}")
    z = out["test_logits"]
    acc.update(slice_divergences(z["teacher"], z["kd"], test.target, temperature, form))
    acc.update({f"{k}_nokd": v for k, v in slice_divergences(z["teacher"], z["nokd"], test.target,
                                                             temperature, form).items()})
    result = _aggregate([dict(s) for s in settings], acc, len(seeds))
    result["seeds"] = seeds
    result["divergence_form"] = form

    # The masks at the largest `mask_points` gammas, on `mask_seeds` seeds (their own count:
    # the masks' spread sets it), against KD trained on the same slices.
    masks = dict(cfg.get("masks") or {})
    n_mask_points = int(cfg.get("mask_points", 2))
    if not 1 <= n_mask_points <= len(settings):
        raise ConfigError(f"{key}.mask_points", f"must be in [1, {len(settings)}], got {n_mask_points}")
    mask_seeds = cfg.get("mask_seeds", seeds)
    if isinstance(mask_seeds, int) and mask_seeds > 0:
        mask_seeds = list(range(mask_seeds))
    if not isinstance(mask_seeds, list) or not mask_seeds or not all(isinstance(x, int) for x in mask_seeds):
        raise ConfigError(f"{key}.mask_seeds", "must be a positive count or a non-empty list of integers")
    mask_settings = settings[len(settings) - n_mask_points:]
    m_splits, m_seeds = _generate(name, generator, mask_settings, mask_seeds, cfg["split"])
    m_acc, m_out = teacher_student_kd(m_splits, cfg["nets"], cfg["kd"], num_classes, m_seeds, key, with_nokd=False)
    mask_acc = {"kd_acc": m_acc["kd_acc"]}
    m_test = m_splits["test"]
    mechanisms: dict[str, Any] = {}
    for mask_name, mask_run in masks.items():
        student, feature, mechanism = fit_mask_slices(mask_run, cfg["nets"], m_out["cached"], m_seeds, num_classes,
                                                      m_out["teacher"], key=f"{key}.masks.{mask_name}")
        if mechanism is not None:
            mechanisms[mask_name] = mechanism
        with torch.no_grad():
            mask_acc[f"{mask_name}_acc"] = slice_accuracy(student(m_test.student), m_test.target).numpy()
            if feature is not None:  # how good the teacher KD distils from is: retrained on the kept channels
                new_teacher, channels = feature
                kept = m_test.with_teacher_channels(channels)
                mask_acc[f"{mask_name}_teacher_acc"] = slice_accuracy(new_teacher(kept.teacher), kept.target).numpy()
                mask_acc["teacher_acc"] = m_acc["teacher_acc"]
        mask_acc[f"{mask_name}_minus_kd"] = mask_acc[f"{mask_name}_acc"] - m_acc["kd_acc"]
    mask_points = _aggregate([dict(s) for s in mask_settings], mask_acc, len(mask_seeds))
    mask_points["seeds"] = mask_seeds
    result["masks"] = {"names": sorted(masks), **mask_points, "mechanism": mechanisms}
    return result


def derive_ntdh_gap(result: Mapping[str, Any]) -> dict[str, Any]:
    """Each divergence's growth from the first to the last gamma (in divergence per unit of
    gamma when the sweep has `gamma`), per seed (summaries with values, paired by seed), and
    KD with and without the masks at the largest gaps (means)."""
    span = 1.0
    if "gamma" in result["points"][0]:
        span = float(result["points"][-1]["gamma"]) - float(result["points"][0]["gamma"]) or 1.0
    masks = result.get("masks") or {}
    growth = {}
    for name in ("target_div", "non_target_div"):
        v = _point_values(result, name)
        growth[f"{name}_growth"] = summarize((v[-1] - v[0]) / span)
    return {**growth, "large_gap": dict(masks.get("series", {}))}


# --------------------------------------------------------------------------- digits -> digits-M with noise

def digits_arrays(cfg: Mapping[str, Any], noise_std: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                dict[str, np.ndarray]]:
    """Gray digits [N, 1, S, S] and digits-M [N, 3, S, S] at one noise level, standardised with
    training statistics as `cmkd.data.datasets.digits.prepare` builds them, but in memory; plus labels
    and the stratified split."""
    from cmkd.data.datasets.digits import gray_digits, make_digits_m, random_patches
    from cmkd.data.splits import stratified_split

    rng = np.random.default_rng(seed)
    size = int(cfg.get("image_size", 16))
    gray, labels = gray_digits(size)
    colour = make_digits_m(gray, random_patches(len(gray), size, rng), float(cfg.get("blend", 0.5)))
    if noise_std:
        gray = gray + rng.normal(0, noise_std, gray.shape).astype(np.float32)
        colour = colour + rng.normal(0, noise_std, colour.shape).astype(np.float32)
    split = stratified_split(labels, cfg.get("split", [0.6, 0.2, 0.2]), seed)
    tr = split["train"]
    gray = (gray - gray[tr].mean()) / gray[tr].std()
    colour = (colour - colour[tr].mean(axis=(0, 2, 3), keepdims=True)) / colour[tr].std(axis=(0, 2, 3), keepdims=True)
    return gray.astype(np.float32), colour.astype(np.float32), labels, split


def digits_noise_sweep(cfg: Mapping[str, Any], key: str = "experiments.digits_noise") -> dict[str, Any]:
    """Teacher (gray digits), no-KD and KD student (digits-M) accuracy and the teacher-KD
    student divergences at every noise level (networks: MLPs on the flattened images)."""
    seeds = _check_common(cfg, key)
    levels = cfg.get("noise_std")
    if not isinstance(levels, list) or not levels or any(not isinstance(x, (int, float)) or x < 0 for x in levels):
        raise ConfigError(f"{key}.noise_std", "must be a non-empty list of numbers >= 0")
    data_cfg = dict(cfg.get("data") or {})
    datasets, indices, slice_seeds = [], [], []
    for noise in levels:
        for seed in seeds:
            gray, colour, labels, split = digits_arrays(data_cfg, float(noise), seed)
            datasets.append((gray.reshape(len(gray), -1), colour.reshape(len(colour), -1), labels))
            indices.append({"train": split["train"], "test": split["test"]})
            slice_seeds.append(seed)
    splits = stack(datasets, indices)
    acc, out = teacher_student_kd(splits, cfg["nets"], cfg["kd"], 10, slice_seeds, key)
    z = out["test_logits"]
    form = cfg.get("divergence_form", "ntdh")
    if form not in DIVERGENCE_FORMS:
        raise ConfigError(f"{key}.divergence_form", f"must be one of {list(DIVERGENCE_FORMS)}, got {form!r}")
    acc.update(slice_divergences(z["teacher"], z["kd"], splits["test"].target,
                                 float(cfg.get("divergence_temperature", 1.0)), form))
    result = _aggregate([{"noise_std": float(x)} for x in levels], acc, len(seeds))
    result["seeds"] = seeds
    result["divergence_form"] = form
    return result


# --------------------------------------------------------------------------- the experiment registry

@dataclass(frozen=True)
class Experiment:
    """One synthetic experiment: how to run it, what the claims read, and what to plot."""

    run: Callable[..., dict[str, Any]]
    derive: Callable[[Mapping[str, Any]], dict[str, Any]] | None
    x: str  # the series plotted on the x axis
    x_label: str
    title: str
    #: (panel title, y label, [(series key, legend label)], draw y = 0)
    panels: tuple[tuple[str, str, tuple[tuple[str, str], ...], bool], ...]


_ACC = ("teacher_acc", "teacher"), ("nokd_acc", "student, no KD"), ("kd_acc", "student, KD")

EXPERIMENTS: dict[str, Experiment] = {
    "mfh_gamma": Experiment(
        mfh_sweep, derive_mfh_gamma, "general_share", "modality-general share of teacher's decisive features",
        "MFH Fig. 2: KD vs. modality-general share",
        (("test accuracy", "accuracy", _ACC, False),
         ("KD gain over no-KD", "accuracy difference", (("kd_gain", "KD - no KD"),), True)),
    ),
    "mfh_alpha": Experiment(
        mfh_sweep, derive_mfh_alpha, "teacher_specific_share", "alpha (modality-specific share, teacher)",
        "MFH Fig. 3: a better teacher, not a better student",
        (("test accuracy", "accuracy", _ACC, False),
         ("KD gain over no-KD", "accuracy difference", (("kd_gain", "KD - no KD"),), True)),
    ),
    "mfh_alg1": Experiment(
        mfh_algorithm1_sweep, derive_mfh_alg1, "general_share", "modality-general share (teacher)",
        "MFH Table 2: Algorithm 1 and MG-KD",
        (("teachers", "accuracy",
          (("teacher_acc", "regular teacher"), ("mg_teacher_acc", "modality-general teacher")), False),
         ("students", "accuracy", (("nokd_acc", "no KD"), ("kd_acc", "KD"), ("mgkd_acc", "MG-KD")), False),
         ("Algorithm 1", "fraction", (("recovered_fraction", "true MG channels recovered"),), False)),
    ),
    "ntdh_gap": Experiment(
        ntdh_gap_sweep, derive_ntdh_gap, "gamma", "gamma (domain gap)", "NTDH Fig. 3: KD and divergences vs. the gap",
        (("test accuracy", "accuracy", _ACC, False),
         ("KD gain over no-KD", "accuracy difference", (("kd_gain", "KD - no KD"),), True),
         ("teacher vs. KD student", "divergence (divergence_form)",
          (("target_div", "target"), ("non_target_div", "non-target")), False)),
    ),
    "digits_noise": Experiment(
        digits_noise_sweep, None, "noise_std", "noise std (both modalities)",
                               "digits -> digits-M with noise (NTDH's MNIST / MNIST-M test)",
        (("test accuracy", "accuracy", _ACC, False),
         ("KD gain over no-KD", "accuracy difference", (("kd_gain", "KD - no KD"),), True),
         ("teacher vs. KD student", "divergence (divergence_form)",
          (("target_div", "target"), ("non_target_div", "non-target")), False)),
    ),
}


def run_experiment(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run experiment `name` with its params entry; the result carries its config and `derived`."""
    if name not in EXPERIMENTS:
        raise ConfigError("experiments", f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    spec = EXPERIMENTS[name]
    result = spec.run(cfg, key=f"experiments.{name}")
    result["derived"] = spec.derive(result) if spec.derive else {}
    result["experiment"] = name
    result["config"] = jsonable(cfg)
    return result


def plot_rows(name: str, result: Mapping[str, Any]) -> list[dict[str, float]]:
    """One row per sweep point (sorted by the x axis) with every plotted series' mean: the
    data of the `dvc plots` definitions."""
    spec = EXPERIMENTS[name]
    series = result["series"]
    keys = [k for _, _, lines, _ in spec.panels for k, _ in lines if k in series]
    rows = [{spec.x: series[spec.x][i], **{k: series[k][i] for k in keys}} for i in range(len(series[spec.x]))]
    return sorted(rows, key=lambda r: r[spec.x])
