"""Shared base of the logit-distillation methods (kd, dkd, ctkd, mlkd).

It gives every logit method the same two plug-in points, so a plug-in written once (the NTDH
masks in `ntdh.py`) works with all of them:

* `kd_view(logits)`: the logits the KD terms see (LSKD z-scores them when `lskd` is on; CE
  always sees the raw logits).
* `kd_weights(batch, student_kd, teacher_kd)`: per-sample (per-pixel) weights of the KD terms,
  valid targets (`target >= 0`) times the weights of an optional `sample_weight_hook`.

Teacher logits come from `Distiller.teacher_logits(batch)`, so a plug-in changes them by
handing the method a different teacher module (the NTDH feature mask does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cmkd.losses import standardize_logits
from cmkd.methods.base import Batch, Distiller

# (batch, student KD logits, teacher KD logits) -> weights shaped like batch["target"]
SampleWeightHook = Callable[[Batch, torch.Tensor, torch.Tensor], torch.Tensor]


class LogitDistiller(Distiller):
    """A Distiller whose KD terms read logits only; subclasses keep an `lskd` parameter."""

    def __init__(self, student, teacher, cfg, num_classes):
        super().__init__(student, teacher, cfg, num_classes)
        #: set by a plug-in (NTDH sample mask); not a Module, so it adds nothing to state_dict.
        self.sample_weight_hook: SampleWeightHook | None = None

    def kd_view(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits as the KD terms see them: z-scored per sample with LSKD, else unchanged."""
        return standardize_logits(logits) if self.cfg.get("lskd", False) else logits

    def kd_weights(self, batch: Batch, student_kd: torch.Tensor, teacher_kd: torch.Tensor) -> torch.Tensor:
        """Float weights shaped like the target: 1 on valid rows, 0 on ignored ones, times the
        plug-in's weights (computed on detached logits: the mask is not trained through)."""
        weights = (batch["target"] >= 0).float()
        if self.sample_weight_hook is not None:
            weights = weights * self.sample_weight_hook(batch, student_kd.detach(), teacher_kd.detach())
        return weights
