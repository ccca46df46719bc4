"""Multi-Level Logit Distillation (Jin, Wang and Lin, CVPR 2023).

For every temperature T in `temperatures` (default 2..6: the reference's 4 plus 3, 5, 2, 6) and
every student view, summed over T as the reference does:

* instance level: T^2 KL(p_t || p_s) per sample, averaged over the selected samples;
* batch level: ||P_s P_s^T - P_t P_t^T||^2 / n  (N x N prediction similarities, P = softmax(z/T));
* class level: ||P_s^T P_s - P_t^T P_t||^2 / C  (C x C class correlations).

Class term scale (`class_norm`): MLKD's reference sums the C x C correlations over the batch
without normalising (`class_norm: none`), so the term grows with B^2 and with few classes
dwarfs everything else: at C = 4, B = 128 its gradient is ~100x CE's, and the student collapses
(36.6 F1 on `synthetic`; 98% of the training rows pass the confidence mask, so the mask is not
the cause). `class_norm: batch` divides each correlation matrix by the number of selected
samples, G = P^T diag(w) P / sum(w), i.e. the term by sum(w)^2, which keeps it on CE's scale
whatever B and C. `none` stays the default (the paper's form); the tuning grid tries both.

Confidence mask: a sample (pixel) takes part in the KD terms only when the teacher's maximum
probability (softmax of the raw logits, T = 1) is >= `confidence_threshold`. The mask really
selects rows: the instance mean, the batch matrices and the class matrices are all computed over
the selected rows only. (The reference code multiplies an already-averaged scalar loss by the
mask and takes the mean, which only rescales the loss by the kept fraction and selects nothing;
its mask is also `<=` the batch median, i.e. it keeps the *least* confident half.)

Views: the reference distils a weak and a strong view through both networks. Here the teacher
sees its own modality once (so cached teacher logits stay valid) and, with `strong_aug`, the
student sees its input twice: as given (weak) and strongly augmented (random erasing of one
rectangle per image plus Gaussian noise scaled by each sample's std; vectors get the noise only).
Photometric/erasing only, no geometry, so the pixels stay aligned with the teacher's.
Both student views get CE and the three KD terms. `strong_aug: auto` (default) turns the strong
view on for image inputs ([N, C, H, W]) and off for vectors, which have no natural strong
augmentation; `true` / `false` force it.

Segmentation: rows are valid pixels; the batch and class terms count a pixel as 1/(H*W) of a
sample (see `cmkd.losses.batch_correlation_loss`), which keeps their classification scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmkd.errors import ConfigError
from cmkd.losses import batch_correlation_loss, class_correlation_loss, cross_entropy, to_rows
from cmkd.methods import register
from cmkd.methods.logit import LogitDistiller
from cmkd.training.activity import ActivityCounter, MechanismSpec
from cmkd.utils import exactmath

CLASS_NORMS = ("none", "batch")
#: MLKD distils only the rows its confidence mask passes: none passing leaves CE on the views
CONFIDENCE_MASK_SPEC = MechanismSpec("MLKD confidence mask", "passed", "valid training rows",
                                     "CE on the student's views, no distillation")


def class_norm_scale(class_norm: str, total_weight: torch.Tensor, rows_per_sample: int) -> torch.Tensor | float:
    """Factor on `class_correlation_loss` (which holds G = P^T diag(w) P / r): 1 for `none`;
    for `batch`, (r / sum(w))^2, so that G becomes the mean over the selected samples
    P^T diag(w) P / sum(w) (a pixel counts 1/r of a sample, as in the batch term)."""
    if class_norm == "none":
        return 1.0
    return (rows_per_sample / total_weight.detach()).square()


def teacher_confidence_mask(teacher_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool [N] / [N, H, W]: the teacher's max softmax probability is >= threshold."""
    return F.softmax(teacher_logits.detach().float(), dim=1).amax(dim=1) >= threshold


def strong_augment(x: torch.Tensor, noise_std: float = 0.1, erase: bool = True,
                   erase_area: tuple[float, float] = (0.02, 0.33),
                   erase_ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """A strong view of a batch, vectorised: for images [N, C, H, W] one random rectangle per image
    is set to that image's per-channel mean (random erasing), then every input gets Gaussian
    noise with std `noise_std` times the sample's own std. Uses the global torch RNG."""
    out = x.float().clone()
    n = x.shape[0]
    if erase and x.dim() == 4:
        _, _, height, width = x.shape
        dev = x.device
        area = torch.empty(n, device=dev).uniform_(*erase_area) * height * width
        log_r = torch.empty(n, device=dev).uniform_(math.log(erase_ratio[0]), math.log(erase_ratio[1]))
        ratio = exactmath.exp(log_r)
        h = exactmath.sqrt(area * ratio).round().clamp(1, height)
        w = exactmath.sqrt(area / ratio).round().clamp(1, width)
        top = (torch.rand(n, device=dev) * (height - h + 1)).floor()
        left = (torch.rand(n, device=dev) * (width - w + 1)).floor()
        rows = torch.arange(height, device=dev).view(1, height, 1)
        cols = torch.arange(width, device=dev).view(1, 1, width)
        inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + h).view(n, 1, 1))
                  & (cols >= left.view(n, 1, 1)) & (cols < (left + w).view(n, 1, 1)))
        channel_mean = out.mean(dim=(2, 3), keepdim=True)
        out = torch.where(inside.unsqueeze(1), channel_mean.expand_as(out), out)
    if noise_std > 0:
        scale = out.flatten(1).std(dim=1, correction=0).view(n, *([1] * (x.dim() - 1)))
        out = out + noise_std * scale * torch.randn_like(out)
    return out.to(x.dtype)


@register("mlkd")
class MLKD(LogitDistiller):
    defaults = {
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "temperatures": [2.0, 3.0, 4.0, 5.0, 6.0],
        "confidence_threshold": 0.5,
        "strong_aug": "auto",
        "strong_noise_std": 0.1,
        "strong_erase": True,
        "class_norm": "none",
        "lskd": False,
    }

    @classmethod
    def validate(cls, cfg, key):
        super().validate(cfg, key)
        merged = {**cls.defaults, **cfg}
        temps = merged["temperatures"]
        if not isinstance(temps, (list, tuple)) or not temps or not all(float(t) > 0 for t in temps):
            raise ConfigError(f"{key}.temperatures", f"must be a non-empty list of positive numbers, got {temps!r}")
        if not 0.0 <= float(merged["confidence_threshold"]) <= 1.0:
            raise ConfigError(f"{key}.confidence_threshold",
                              f"must lie in [0, 1], got {merged['confidence_threshold']}")
        if merged["strong_aug"] not in ("auto", True, False):
            raise ConfigError(f"{key}.strong_aug", f"must be auto, true or false, got {merged['strong_aug']!r}")
        if merged["class_norm"] not in CLASS_NORMS:
            raise ConfigError(f"{key}.class_norm", f"must be one of {list(CLASS_NORMS)}, got {merged['class_norm']!r}")
        if not float(merged["strong_noise_std"]) >= 0:
            raise ConfigError(f"{key}.strong_noise_std", f"must be >= 0, got {merged['strong_noise_std']}")

    def __init__(self, student, teacher, cfg, num_classes):
        super().__init__(student, teacher, cfg, num_classes)
        self.confidence_activity = ActivityCounter(CONFIDENCE_MASK_SPEC)

    def activity_counters(self):
        return {"confidence_mask": self.confidence_activity}

    def forward(self, batch):
        cfg = self.cfg
        x = batch["student_input"]
        target = batch["target"]
        s = self.student(x)
        views = [s]
        if cfg["strong_aug"] is True or (cfg["strong_aug"] == "auto" and x.dim() == 4):
            views.append(self.student(strong_augment(x, float(cfg["strong_noise_std"]), bool(cfg["strong_erase"]))))
        t = self.teacher_logits(batch)
        t_kd = self.kd_view(t)
        hook_weights = self.kd_weights(batch, self.kd_view(s), t_kd)
        confident = teacher_confidence_mask(t, float(cfg["confidence_threshold"]))
        self.confidence_activity.add(confident, target >= 0)
        weights = hook_weights * confident
        row_weights = weights.reshape(-1)
        rows_per_sample = math.prod(target.shape[1:])  # 1 for classification, H*W for segmentation
        t_rows = to_rows(t_kd)
        # All temperatures at once: [K, rows, C] (one kernel per op instead of one per T).
        temps = torch.tensor([float(t) for t in cfg["temperatures"]], dtype=t_rows.dtype,
                             device=t_rows.device).view(-1, 1, 1)
        log_p_t = F.log_softmax(t_rows.unsqueeze(0) / temps, dim=-1)
        p_t = exactmath.exp(log_p_t)
        total_weight = row_weights.sum().clamp_min(1e-12)
        class_scale = class_norm_scale(cfg["class_norm"], total_weight, rows_per_sample)

        instance = batch_level = class_level = s.new_zeros(())
        ce = s.new_zeros(())
        for view in views:
            log_p_s = F.log_softmax(to_rows(self.kd_view(view)).unsqueeze(0) / temps, dim=-1)
            # T^2 KL(p_t || p_s) per row, summed over T, weighted mean over the selected rows
            kl = (p_t * (log_p_t - log_p_s)).sum(-1) * temps.view(-1, 1).square()
            instance = instance + (kl.sum(0) * row_weights).sum() / total_weight
            p_s = exactmath.exp(log_p_s)
            batch_level = batch_level + batch_correlation_loss(p_s, p_t, row_weights, rows_per_sample).sum()
            class_level = class_level + class_correlation_loss(p_s, p_t, row_weights,
                                                               rows_per_sample).sum() * class_scale
            if cfg["ce_weight"]:
                ce = ce + cross_entropy(view, target)
        losses = {
            "kd_instance": cfg["kd_weight"] * instance,
            "kd_batch": cfg["kd_weight"] * batch_level,
            "kd_class": cfg["kd_weight"] * class_level,
        }
        if cfg["ce_weight"]:
            losses["ce"] = cfg["ce_weight"] * ce
        return losses
