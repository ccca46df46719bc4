"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

loss = ce_weight * CE + min(epoch_number / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD),
with TCKD / NCKD as in `cmkd.losses.dkd_loss` (target class removed from NCKD, both times T^2).

Epochs: the engine's `on_epoch_start` passes 0-based epochs; the warm-up uses the 1-based
epoch number (epoch + 1) as the reference code (mdistiller) does, so the first epoch already
carries 1/warmup_epochs of the KD term instead of none.

warmup_epochs defaults to 5 (the paper: 20 of 240 epochs on CIFAR-100); our runs last 20-30
epochs, so 20 would keep the KD term below full strength for most of training. 5 keeps the
paper's intent (no large NCKD gradients while the student is random) in proportion.
"""

from __future__ import annotations

from cmkd.errors import ConfigError
from cmkd.losses import cross_entropy, dkd_loss
from cmkd.methods import register
from cmkd.methods.logit import LogitDistiller


def linear_warmup(epoch: int, warmup_epochs: float) -> float:
    """min((epoch + 1) / warmup_epochs, 1) for a 0-based epoch; 1 when warmup_epochs is 0."""
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)


@register("dkd")
class DKD(LogitDistiller):
    defaults = {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 5, "lskd": False}

    @classmethod
    def validate(cls, cfg, key):
        super().validate(cfg, key)
        merged = {**cls.defaults, **cfg}
        for name in ("alpha", "beta", "warmup_epochs"):
            if not float(merged[name]) >= 0:
                raise ConfigError(f"{key}.{name}", f"must be >= 0, got {merged[name]}")

    def forward(self, batch):
        s = self.student(batch["student_input"])
        t = self.teacher_logits(batch)
        s_kd, t_kd = self.kd_view(s), self.kd_view(t)
        weights = self.kd_weights(batch, s_kd, t_kd)
        cfg = self.cfg
        warm = linear_warmup(self.epoch, cfg["warmup_epochs"])
        losses = {"dkd": warm * dkd_loss(s_kd, t_kd, batch["target"], cfg["alpha"], cfg["beta"],
                                         cfg["temperature"], mask=weights)}
        if cfg["ce_weight"]:
            losses["ce"] = cfg["ce_weight"] * cross_entropy(s, batch["target"])
        return losses
