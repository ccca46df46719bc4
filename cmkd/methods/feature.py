"""Shared base of the feature-based baselines (fitnet, at, rkd, crd): not a method itself.

The networks' intermediate features come through the one model API (`cmkd.models`:
`stage_outputs(model, x, names)`, `stage_names`, `stage_channels`, `intermediate_stage`), so no
method reaches into a network's modules. The teacher is frozen (run once per batch without
grad, in eval mode); its cached logits are of no use here, since every method needs its
features, so `uses_teacher_logits_only` is False. Every method adds CE on the student.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import ConfigError
from cmkd.losses import cross_entropy
from cmkd.methods.base import Distiller
from cmkd.models import stage_outputs


def has_spatial_stages(model: nn.Module) -> bool:
    """Whether a network computes feature maps at all (a network without 2-D convolutions,
    like the MLP of the vector datasets, has only vector stages)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def pooled(x: torch.Tensor) -> torch.Tensor:
    """An embedding per sample: [N, D] as is, [N, D, H, W] averaged over space (segmentation
    networks' per-pixel features give one image-level embedding)."""
    return x if x.dim() == 2 else x.flatten(2).mean(dim=2)


def match_spatial(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize a [N, C, h, w] map to the spatial size of `like` when they differ."""
    if x.dim() == 4 and x.shape[-2:] != like.shape[-2:]:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return x


class FeatureDistiller(Distiller):
    """A frozen teacher read through its stages; subclasses name the stages they need."""

    uses_teacher_logits_only = False
    trains_teacher = False

    def __init__(self, student, teacher, cfg, num_classes):
        if teacher is None:
            raise ConfigError("runs", f"method {self.method_name!r} needs the pre-trained teacher network")
        super().__init__(student, teacher, cfg, num_classes)

    def key(self, param: str) -> str:
        return f"runs.<{self.method_name} run>.{param}"

    def resolve_stage(self, model: nn.Module, name: str, role: str, param: str) -> str:
        """A stage name of `model`; "auto" is the network's own intermediate stage."""
        known = list(getattr(model, "stage_names", ()))
        if not known:
            raise ConfigError(self.key(param),
                              f"the {role} network ({type(model).__name__}) exposes no stages (forward_stages)")
        if name == "auto":
            return model.intermediate_stage
        if name not in known:
            raise ConfigError(self.key(param),
                              f"the {role} network ({type(model).__name__}) has no stage {name!r}; known: {known}")
        return name

    def run_both(self, batch, student_stages: Sequence[str], teacher_stages: Sequence[str]):
        """(student stages + logits, teacher stages): the student with grad, the teacher without."""
        s_out = stage_outputs(self.student, batch["student_input"], list(student_stages))
        with torch.no_grad():
            t_out = stage_outputs(self.teacher, batch["teacher_input"], list(teacher_stages))
        return s_out, t_out

    def ce(self, s_out, batch) -> torch.Tensor:
        return self.cfg["ce_weight"] * cross_entropy(s_out["logits"], batch["target"])
