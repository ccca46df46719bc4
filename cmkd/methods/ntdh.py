"""The NTDH masking framework (Chen et al., "Non-target Divergence Hypothesis") as a plug-in
around any logit KD method (kd, dkd, mlkd, ctkd).

NTDH: cross-modal KD works as far as teacher and student agree on the non-target classes, so
the masks remove what carries a large non-target divergence:

* sample mask (`mode: sample`): per batch, the KD terms give weight `down_weight` (0 = drop)
  to the `drop_ratio` fraction of valid samples (pixels) with the largest non-target divergence
  (JS between the teacher's and the student's softmax over non-target classes, at
  `divergence_temperature`, on the logits the KD terms see, detached) and, with `drop_wrong`,
  to every sample the teacher misclassifies. CE is never masked.
* feature mask (`mode: feature`): once, at the start of training, each teacher feature channel
  (the output of `teacher.features`, the input of `teacher.head`) gets a permutation saliency:
  how much the teacher's CE rises when that channel is permuted across samples. The
  `keep_ratio` most salient channels are kept and the others zeroed before the head whenever the
  teacher produces the logits used for KD. Needs the real teacher, so cached logits are not used.
* `mode: both`: the feature-masked teacher and the sample mask together.

The wrapped method is built from `base: {method: ..., its params}` and receives the masks through
its plug-in points (`LogitDistiller.sample_weight_hook` and its teacher module), so its own
loss is unchanged otherwise and its loss names pass through.

Where the feature mask is estimated: `on_train_start(train)` (the engine calls it before the
first epoch) on at most `saliency_samples` shuffled rows of the training split, in batches of
`saliency_batch_size` (the permutation is within a batch; keep it no larger than a training batch
for big inputs), with `saliency_seed`. If training starts without it, the first training batch
is used and a warning is logged.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import ConfigError
from cmkd.losses import non_target_divergence
from cmkd.methods import build_distiller, get_method, register
from cmkd.methods.base import Batch, Distiller
from cmkd.methods.logit import LogitDistiller

log = logging.getLogger(__name__)

WRAPPABLE_METHODS = ("kd", "dkd", "mlkd", "ctkd")
MODES = ("sample", "feature", "both")


class NonTargetSampleMask:
    """Per-sample KD weights from non-target divergence and teacher correctness (a plain callable,
    usable as `LogitDistiller.sample_weight_hook`)."""

    def __init__(self, drop_ratio: float, drop_wrong: bool = True, down_weight: float = 0.0, temperature: float = 1.0):
        self.drop_ratio = float(drop_ratio)
        self.drop_wrong = bool(drop_wrong)
        self.down_weight = float(down_weight)
        self.temperature = float(temperature)

    def dropped(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Bool mask shaped like `target`: rows the KD terms drop (or down-weight)."""
        valid = target >= 0
        divergence = non_target_divergence(student_logits, teacher_logits, target, self.temperature)
        drop = torch.zeros(target.numel(), dtype=torch.bool, device=target.device)
        n_drop = int(math.floor(self.drop_ratio * int(valid.sum())))
        if n_drop > 0:
            scores = torch.where(valid, divergence, torch.full_like(divergence, -math.inf)).reshape(-1)
            drop[scores.topk(n_drop).indices] = True
        drop = drop.reshape(target.shape)
        if self.drop_wrong:
            drop |= valid & (teacher_logits.argmax(dim=1) != target)
        return drop

    def dropped_per_column(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`dropped` for a target [N, ...] whose every trailing position is a batch of its own
        (the batched experiments' slices): each column's N rows are ranked apart, in one pass."""
        valid = target >= 0
        divergence = non_target_divergence(student_logits, teacher_logits, target, self.temperature)
        n = target.shape[0]
        scores = torch.where(valid, divergence, torch.full_like(divergence, -math.inf)).reshape(n, -1)
        # floor(ratio * valid rows) per column, in float64 as `dropped` computes it
        n_drop = torch.floor(self.drop_ratio * valid.reshape(n, -1).sum(0).to(torch.float64))
        order = scores.argsort(dim=0, descending=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device).unsqueeze(1).expand_as(order))
        drop = (rank < n_drop.unsqueeze(0)).reshape(target.shape)
        if self.drop_wrong:
            drop |= valid & (teacher_logits.argmax(dim=1) != target)
        return drop

    def __call__(self, batch: Batch, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        drop = self.dropped(student_logits, teacher_logits, batch["target"])
        return torch.where(drop, self.down_weight, 1.0).to(torch.float32)

    def per_column(self, batch: Batch, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The weights of `__call__` with every column of the target ranked on its own."""
        drop = self.dropped_per_column(student_logits, teacher_logits, batch["target"])
        return torch.where(drop, self.down_weight, 1.0).to(torch.float32)


@torch.no_grad()
def permutation_saliency_batches(teacher: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                                 generator: torch.Generator | None = None, max_elements: int = 1 << 24) -> torch.Tensor:
    """Per-channel permutation saliency of `teacher.features` for `teacher.head`: the mean rise
    of the teacher's CE (per valid sample / pixel) when one channel is permuted across samples.

    `batches` yields (teacher_input, target) pairs; memory is bounded by one batch. Within each
    batch one random cyclic permutation (no fixed points) moves every sample's channel value to
    another sample. Channels go through the head in chunks: [k, B, F, ...] feature copies, each
    with one channel permuted, at once (no per-sample loops; k * B * F * H * W <= max_elements
    unless a single channel needs more). Returns a float tensor [F] on the CPU.
    """
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    rise: torch.Tensor | None = None
    rows = 0
    for x, y in batches:
        x = torch.as_tensor(x).to(device)
        y = torch.as_tensor(y).to(device).long()
        n = x.shape[0]
        valid = (y >= 0).reshape(n, -1).float()
        if n < 2 or valid.sum() == 0:
            continue
        feats = teacher.features(x)
        n_channels = feats.shape[1]
        if rise is None:
            rise = torch.zeros(n_channels, dtype=torch.float64, device=device)
        order = torch.randperm(n, generator=generator).to(device)
        perm = torch.empty_like(order)
        perm[order] = order.roll(-1)  # sample order[i] takes the values of order[i+1]: a single cycle
        shuffled = feats[perm]
        base_ce = F.cross_entropy(teacher.head(feats), y.clamp_min(0), reduction="none").reshape(n, -1)
        base_total = (base_ce * valid).sum().double()
        chunk = max(1, min(n_channels, max_elements // max(1, feats.numel())))
        spatial = [1] * (feats.dim() - 2)
        y_rep = y.clamp_min(0)
        for c0 in range(0, n_channels, chunk):
            k = min(chunk, n_channels - c0)
            one_channel = F.one_hot(torch.arange(c0, c0 + k, device=device), n_channels).bool().view(k, 1, n_channels, *spatial)
            permuted = torch.where(one_channel, shuffled.unsqueeze(0), feats.unsqueeze(0)).reshape(k * n, *feats.shape[1:])
            logits = teacher.head(permuted)
            ce = F.cross_entropy(logits, y_rep.repeat(k, *[1] * (y.dim() - 1)), reduction="none").reshape(k, n, -1)
            rise[c0:c0 + k] += (ce * valid.unsqueeze(0)).sum(dim=(1, 2)).double() - base_total
        rows += int(valid.sum())
    teacher.train(was_training)
    if rise is None:
        raise ValueError("permutation saliency needs a batch of at least 2 samples with valid targets")
    return (rise / rows).float().cpu()


def permutation_saliency(teacher: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, batch_size: int = 256,
                         generator: torch.Generator | None = None, max_elements: int = 1 << 24) -> torch.Tensor:
    """`permutation_saliency_batches` over in-memory rows, `batch_size` at a time."""
    batches = ((inputs[i:i + batch_size], target[i:i + batch_size]) for i in range(0, len(inputs), batch_size))
    return permutation_saliency_batches(teacher, batches, generator=generator, max_elements=max_elements)


def top_fraction_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Float 0/1 mask keeping the round(keep_ratio * n) highest scores (at least one)."""
    k = max(1, int(round(keep_ratio * scores.numel())))
    mask = torch.zeros_like(scores, dtype=torch.float32)
    mask[scores.topk(k).indices] = 1.0
    return mask


class MaskedTeacher(nn.Module):
    """The teacher with some feature channels zeroed before its head."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        n_channels = getattr(teacher, "feature_dim", None)
        if n_channels is None:
            head_in = getattr(getattr(teacher, "head", None), "in_features", None) or getattr(getattr(teacher, "head", None), "in_channels", None)
            n_channels = head_in
        if n_channels is None:
            raise ValueError(f"{type(teacher).__name__} exposes neither `feature_dim` nor a head with in_features/in_channels; the NTDH feature mask needs one")
        self.teacher = teacher
        self.register_buffer("channel_mask", torch.ones(int(n_channels)))
        self.register_buffer("saliency", torch.zeros(int(n_channels)))
        self.register_buffer("fitted", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.teacher.features(x)
        mask = self.channel_mask.view(1, -1, *[1] * (feats.dim() - 2)).to(feats.dtype)
        return self.teacher.head(feats * mask)


@register("ntdh_mask")
class NTDHMask(Distiller):
    defaults = {
        "base": {"method": "kd"},
        "mode": "sample",
        "drop_ratio": 0.2,
        "drop_wrong": True,
        "down_weight": 0.0,
        "divergence_temperature": 1.0,
        "keep_ratio": 0.5,
        "saliency_samples": 2048,
        "saliency_batch_size": 64,
        "saliency_seed": 0,
    }

    @classmethod
    def validate(cls, cfg: Mapping[str, Any], key: str) -> None:
        super().validate(cfg, key)
        merged = {**cls.defaults, **cfg}
        base = merged["base"]
        if not isinstance(base, Mapping) or base.get("method") not in WRAPPABLE_METHODS:
            raise ConfigError(f"{key}.base.method", f"must be one of {list(WRAPPABLE_METHODS)}, got {base!r}")
        base_cfg = dict(base)
        get_method(base_cfg.pop("method"), f"{key}.base.method").validate(base_cfg, f"{key}.base")
        if merged["mode"] not in MODES:
            raise ConfigError(f"{key}.mode", f"must be one of {list(MODES)}, got {merged['mode']!r}")
        if not 0.0 <= float(merged["drop_ratio"]) < 1.0:
            raise ConfigError(f"{key}.drop_ratio", f"must lie in [0, 1), got {merged['drop_ratio']}")
        if not 0.0 <= float(merged["down_weight"]) <= 1.0:
            raise ConfigError(f"{key}.down_weight", f"must lie in [0, 1], got {merged['down_weight']}")
        if not 0.0 < float(merged["keep_ratio"]) <= 1.0:
            raise ConfigError(f"{key}.keep_ratio", f"must lie in (0, 1], got {merged['keep_ratio']}")
        if not float(merged["divergence_temperature"]) > 0:
            raise ConfigError(f"{key}.divergence_temperature", f"must be > 0, got {merged['divergence_temperature']}")
        for name in ("saliency_samples", "saliency_batch_size"):
            if not int(merged[name]) >= 2:
                raise ConfigError(f"{key}.{name}", f"must be >= 2, got {merged[name]}")

    @classmethod
    def cfg_uses_teacher_logits_only(cls, cfg: Mapping[str, Any]) -> bool:
        """Whether cached teacher logits serve a run with this config (not with a feature mask)."""
        return {**cls.defaults, **cfg}["mode"] == "sample"

    def __init__(self, student, teacher, cfg, num_classes):
        super().__init__(student, teacher, cfg, num_classes)
        mode = self.cfg["mode"]
        self.uses_feature_mask = mode in ("feature", "both")
        # The feature mask changes the teacher's logits, so cached (unmasked) ones are not valid.
        self.uses_teacher_logits_only = not self.uses_feature_mask
        self.masked_teacher = MaskedTeacher(teacher) if self.uses_feature_mask else None
        inner_teacher = self.masked_teacher if self.masked_teacher is not None else teacher
        inner = build_distiller(self.cfg["base"], student, inner_teacher, num_classes, key="ntdh_mask.base")
        if not isinstance(inner, LogitDistiller):
            raise ConfigError("ntdh_mask.base.method", f"{type(inner).__name__} is not a logit KD method")
        if mode in ("sample", "both"):
            inner.sample_weight_hook = NonTargetSampleMask(
                self.cfg["drop_ratio"], self.cfg["drop_wrong"], self.cfg["down_weight"], self.cfg["divergence_temperature"])
        self.inner = inner

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self.inner.on_epoch_start(epoch, total_epochs)

    def fit_feature_mask(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Estimate the channel saliency on (teacher_input, target) batches and set the mask;
        returns the saliency."""
        assert self.masked_teacher is not None
        generator = torch.Generator().manual_seed(int(self.cfg["saliency_seed"]))
        saliency = permutation_saliency_batches(self.teacher, batches, generator=generator)
        mt = self.masked_teacher
        mt.saliency.copy_(saliency)
        mt.channel_mask.copy_(top_fraction_mask(saliency, float(self.cfg["keep_ratio"])))
        mt.fitted.fill_(True)
        log.info("NTDH feature mask: kept %d of %d teacher channels", int(mt.channel_mask.sum()), mt.channel_mask.numel())
        return saliency

    def _first_rows(self, train) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(teacher_input, target) batches of the shuffled split, `saliency_samples` rows in all."""
        left = int(self.cfg["saliency_samples"])
        for batch in train.batches(int(self.cfg["saliency_batch_size"]), shuffle=True, seed=int(self.cfg["saliency_seed"])):
            yield batch["teacher_input"][:left], batch["target"][:left]
            left -= len(batch["target"])
            if left <= 0:
                return

    def on_train_start(self, train) -> None:
        """Estimate the feature mask from the training split (a `cmkd.engine.SplitData`, or
        anything with `batches(batch_size, shuffle, seed)` yielding dicts of tensors). Every call
        with the same split and seed gives the same mask (so every DDP rank agrees); a mask
        restored from a checkpoint is kept."""
        if self.masked_teacher is None or bool(self.masked_teacher.fitted):
            return
        self.fit_feature_mask(self._first_rows(train))

    def forward(self, batch):
        if self.masked_teacher is not None:
            if not bool(self.masked_teacher.fitted):
                log.warning("NTDH feature mask estimated on the first batch: on_train_start(train) was not called")
                self.fit_feature_mask([(batch["teacher_input"], batch["target"])])
            batch = {k: v for k, v in batch.items() if k != "teacher_logits"}
        return self.inner(batch)
