"""Hinton KD: KDv1 (soft labels only, ce_weight 0) and KDv2 (0.5 CE + 0.5 soft)."""

from __future__ import annotations

from cmkd.losses import cross_entropy, kd_loss
from cmkd.methods import register
from cmkd.methods.logit import LogitDistiller


@register("kd")
class KD(LogitDistiller):
    defaults = {"ce_weight": 0.0, "kd_weight": 1.0, "temperature": 4.0, "lskd": False}

    def forward(self, batch):
        s = self.student(batch["student_input"])
        t = self.teacher_logits(batch)
        s_kd, t_kd = self.kd_view(s), self.kd_view(t)
        weights = self.kd_weights(batch, s_kd, t_kd)
        losses = {"kd": self.cfg["kd_weight"] * kd_loss(s_kd, t_kd, self.cfg["temperature"], mask=weights)}
        if self.cfg["ce_weight"]:
            losses["ce"] = self.cfg["ce_weight"] * cross_entropy(s, batch["target"])
        return losses
