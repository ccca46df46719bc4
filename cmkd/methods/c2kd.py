"""C2KD (Huo et al., CVPR 2024): customised cross-modal KD with proxies and on-the-fly selection.

Both networks train: the student from scratch and the pre-trained teacher, which keeps learning
so that it can "customise" its knowledge for the student. Each network carries a small proxy
head on its `features()`; per network the loss is

    CE(main, y)                                     unimodal supervision (teacher too)
  + KL(proxy <- main) + KL(main <- proxy)           the proxy inherits the network's unimodal
                                                    knowledge, and hands back what it learnt
  + OFSD * NT-KL(proxy <- other network's proxy)    cross-modal knowledge, bidirectional

where NT-KL is the KL divergence between the distributions over the *non-target* classes only
(the target class is removed and the rest renormalised, so the teacher's confidence on the true
class - where the modalities are most imbalanced - is not transferred), and OFSD (on-the-fly
selection distillation) keeps a sample (or pixel) only when the Kendall rank correlation of the
two proxies' logits exceeds `threshold`: samples whose soft labels rank the classes in disagreeing
orders are misaligned and skipped. Every KL term's target side is detached, as in the reference
code, so each direction trains only the receiving head and its trunk.

Deviations from the public reference code, on purpose: the target class is removed from the
non-target distribution (the reference code multiplies its logit by zero, which leaves a logit 0
in the softmax); Kendall's tau is computed batched on the device (the reference loops over samples
with scipy on the CPU); the OFSD loss is averaged over the kept samples (the reference divides by
the batch size, so its weight silently shrinks as fewer samples are kept).

Segmentation: the same losses per pixel (valid pixels, target >= 0); logits computed on a
lower-resolution feature map (main head or proxy) are upsampled bilinearly to the label size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import ConfigError
from cmkd.losses import cross_entropy, kendall_tau, kl_rows, mask_rows, masked_mean, to_rows
from cmkd.methods import register
from cmkd.methods.base import Distiller


class _BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that normalises a training batch holding a single value per channel (the
    last batch of an epoch can have one sample) with the running statistics instead of failing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() // x.shape[1] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ProxyHead(nn.Module):
    """A small classifier on a network's features: 1x1 conv (= linear), BN, LeakyReLU, 1x1 conv.

    Takes [N, D] or [N, D, H, W] features and returns [N, C] or [N, C, H, W] logits.
    """

    def __init__(self, feature_dim: int, num_classes: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or feature_dim
        self.net = nn.Sequential(
            nn.Conv1d(feature_dim, hidden, 1), _BatchNorm(hidden), nn.LeakyReLU(0.1),
            nn.Conv1d(hidden, num_classes, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 2:
            return self.net(features.unsqueeze(-1)).squeeze(-1)
        n, _, *spatial = features.shape
        out = self.net(features.flatten(2))
        return out.reshape(n, -1, *spatial)


def feature_dim_of(model: nn.Module, name: str) -> int:
    dim = getattr(model, "feature_dim", None)
    if not isinstance(dim, int):
        raise ConfigError("models", f"the {name} network ({type(model).__name__}) has no integer `feature_dim`; C2KD needs it for its proxy head")
    return dim


def nontarget_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(q_t || q_s) between the distributions over the non-target classes.

    q = softmax(z / T) over the C - 1 classes other than the row's target (the target is removed,
    not zeroed). Rows are [M, C] logits with a [M] target; rows with a negative target get 0.
    """
    target = target.reshape(-1)
    keep = torch.ones_like(student_logits, dtype=torch.bool)
    keep[torch.arange(keep.shape[0], device=keep.device), target.clamp_min(0)] = False
    neg = torch.finfo(student_logits.dtype).min
    log_qs = F.log_softmax((student_logits / temperature).masked_fill(~keep, neg), dim=1)
    log_qt = F.log_softmax((teacher_logits / temperature).masked_fill(~keep, neg), dim=1)
    terms = log_qt.exp() * (log_qt - log_qs)
    per_row = torch.where(keep, terms, torch.zeros_like(terms)).sum(dim=1)
    return torch.where(target >= 0, per_row, torch.zeros_like(per_row))


def ofsd_mask(proxy_student: torch.Tensor, proxy_teacher: torch.Tensor, threshold: float) -> torch.Tensor:
    """On-the-fly selection: [M] bool, True where Kendall's tau of the two rows exceeds `threshold`.

    Rows whose tau is undefined (a constant row) are not kept.
    """
    return kendall_tau(proxy_student, proxy_teacher) > threshold


def _match_size(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Upsample dense logits [N, C, h, w] to the label size [N, H, W] when they differ."""
    if logits.dim() == 4 and logits.shape[-2:] != target.shape[-2:]:
        return F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return logits


@register("c2kd")
class C2KD(Distiller):
    """C2KD. `teacher` is the pre-trained teacher network; it is trained further here.

    Parameters: temperature (of every KL, 1 in the paper's code), threshold (OFSD: keep samples
    with Kendall tau > threshold, 0 in the paper), ce_weight / teacher_ce_weight (CE of the
    student / teacher), proxy_weight (both directions between a network's main head and its
    proxy), crossmodal_weight (the OFSD non-target KL, each direction).
    """

    trains_teacher = True
    uses_teacher_logits_only = False
    defaults = {
        "temperature": 1.0,
        "threshold": 0.0,
        "ce_weight": 1.0,
        "teacher_ce_weight": 1.0,
        "proxy_weight": 1.0,
        "crossmodal_weight": 1.0,
        # false: distil every valid sample (C2KD without OFSD; the ablation and the benchmark's baseline)
        "ofsd": True,
    }

    @classmethod
    def validate(cls, cfg, key):
        super().validate(cfg, key)
        threshold = {**cls.defaults, **cfg}["threshold"]
        if not -1.0 <= float(threshold) < 1.0:
            raise ConfigError(f"{key}.threshold", f"a Kendall tau threshold must lie in [-1, 1), got {threshold}")

    def __init__(self, student, teacher, cfg, num_classes):
        if teacher is None:
            raise ConfigError("runs", "method 'c2kd' needs the pre-trained teacher network")
        super().__init__(student, teacher, cfg, num_classes)
        self.student_proxy = ProxyHead(feature_dim_of(student, "student"), num_classes)
        self.teacher_proxy = ProxyHead(feature_dim_of(teacher, "teacher"), num_classes)
        #: fraction of valid samples (pixels) OFSD kept in the last batch, for logging.
        self.last_kept_fraction = float("nan")

    def forward(self, batch):
        target = batch["target"]
        cfg = self.cfg
        temperature = float(cfg["temperature"])

        s_feat = self.student.features(batch["student_input"])
        t_feat = self.teacher.features(batch["teacher_input"])
        s_main = _match_size(self.student.head(s_feat), target)
        t_main = _match_size(self.teacher.head(t_feat), target)
        s_proxy = _match_size(self.student_proxy(s_feat), target)
        t_proxy = _match_size(self.teacher_proxy(t_feat), target)

        rows = {name: to_rows(x) for name, x in (("s_main", s_main), ("t_main", t_main), ("s_proxy", s_proxy), ("t_proxy", t_proxy))}
        flat_target = target.reshape(-1)
        valid = mask_rows(flat_target >= 0, flat_target.numel(), flat_target.device)

        def self_distill(main: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
            to_proxy = kl_rows(proxy, main.detach(), temperature)
            to_main = kl_rows(main, proxy.detach(), temperature)
            return masked_mean((to_proxy + to_main) * temperature**2, valid)

        selected = flat_target >= 0
        if cfg["ofsd"]:
            selected = selected & ofsd_mask(rows["s_proxy"], rows["t_proxy"], float(cfg["threshold"]))
        kept = selected.float()
        self.last_kept_fraction = float(kept.sum() / valid.sum().clamp_min(1))
        s_from_t = nontarget_kl_rows(rows["s_proxy"], rows["t_proxy"].detach(), flat_target, temperature)
        t_from_s = nontarget_kl_rows(rows["t_proxy"], rows["s_proxy"].detach(), flat_target, temperature)

        losses = {
            "ce": cfg["ce_weight"] * cross_entropy(s_main, target),
            "ce_teacher": cfg["teacher_ce_weight"] * cross_entropy(t_main, target),
            "proxy_student": cfg["proxy_weight"] * self_distill(rows["s_main"], rows["s_proxy"]),
            "proxy_teacher": cfg["proxy_weight"] * self_distill(rows["t_main"], rows["t_proxy"]),
            "ofsd_student": cfg["crossmodal_weight"] * masked_mean(s_from_t * temperature**2, kept),
            "ofsd_teacher": cfg["crossmodal_weight"] * masked_mean(t_from_s * temperature**2, kept),
        }
        return losses
