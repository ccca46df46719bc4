"""C2KD (Huo et al., CVPR 2024): customised cross-modal KD with proxies and on-the-fly selection.

Both networks train: the student from scratch and the pre-trained teacher, which keeps learning
so that it can "customise" its knowledge for the student. Each network carries a small proxy
head on an intermediate stage (`proxy_stage`; `auto` = the architecture's `intermediate_stage`,
the output of layer3 of a ResNet as in C2KD's code, the first hidden layer of an MLP;
`features` = the penultimate features); per network the loss is

    CE(main, y)                                     unimodal supervision (teacher too)
  + KL(proxy <- main) + KL(main <- proxy)           the proxy inherits the network's unimodal
                                                    knowledge, and hands back what it learnt
  + OFSD * NT-KL(proxy <- other network's proxy)    cross-modal knowledge, bidirectional

where NT-KL is the KL divergence between the distributions over the *non-target* classes, so the
teacher's confidence on the true class - where the modalities are most imbalanced - is not
transferred, and OFSD (on-the-fly selection distillation) keeps a sample (or pixel) only when the
Kendall rank correlation of the two proxies' logits exceeds `threshold`: samples whose soft labels
rank the classes in disagreeing orders are misaligned and skipped. Every KL term's target side is
detached, as in the reference code, so each direction trains only the receiving head and its trunk.

The defaults follow C2KD's public code (`ntkl` in its utils/helper.py):

* `non_target: zero` - the target logit is multiplied by zero and the softmax runs over all C
  classes, so the target class stays in the distribution with logit 0; the KL sums all C columns.
  `remove` (a variant, run `c2kd_remove_target`) drops the target column and renormalises over
  the C - 1 others, the distribution DKD and NTDH call non-target.
* `ofsd_normalise: batch` - the per-row non-target KL times the OFSD mask, averaged over the batch's
  valid rows (C2KD: `(mask * kl).mean()` over the batch), so the term shrinks as OFSD keeps fewer
  rows and is 0 when it keeps none. `kept` (the variant) averages over the kept rows only, i.e. the
  official loss scaled by 1 / fraction kept.

Kendall's tau is computed batched on the device (the reference loops over samples with scipy on
the CPU; the same tau-b values).

The proxy follows C2KD's (`Tea` / `Stu` in its code: global average pool of the layer3 map,
1x1 conv without bias, BatchNorm, LeakyReLU(0.1), linear classifier): for classification a
spatial stage is pooled to [N, C_stage] first; for segmentation the same layers run per pixel
(1x1 convolutions) and give per-pixel logits at the stage's resolution.

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
from cmkd.training.activity import ActivityCounter, MechanismSpec
from cmkd.utils import exactmath


class _BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that normalises a training batch holding a single value per channel (the
    last batch of an epoch can have one sample) with the running statistics instead of failing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() // x.shape[1] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ProxyHead(nn.Module):
    """C2KD's proxy classifier: 1x1 conv (no bias), BN, LeakyReLU(0.1), 1x1 conv (= linear).

    [N, D] -> [N, C]. [N, D, H, W]: with `pool` (classification) the map is average-pooled to
    [N, D] first (C2KD's proxy on layer3) -> [N, C]; without (segmentation) the layers run per
    pixel -> [N, C, H, W].
    """

    def __init__(self, feature_dim: int, num_classes: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or feature_dim
        self.net = nn.Sequential(
            nn.Conv1d(feature_dim, hidden, 1, bias=False), _BatchNorm(hidden), nn.LeakyReLU(0.1),
            nn.Conv1d(hidden, num_classes, 1),
        )

    def forward(self, features: torch.Tensor, pool: bool = False) -> torch.Tensor:
        if features.dim() > 2 and pool:
            features = features.flatten(2).mean(2)
        if features.dim() == 2:
            return self.net(features.unsqueeze(-1)).squeeze(-1)
        n, _, *spatial = features.shape
        out = self.net(features.flatten(2))
        return out.reshape(n, -1, *spatial)


def proxy_stage_of(model: nn.Module, requested: str, name: str) -> tuple[str, int]:
    """(stage name, its channels) of the `proxy_stage` parameter for one network."""
    stages = list(getattr(model, "stage_names", ()))
    if not stages or not hasattr(model, "forward_stages"):
        raise ConfigError("models", f"the {name} network ({type(model).__name__}) exposes no intermediate stages "
                                    "(forward_stages); C2KD's proxy needs them")
    stage = model.intermediate_stage if requested == "auto" else requested
    if stage not in stages:
        raise ConfigError("c2kd.proxy_stage",
            f"the {name} network ({type(model).__name__}) has no stage {stage!r}; known: {stages} or auto")
    return stage, int(model.stage_channels[stage])


NON_TARGET_FORMS = ("zero", "remove")
OFSD_NORMALISATIONS = ("batch", "kept")


def nontarget_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      temperature: float, form: str = "zero") -> torch.Tensor:
    """Per-row KL(q_t || q_s) between the two non-target distributions.

    `form="zero"` (C2KD's code): q = softmax(z' / T) over all C classes, z' = z with the row's
    target logit set to 0, the KL summed over all C columns. `form="remove"`: q = softmax(z / T)
    over the C - 1 classes other than the target (removed and renormalised). Rows are [M, C] logits
    with a [M] target; rows with a negative target get 0.
    """
    if form not in NON_TARGET_FORMS:
        raise ValueError(f"non-target form must be one of {NON_TARGET_FORMS}, got {form!r}")
    target = target.reshape(-1)
    is_target = torch.zeros_like(student_logits, dtype=torch.bool)
    is_target[torch.arange(is_target.shape[0], device=is_target.device), target.clamp_min(0)] = True
    if form == "zero":
        zs = student_logits.masked_fill(is_target, 0.0)
        zt = teacher_logits.masked_fill(is_target, 0.0)
        keep = torch.ones_like(is_target)
    else:
        neg = torch.finfo(student_logits.dtype).min
        zs, zt = student_logits.masked_fill(is_target, neg), teacher_logits.masked_fill(is_target, neg)
        keep = ~is_target
    log_qs = F.log_softmax(zs / temperature, dim=1)
    log_qt = F.log_softmax(zt / temperature, dim=1)
    terms = exactmath.exp(log_qt) * (log_qt - log_qs)
    per_row = torch.where(keep, terms, torch.zeros_like(terms)).sum(dim=1)
    return torch.where(target >= 0, per_row, torch.zeros_like(per_row))


def ofsd_mask(proxy_student: torch.Tensor, proxy_teacher: torch.Tensor, threshold: float) -> torch.Tensor:
    """On-the-fly selection: [M] bool, True where Kendall's tau of the two rows exceeds `threshold`.

    Rows whose tau is undefined (a constant row) are not kept.
    """
    return kendall_tau(proxy_student, proxy_teacher) > threshold


#: the cross-modal terms reach only the rows OFSD keeps: none kept leaves C2KD without them
OFSD_SPEC = MechanismSpec("C2KD OFSD selection", "kept", "valid training rows",
                          "C2KD without cross-modal distillation (CE and proxy self-distillation)")


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
    proxy), crossmodal_weight (the OFSD non-target KL, each direction), proxy_stage (where both
    proxies sit: auto = each network's `intermediate_stage`, or a stage name both networks have,
    e.g. `features` for the penultimate features), non_target (zero: C2KD's code; remove: the
    variant) and ofsd_normalise (batch: C2KD's code, the mean over the batch's valid rows; kept:
    the variant, the mean over the rows OFSD keeps).
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
        "proxy_stage": "auto",
        "non_target": "zero",
        "ofsd_normalise": "batch",
    }

    @classmethod
    def validate(cls, cfg, key):
        super().validate(cfg, key)
        threshold = {**cls.defaults, **cfg}["threshold"]
        if not -1.0 <= float(threshold) < 1.0:
            raise ConfigError(f"{key}.threshold", f"a Kendall tau threshold must lie in [-1, 1), got {threshold}")
        merged = {**cls.defaults, **cfg}
        if merged["non_target"] not in NON_TARGET_FORMS:
            raise ConfigError(f"{key}.non_target",
                              f"must be one of {list(NON_TARGET_FORMS)}, got {merged['non_target']!r}")
        if merged["ofsd_normalise"] not in OFSD_NORMALISATIONS:
            raise ConfigError(f"{key}.ofsd_normalise",
                              f"must be one of {list(OFSD_NORMALISATIONS)}, got {merged['ofsd_normalise']!r}")
        stage = merged["proxy_stage"]
        if not isinstance(stage, str) or not stage:
            raise ConfigError(f"{key}.proxy_stage", f"must be auto or a stage name, got {stage!r}")

    def __init__(self, student, teacher, cfg, num_classes):
        if teacher is None:
            raise ConfigError("runs", "method 'c2kd' needs the pre-trained teacher network")
        super().__init__(student, teacher, cfg, num_classes)
        self.student_stage, s_channels = proxy_stage_of(student, str(self.cfg["proxy_stage"]), "student")
        self.teacher_stage, t_channels = proxy_stage_of(teacher, str(self.cfg["proxy_stage"]), "teacher")
        self.student_proxy = ProxyHead(s_channels, num_classes)
        self.teacher_proxy = ProxyHead(t_channels, num_classes)
        #: fraction of valid samples (pixels) OFSD kept in the last batch, for logging.
        self.last_kept_fraction = float("nan")
        self.ofsd_activity = ActivityCounter(OFSD_SPEC)

    def activity_counters(self):
        return {"ofsd": self.ofsd_activity}

    def forward(self, batch):
        target = batch["target"]
        cfg = self.cfg
        temperature = float(cfg["temperature"])

        # one pass per network: its logits and the proxy's stage
        s_out = self.student.forward_stages(batch["student_input"], [self.student_stage])
        t_out = self.teacher.forward_stages(batch["teacher_input"], [self.teacher_stage])
        pool = target.dim() == 1  # classification: one proxy prediction per sample
        s_main = _match_size(s_out["logits"], target)
        t_main = _match_size(t_out["logits"], target)
        s_proxy = _match_size(self.student_proxy(s_out[self.student_stage], pool), target)
        t_proxy = _match_size(self.teacher_proxy(t_out[self.teacher_stage], pool), target)

        rows = {name: to_rows(x) for name, x in (("s_main", s_main), ("t_main", t_main), ("s_proxy", s_proxy),
                                                 ("t_proxy", t_proxy))}
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
        self.ofsd_activity.add(selected, flat_target >= 0)
        self.last_kept_fraction = float(kept.sum() / valid.sum().clamp_min(1))
        form = str(cfg["non_target"])
        s_from_t = nontarget_kl_rows(rows["s_proxy"], rows["t_proxy"].detach(), flat_target, temperature, form)
        t_from_s = nontarget_kl_rows(rows["t_proxy"], rows["s_proxy"].detach(), flat_target, temperature, form)

        def ofsd_mean(values: torch.Tensor) -> torch.Tensor:
            if cfg["ofsd_normalise"] == "batch":  # C2KD's code: (mask * kl).mean() over the batch's rows
                return (values * kept).sum() / valid.sum().clamp_min(1)
            return masked_mean(values, kept)  # the variant: the mean over the rows OFSD keeps

        losses = {
            "ce": cfg["ce_weight"] * cross_entropy(s_main, target),
            "ce_teacher": cfg["teacher_ce_weight"] * cross_entropy(t_main, target),
            "proxy_student": cfg["proxy_weight"] * self_distill(rows["s_main"], rows["s_proxy"]),
            "proxy_teacher": cfg["proxy_weight"] * self_distill(rows["t_main"], rows["t_proxy"]),
            "ofsd_student": cfg["crossmodal_weight"] * ofsd_mean(s_from_t * temperature**2),
            "ofsd_teacher": cfg["crossmodal_weight"] * ofsd_mean(t_from_s * temperature**2),
        }
        return losses
