"""Hinton KD: KDv1 (soft labels only, ce_weight 0) and KDv2 (0.5 CE + 0.5 soft)."""

from __future__ import annotations

from cmkd.losses import cross_entropy, kd_loss, standardize_logits
from cmkd.methods import register
from cmkd.methods.base import Distiller


@register("kd")
class KD(Distiller):
    defaults = {"ce_weight": 0.0, "kd_weight": 1.0, "temperature": 4.0, "lskd": False}

    def forward(self, batch):
        s = self.student(batch["student_input"])
        t = self.teacher_logits(batch)
        valid = batch["target"] >= 0
        if self.cfg["lskd"]:
            s_kd, t_kd = standardize_logits(s), standardize_logits(t)
        else:
            s_kd, t_kd = s, t
        losses = {"kd": self.cfg["kd_weight"] * kd_loss(s_kd, t_kd, self.cfg["temperature"], mask=valid)}
        if self.cfg["ce_weight"]:
            losses["ce"] = self.cfg["ce_weight"] * cross_entropy(s, batch["target"])
        return losses
