"""Curriculum Temperature KD (Li et al., AAAI 2023), global-temperature variant.

A learnable temperature tau = 1 + 20 * sigmoid(theta) is trained adversarially: the student
minimises ce_weight * CE + kd_weight * tau^2 KL(p_t(tau) || p_s(tau)), while theta reaches the
loss through a gradient-reversal layer and so ascends it. The reversal strength follows a
cosine ramp (the curriculum: easy first, harder later)

    lambda(n) = lambda_max * (1 - cos(pi * min(n / ramp_epochs, 1))) / 2,   n = epoch + 1,

with the 1-based epoch number n as in the reference code, where CosineDecay(max 0, min -1,
loops 10) gives -lambda and its GRL multiplies the gradient by that value. lambda rises from
~0 to lambda_max at epoch `ramp_epochs` and stays there. ramp_epochs defaults to 5 (the
reference uses 10 of 240 epochs; our runs are 20-30 epochs long).

theta is a parameter of the distiller, so the engine's optimiser trains it with the student.
It starts where tau = init_temperature (the reference starts at theta = 1, tau ~ 15.6; we start
at the KD baselines' temperature so CTKD departs from the KD it is compared with).

theta's learning rate: `temperature_lr` (null: the student's). Under Adam every parameter moves
about lr per step whatever its gradient, so with the students' lr 1e-3 and ~300 steps theta
moves at most ~0.3 and tau barely leaves its start (4.0 -> 4.8 on `synthetic`): the row is then
KD at a fixed T. The reference trains theta with the student's SGD at lr 0.05 on CIFAR-100.
theta gets its own optimiser parameter group (`param_groups()`, read by the engine), and tau is
logged every epoch (`train/temperature` in DVCLive) and at the end (`method.temperature` and
`method.temperature_trajectory` of the run's metrics.json).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cmkd.errors import ConfigError
from cmkd.losses import cross_entropy, kd_loss
from cmkd.methods import register
from cmkd.methods.logit import LogitDistiller

TAU_MIN = 1.0
TAU_RANGE = 20.0


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, strength):
        ctx.strength = float(strength)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


def gradient_reversal(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by -strength."""
    return _GradientReversal.apply(x, strength)


def cosine_ramp(epoch: int, ramp_epochs: float, max_value: float = 1.0) -> float:
    """max_value * (1 - cos(pi * min((epoch + 1) / ramp_epochs, 1))) / 2 for a 0-based epoch."""
    if ramp_epochs <= 0:
        return max_value
    progress = min((epoch + 1) / ramp_epochs, 1.0)
    return max_value * (1.0 - math.cos(math.pi * progress)) / 2.0


class GlobalTemperature(nn.Module):
    """tau = 1 + 20 * sigmoid(theta), theta seen through a gradient-reversal layer."""

    def __init__(self, init_temperature: float):
        super().__init__()
        frac = (init_temperature - TAU_MIN) / TAU_RANGE
        self.theta = nn.Parameter(torch.tensor(math.log(frac / (1.0 - frac))))

    def forward(self, reversal_strength: float) -> torch.Tensor:
        theta = gradient_reversal(self.theta, reversal_strength)
        return TAU_MIN + TAU_RANGE * torch.sigmoid(theta)


@register("ctkd")
class CTKD(LogitDistiller):
    defaults = {"ce_weight": 1.0, "kd_weight": 1.0, "init_temperature": 4.0, "ramp_epochs": 5, "lambda_max": 1.0,
                "temperature_lr": None, "lskd": False}

    @classmethod
    def validate(cls, cfg, key):
        super().validate(cfg, key)
        merged = {**cls.defaults, **cfg}
        init = float(merged["init_temperature"])
        if not TAU_MIN < init < TAU_MIN + TAU_RANGE:
            raise ConfigError(f"{key}.init_temperature",
                              f"must lie in ({TAU_MIN:g}, {TAU_MIN + TAU_RANGE:g}), got {init}")
        for name in ("ramp_epochs", "lambda_max"):
            if not float(merged[name]) >= 0:
                raise ConfigError(f"{key}.{name}", f"must be >= 0, got {merged[name]}")
        lr = merged["temperature_lr"]
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ConfigError(f"{key}.temperature_lr", f"must be null (the student's lr) or a number > 0, got {lr!r}")

    def __init__(self, student, teacher, cfg, num_classes):
        super().__init__(student, teacher, cfg, num_classes)
        self.temperature_module = GlobalTemperature(float(self.cfg["init_temperature"]))

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups: theta at `temperature_lr`, everything else at `lr`."""
        theta = self.temperature_module.theta
        rest = [p for p in self.parameters() if p.requires_grad and p is not theta]
        theta_lr = self.cfg["temperature_lr"]
        return [{"params": rest}, {"params": [theta], "lr": float(lr if theta_lr is None else theta_lr)}]

    def epoch_log(self) -> dict[str, float]:
        """Logged by the engine after every epoch: tau where the epoch left it."""
        return {"temperature": self.temperature}

    def summary(self, history: list[dict]) -> dict:
        """For metrics.json: tau of the selected (best-validation) epoch's state, tau after the
        last epoch, and the per-epoch trajectory."""
        trajectory = [h["train/temperature"] for h in history if "train/temperature" in h]
        return {"temperature": self.temperature,
                "temperature_final": trajectory[-1] if trajectory else self.temperature,
                "temperature_trajectory": trajectory}

    @property
    def reversal_strength(self) -> float:
        return cosine_ramp(self.epoch, float(self.cfg["ramp_epochs"]), float(self.cfg["lambda_max"]))

    @property
    def temperature(self) -> float:
        """The current tau (for logging)."""
        with torch.no_grad():
            return float(self.temperature_module(0.0))

    def forward(self, batch):
        s = self.student(batch["student_input"])
        t = self.teacher_logits(batch)
        s_kd, t_kd = self.kd_view(s), self.kd_view(t)
        weights = self.kd_weights(batch, s_kd, t_kd)
        tau = self.temperature_module(self.reversal_strength)
        losses = {"kd": self.cfg["kd_weight"] * kd_loss(s_kd, t_kd, tau, mask=weights)}
        if self.cfg["ce_weight"]:
            losses["ce"] = self.cfg["ce_weight"] * cross_entropy(s, batch["target"])
        return losses
