"""The NTDH masking framework (Chen et al., "Non-target Divergence Hypothesis") as a plug-in
around any logit KD method (kd, dkd, mlkd, ctkd).

NTDH: cross-modal KD works as far as teacher and student agree on the non-target classes, so
the masks remove what carries a large non-target divergence. NTDH's own definitions (its public
code) are the defaults; our earlier rule stays as a named variant:

* `mode: sample` - NTDH's sample mask (PSSM, `pd_diff` in its code; `cmkd.losses.pssm_weights`):
  a sample (pixel) weighs 1 where the teacher is right, (1 + cos(z_t, z_s)) / 2 where it is
  wrong but the cosine of the two logit rows is >= `cos_threshold` (0.996), else 0. As in NTDH's
  code (its DKD, SemanticKITTI trainer) the weights multiply the per-sample KD terms and the sum
  is divided by the number of valid rows (not by the weights' sum); CE is never masked. The
  weights are computed on the logits the KD terms see (detached; with `lskd` the z-scored ones).
* `mode: feature` - NTDH's feature mask: MFH's Algorithm 1 (`cmkd.methods.mfh`, the one
  implementation MG-KD uses too) with NTDH's non-target divergence as its distance
  (`divergence_form: ntdh`; `js` for textbook JS) on a freshly trained teacher/student pair; the
  wrapped method distils from the masked teacher. Call `prepare(...)` before training (the
  pipeline does); the pipeline's pre-trained teacher only gives the architecture. The defaults
  (`auto`) follow NTDH's code for each kind of data:
    - vectors (its sklearn `main.py`, mode `alg1`): the teacher's input features are tagged by
      permutation (`saliency: permute`), the `mask_dim` (2) most salient are kept, and a fresh
      teacher is trained on them alone (`retrain: true`);
    - images (its MNIST `main.py`): the channels of the pair teacher's features are tagged by
      setting each to zero (`saliency: zero`), 25 % are kept (`--ratio 0.75` removed), and the
      pair-trained teacher distils with the others zeroed, not retrained (`retrain: false`).
  A number for `keep_ratio` (a share of the channels) and explicit `saliency` / `retrain` override
  them; run `kdv1_ntdh_feat_retrain` (a variant) keeps half the channels, tagged by permutation,
  with a retrained teacher on both kinds of data.
* `mode: both` - the feature-masked teacher and the PSSM sample mask together.
* `mode: sample_drop` - a variant, not NTDH's: per batch, the KD terms give weight `down_weight`
  (0 = drop) to the `drop_ratio` fraction of valid samples with the largest non-target
  divergence (`divergence_form`, at `divergence_temperature`) and, with `drop_wrong`, to every
  sample the teacher misclassifies; the weighted KD mean is divided by the weights' sum.

The wrapped method is built from `base: {method: ..., its params}` and receives the masks through
its plug-in points (`LogitDistiller.sample_weight_hook` and its teacher module), so its own
loss is unchanged otherwise and its loss names pass through.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cmkd.errors import ConfigError
from cmkd.losses import DIVERGENCE_FORMS, non_target_divergence, pssm_weights
from cmkd.methods import build_distiller, get_method, register
from cmkd.methods.base import Batch, Distiller
from cmkd.methods.logit import LogitDistiller
from cmkd.methods.mfh import (
    ALGORITHM1_DEFAULTS,
    SALIENCY_RULES,
    modality_general_teacher,
    validate_algorithm1_cfg,
)
from cmkd.training.activity import ActivityCounter, MechanismSpec, channel_mask_record

log = logging.getLogger(__name__)

WRAPPABLE_METHODS = ("kd", "dkd", "mlkd", "ctkd")
PSSM_SPEC = MechanismSpec("PSSM sample mask", "reweighted (weight != 1)", "valid training rows",
                          "the wrapped method without PSSM")
SAMPLE_DROP_SPEC = MechanismSpec("sample_drop mask", "reweighted (weight != 1)", "valid training rows",
                                 "the wrapped method without the mask")
FEATURE_MASK_SPEC = MechanismSpec("NTDH feature mask", "removed", "teacher channels",
                                  "the wrapped method from a teacher with all its channels")
MODES = ("sample", "feature", "both", "sample_drop")
#: NTDH's MNIST code removes `--ratio 0.75` of the tagged channels: a quarter stays
IMAGE_KEEP_RATIO = 0.25


def feature_mask_rules(cfg: Mapping[str, Any], vectors: bool, width: int) -> tuple[int, str, bool]:
    """(channels kept, saliency rule, retrain) of the feature mask for `width` channels; `auto`
    entries follow NTDH's code: sklearn's for vector data, MNIST's for images."""
    ratio = cfg["keep_ratio"]
    if ratio == "auto":
        k = int(cfg["mask_dim"]) if vectors else int(round(IMAGE_KEEP_RATIO * width))
    else:
        k = int(round(float(ratio) * width))
    saliency = cfg["saliency"] if cfg["saliency"] != "auto" else ("permute" if vectors else "zero")
    retrain = cfg["retrain"] if cfg["retrain"] != "auto" else vectors
    return max(1, min(k, width)), saliency, bool(retrain)
#: Algorithm 1's distance for each divergence form (`cmkd.methods.mfh.PAIR_DISTANCES`)
FEATURE_DISTANCES = {"ntdh": "ntdh", "js": "non_target_js"}


class PSSMSampleMask:
    """NTDH's PSSM weights as a `LogitDistiller.sample_weight_hook`.

    `normalise_by_weights = False`: NTDH divides the weighted KD sum by the number of valid rows,
    while the methods' masked mean divides by the weights' sum; each call stores
    `last_scale` = sum(weights) / valid rows, by which `NTDHMask` multiplies the KD terms.
    Rows are weighted independently, so a stack of independent batches (the batched
    experiments' slices) needs no per-column treatment.
    """

    normalise_by_weights = False

    def __init__(self, cos_threshold: float = 0.996):
        self.cos_threshold = float(cos_threshold)
        self.last_scale: torch.Tensor | None = None
        #: valid rows PSSM weighs other than 1 (NTDH's mask is inert when that is none)
        self.activity = ActivityCounter(PSSM_SPEC)

    def __call__(self, batch: Batch, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        target = batch["target"]
        weights = pssm_weights(student_logits, teacher_logits, target, self.cos_threshold)
        self.last_scale = weights.sum() / (target >= 0).sum().clamp_min(1)
        self.activity.add(weights != 1, target >= 0)
        return weights

    per_column = __call__


class NonTargetSampleMask:
    """The `sample_drop` variant: per-sample KD weights from the ranking of the non-target
    divergence and teacher correctness (a plain callable, usable as `sample_weight_hook`)."""

    normalise_by_weights = True

    def __init__(self, drop_ratio: float, drop_wrong: bool = True, down_weight: float = 0.0, temperature: float = 1.0,
                 form: str = "js"):
        self.drop_ratio = float(drop_ratio)
        self.drop_wrong = bool(drop_wrong)
        self.down_weight = float(down_weight)
        self.temperature = float(temperature)
        self.form = form
        self.activity = ActivityCounter(SAMPLE_DROP_SPEC)

    def dropped(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Bool mask shaped like `target`: rows the KD terms drop (or down-weight)."""
        valid = target >= 0
        divergence = non_target_divergence(student_logits, teacher_logits, target, self.temperature, form=self.form)
        drop = torch.zeros(target.numel(), dtype=torch.bool, device=target.device)
        n_drop = int(math.floor(self.drop_ratio * int(valid.sum())))
        if n_drop > 0:
            scores = torch.where(valid, divergence, torch.full_like(divergence, -math.inf)).reshape(-1)
            drop[scores.topk(n_drop).indices] = True
        drop = drop.reshape(target.shape)
        if self.drop_wrong:
            drop |= valid & (teacher_logits.argmax(dim=1) != target)
        return drop

    def dropped_per_column(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           target: torch.Tensor) -> torch.Tensor:
        """`dropped` for a target [N, ...] whose every trailing position is a batch of its own
        (the batched experiments' slices): each column's N rows are ranked apart, in one pass."""
        valid = target >= 0
        divergence = non_target_divergence(student_logits, teacher_logits, target, self.temperature, form=self.form)
        n = target.shape[0]
        scores = torch.where(valid, divergence, torch.full_like(divergence, -math.inf)).reshape(n, -1)
        # floor(ratio * valid rows) per column, in float64 as `dropped` computes it
        n_drop = torch.floor(self.drop_ratio * valid.reshape(n, -1).sum(0).to(torch.float64))
        order = scores.argsort(dim=0, descending=True)
        rank = torch.empty_like(order).scatter_(
            0, order, torch.arange(n, device=order.device).unsqueeze(1).expand_as(order))
        drop = (rank < n_drop.unsqueeze(0)).reshape(target.shape)
        if self.drop_wrong:
            drop |= valid & (teacher_logits.argmax(dim=1) != target)
        return drop

    def __call__(self, batch: Batch, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        drop = self.dropped(student_logits, teacher_logits, batch["target"])
        weights = torch.where(drop, self.down_weight, 1.0).to(torch.float32)
        self.activity.add(weights != 1, batch["target"] >= 0)
        return weights

    def per_column(self, batch: Batch, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The weights of `__call__` with every column of the target ranked on its own."""
        drop = self.dropped_per_column(student_logits, teacher_logits, batch["target"])
        return torch.where(drop, self.down_weight, 1.0).to(torch.float32)


@register("ntdh_mask")
class NTDHMask(Distiller):
    defaults = {
        "base": {"method": "kd"},
        "mode": "sample",
        # PSSM (mode sample / both)
        "cos_threshold": 0.996,
        # the non-target divergence of the feature mask's Algorithm 1 and of sample_drop's ranking
        "divergence_form": "ntdh",
        # sample_drop (a variant)
        "drop_ratio": 0.2,
        "drop_wrong": True,
        "down_weight": 0.0,
        "divergence_temperature": 1.0,
        # feature mask (mode feature / both): Algorithm 1, then the masked teacher. auto: NTDH's
        # code per kind of data (vectors: mask_dim channels, permuted, retrained; images: 25 %,
        # zeroed, not retrained)
        "keep_ratio": "auto",
        "mask_dim": 2,
        "saliency": "auto",
        "retrain": "auto",
        **{k: v for k, v in ALGORITHM1_DEFAULTS.items() if k != "k_fraction"},
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
        if merged["divergence_form"] not in DIVERGENCE_FORMS:
            raise ConfigError(f"{key}.divergence_form",
                              f"must be one of {list(DIVERGENCE_FORMS)}, got {merged['divergence_form']!r}")
        if not -1.0 <= float(merged["cos_threshold"]) <= 1.0:
            raise ConfigError(f"{key}.cos_threshold",
                              f"a cosine threshold must lie in [-1, 1], got {merged['cos_threshold']}")
        if not 0.0 <= float(merged["drop_ratio"]) < 1.0:
            raise ConfigError(f"{key}.drop_ratio", f"must lie in [0, 1), got {merged['drop_ratio']}")
        if not 0.0 <= float(merged["down_weight"]) <= 1.0:
            raise ConfigError(f"{key}.down_weight", f"must lie in [0, 1], got {merged['down_weight']}")
        if not float(merged["divergence_temperature"]) > 0:
            raise ConfigError(f"{key}.divergence_temperature", f"must be > 0, got {merged['divergence_temperature']}")
        ratio = merged["keep_ratio"]
        if ratio != "auto" and (isinstance(ratio, (bool, str)) or not 0.0 < float(ratio) <= 1.0):
            raise ConfigError(f"{key}.keep_ratio", f"must be auto or in (0, 1], got {ratio!r}")
        if not isinstance(merged["mask_dim"], int) or isinstance(merged["mask_dim"], bool) or merged["mask_dim"] < 1:
            raise ConfigError(f"{key}.mask_dim", f"must be a positive integer, got {merged['mask_dim']!r}")
        if merged["saliency"] not in ("auto",) + SALIENCY_RULES:
            raise ConfigError(f"{key}.saliency",
                              f"must be auto or one of {list(SALIENCY_RULES)}, got {merged['saliency']!r}")
        if merged["retrain"] not in ("auto", True, False):
            raise ConfigError(f"{key}.retrain", f"must be auto, true or false, got {merged['retrain']!r}")
        validate_algorithm1_cfg({**merged, "keep_ratio": 0.5}, key, fraction_key="keep_ratio")

    @classmethod
    def cfg_uses_teacher_logits_only(cls, cfg: Mapping[str, Any]) -> bool:
        """Whether cached teacher logits serve a run with this config (not with a feature mask)."""
        return {**cls.defaults, **cfg}["mode"] in ("sample", "sample_drop")

    def __init__(self, student, teacher, cfg, num_classes):
        super().__init__(student, teacher, cfg, num_classes)
        mode = self.cfg["mode"]
        self.uses_feature_mask = mode in ("feature", "both")
        # The feature mask's teacher is retrained by prepare(): the pipeline's pre-trained teacher
        # only gives its architecture, and cached (full-teacher) logits are not valid.
        self.needs_teacher = not self.uses_feature_mask
        self.uses_teacher_logits_only = not self.uses_feature_mask
        self.prepared = not self.uses_feature_mask
        #: set by prepare(): {"level", "distance", "channels", "saliency", "teacher_val", "retrained", "saliency_rule"}
        self.selection: dict[str, Any] = {}
        inner = build_distiller(self.cfg["base"], student, teacher, num_classes, key="ntdh_mask.base")
        if not isinstance(inner, LogitDistiller):
            raise ConfigError("ntdh_mask.base.method", f"{type(inner).__name__} is not a logit KD method")
        if mode in ("sample", "both"):
            inner.sample_weight_hook = PSSMSampleMask(self.cfg["cos_threshold"])
        elif mode == "sample_drop":
            inner.sample_weight_hook = NonTargetSampleMask(self.cfg["drop_ratio"], self.cfg["drop_wrong"],
                                                           self.cfg["down_weight"],
                                                           self.cfg["divergence_temperature"],
                                                           self.cfg["divergence_form"])
        self.inner = inner

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self.inner.on_epoch_start(epoch, total_epochs)

    def activity_counters(self):
        hook = self.inner.sample_weight_hook
        return {"sample_mask": hook.activity} if hook is not None else {}

    def mechanism_parts(self, activity):
        parts = super().mechanism_parts(activity)
        if self.uses_feature_mask:
            channels = channel_mask_record(FEATURE_MASK_SPEC, self.teacher)
            parts = ([channels] if channels is not None else []) + parts
        return parts

    def set_teacher(self, masked_teacher: nn.Module) -> None:
        """Distil from `masked_teacher` (the feature-masked, retrained teacher; frozen from here on)."""
        masked_teacher.requires_grad_(False)
        masked_teacher.eval()
        self.teacher = masked_teacher
        self.inner.teacher = masked_teacher
        self.prepared = True

    def prepare(
        self, train: Any, val: Any, train_cfg: Any, *, task: str, num_classes: int, ignore_index: int | None = -1,
        checkpoint_dir: Any = None, progress: bool = False,
    ) -> dict[str, Any] | None:
        """Feature mask: Algorithm 1 with NTDH's distance on (up to `saliency_samples` rows of)
        `train`, then the masked teacher (`feature_mask_rules`: retrained with `train_cfg`, the
        teacher's engine TrainConfig, or the pair's teacher as it is); returns the selection.
        Nothing to do for the sample masks (None)."""
        if not self.uses_feature_mask:
            return None
        if self.teacher is None:
            raise ConfigError("runs", "the NTDH feature mask needs the teacher architecture (a teacher-modality "
                                      "network)")
        device = next(self.teacher.parameters()).device
        probe = next(iter(train.batches(2, shuffle=False, seed=0)))["teacher_input"].to(device)
        vectors = probe.dim() == 2
        level = self.cfg["level"] if self.cfg["level"] != "auto" else ("input" if vectors else "feature")
        with torch.no_grad():
            was = self.teacher.training
            width = probe.shape[1] if level == "input" else self.teacher.eval().features(probe).shape[1]
            self.teacher.train(was)
        k, saliency, retrain = feature_mask_rules(self.cfg, vectors, width)
        masked, self.selection = modality_general_teacher(
            self.teacher, self.student, train, val, train_cfg, self.cfg,
            distance=FEATURE_DISTANCES[self.cfg["divergence_form"]], task=task, num_classes=num_classes,
            ignore_index=ignore_index, checkpoint_dir=checkpoint_dir, progress=progress,
            name="ntdh feature mask", k=k, saliency_rule=saliency, retrain=retrain)
        self.selection["saliency_rule"] = saliency
        self.set_teacher(masked)
        return self.selection

    def forward(self, batch):
        if not self.prepared:
            raise RuntimeError("ntdh_mask: the feature mask needs prepare(...) (or set_teacher) before training")
        if self.uses_feature_mask:
            batch = {k: v for k, v in batch.items() if k != "teacher_logits"}
        losses = self.inner(batch)
        hook = self.inner.sample_weight_hook
        if hook is not None and not hook.normalise_by_weights:
            # NTDH's normalisation: sum(w * KD) / valid rows = (the weighted mean) * sum(w) / rows
            scale = hook.last_scale.detach()
            losses = {name: (loss if name == "ce" else loss * scale) for name, loss in losses.items()}
        return losses
