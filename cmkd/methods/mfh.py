"""The Modality Focusing Hypothesis (Xue et al., ICLR 2023): Algorithm 1 and MG-KD.

MFH: cross-modal KD helps the student only through the teacher's *modality-general decisive*
features, those that the student's modality also carries. Algorithm 1 finds them without knowing
how the data were generated, by permutation saliency:

1. train a teacher-modality network f_a and a student-modality network f_b jointly on
   CE(f_a(x_a), y) + CE(f_b(x_b), y) + dist(f_a(x_a), f_b(x_b)) (dist: MFH's mean squared error
   of the logits; NTDH runs the same algorithm with its non-target divergence, `distance="ntdh"`,
   for its feature mask), so that the two networks agree where the modalities agree;
2. for every teacher input channel k, permute channel k of x_a across samples (n_repeats
   times) and measure dist(f_a(x_a permuted), f_b(x_b)); the salience of k is its mean,
   min-max normalised to [0, 1]. Breaking a channel both networks rely on breaks their agreement,
   so high salience = modality-general decisive;
3. the top-k channels are the modality-general ones.

MG-KD then retrains the teacher on those channels only (the others zeroed, which for the first
layer is the same as removing them) and distils from it: method `mgkd`. The NTDH feature mask
(`cmkd.methods.ntdh`, mode feature) is the same pipeline with NTDH's distance: both call
`modality_general_teacher`.

Library functions (shapes: N samples, C channels along dim 1 of the inputs, i.e. the features
of [N, D] vectors or the channels of [N, C, H, W] images):

    permutation_saliency(model, inputs, targets, n_repeats, generator, loss=...)  -> [C]
    train_modality_pair(teacher, student, teacher_inputs, student_inputs, targets, ...)
    algorithm1(teacher, student, teacher_inputs, student_inputs, targets, k, level="input", ...)
        -> (channels [k] int64, saliency [C] float in [0, 1])
    channel_mask(channels, num_channels) -> [C] bool
    ChannelMasked(model, mask, level)  a network that sees only the masked input (or feature) channels
    retrain_teacher_on_channels(teacher, channels, num_channels, train, val, cfg, ..., level)
        -> (ChannelMasked teacher, FitResult)    (uses cmkd.training.loop.fit)

`level="feature"` applies the same procedure to the channels of `teacher.features(x)` (permuted
in front of `teacher.head`), as the paper does on its real datasets; for any other feature-channel
saliency (e.g. NTDH's feature mask) call permutation_saliency with the network's `head` as the
model and its `features(x)` as the inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import ConfigError
from cmkd.losses import cross_entropy, kd_loss, non_target_divergence, standardize_logits
from cmkd.methods import register
from cmkd.methods.base import Distiller
from cmkd.methods.discom import reinitialised_copy
from cmkd.training.activity import MechanismSpec, channel_mask_record
from cmkd.training.distributed import resolve_device
from cmkd.training.loop import fit

log = logging.getLogger(__name__)

#: (outputs [B, ...], targets [B, ...]) -> per-sample loss [B]
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE per sample; for dense outputs the mean over the sample's valid pixels (target >= 0)."""
    t = targets.long()
    per = F.cross_entropy(outputs, t.clamp_min(0), reduction="none")
    if per.dim() == 1:
        return per
    valid = (t >= 0).float()
    return (per * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


def per_sample_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - targets).pow(2).flatten(1).mean(1)


def per_sample_l1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - targets).abs().flatten(1).mean(1)


SALIENCY_LOSSES: dict[str, PerSampleLoss] = {"ce": per_sample_cross_entropy, "mse": per_sample_mse, "l1": per_sample_l1}

#: (teacher outputs [B, ...], student outputs [B, ...], labels [B, ...]) -> per-sample distance [B]
PairDistance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample_rows(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] stays; [B, H, W] per-pixel values -> the mean over each sample's valid pixels."""
    if values.dim() == 1:
        return values
    valid = (labels >= 0).to(values.dtype)
    return (values * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


def _non_target(form: str) -> PairDistance:
    def distance(out_t: torch.Tensor, out_s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _per_sample_rows(non_target_divergence(out_s, out_t, labels, form=form), labels)
    return distance


#: Algorithm 1's distances between the two networks' outputs: MFH's (mse; l1) and NTDH's
#: (`ntdh`: its non-target divergence 0.5 [KL(m || p_s) + KL(m || p_t)], as NTDH's code runs
#: Algorithm 1; `non_target_js`: the textbook-JS form of it). The last two need the labels.
PAIR_DISTANCES: dict[str, PairDistance] = {
    "mse": lambda a, b, y: per_sample_mse(a, b),
    "l1": lambda a, b, y: per_sample_l1(a, b),
    "ntdh": _non_target("ntdh"),
    "non_target_js": _non_target("js"),
}


def pair_distance(name: str) -> PairDistance:
    if name not in PAIR_DISTANCES:
        raise ValueError(f"unknown Algorithm 1 distance {name!r}; known: {sorted(PAIR_DISTANCES)}")
    return PAIR_DISTANCES[name]


def _loss_fn(loss: str | PerSampleLoss) -> PerSampleLoss:
    if callable(loss):
        return loss
    if loss not in SALIENCY_LOSSES:
        raise ValueError(f"unknown saliency loss {loss!r}; known: {sorted(SALIENCY_LOSSES)}")
    return SALIENCY_LOSSES[loss]


# Values of input per forward pass in the saliency loops. A "row" of a segmentation batch is
# a whole image: sizing passes by rows would put thousands of feature maps through the decoder
# at once (memory: benchmarks/stage_memory.py). Vector and small-image rows stay at `batch_size` rows (same
# passes, same bytes as before); large rows get fewer rows per pass.
MAX_PASS_ELEMENTS = 1 << 23


def _rows_per_pass(x: torch.Tensor, batch_size: int) -> int:
    row = max(1, x[0].numel()) if x.shape[0] else 1
    return max(1, min(int(batch_size), MAX_PASS_ELEMENTS // row))


def _forward_rows(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def permutation_saliency(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    n_repeats: int = 10,
    generator: torch.Generator | None = None,
    *,
    loss: str | PerSampleLoss = "ce",
    batch_size: int = 8192,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Permutation importance of every input channel: [C] mean loss increase.

    For each repeat and each channel c (dim 1 of `inputs` [N, C, ...]), channel c is permuted
    across the N samples (an independent permutation per channel and repeat, drawn from
    `generator` on the CPU) and the mean per-sample `loss(model(x_permuted), targets)` is compared
    with the unpermuted loss. Channels are evaluated together: a chunk of channels becomes one
    batch of stacked permuted copies (at most `batch_size` rows per forward pass). The model runs
    in eval mode (restored afterwards). `loss`: "ce" (targets = labels), "mse" or "l1" (targets =
    reference outputs), or a callable returning per-sample losses. With `labels` ([N, ...], e.g.
    the class labels NTDH's distance needs) the callable is `loss(outputs, targets, labels)`.
    """
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be [N, C, ...], got shape {tuple(inputs.shape)}")
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    loss_fn = _loss_fn(loss) if labels is None else loss
    if labels is not None and not callable(loss):
        raise ValueError("permutation_saliency: `labels` needs a callable loss(outputs, targets, labels)")
    was_training = model.training
    model.eval()
    try:
        n, c = inputs.shape[:2]
        batch_size = _rows_per_pass(inputs, batch_size)  # bounds the copies below as well
        extra = () if labels is None else (labels,)
        base = loss_fn(_forward_rows(model, inputs, batch_size), targets, *extra).mean()
        chunk = max(1, min(c, batch_size // max(1, n)))
        total = torch.zeros(c, dtype=torch.float64, device=inputs.device)
        for _ in range(n_repeats):
            perms = torch.rand(c, n, generator=generator).argsort(dim=1).to(inputs.device)
            for c0 in range(0, c, chunk):
                chans = torch.arange(c0, min(c, c0 + chunk), device=inputs.device)
                k = chans.numel()
                copies = inputs.unsqueeze(0).repeat(k, *([1] * inputs.dim()))  # [k, N, C, ...]
                copy_idx = torch.arange(k, device=inputs.device)
                # values of channel chans[i] in the order perms[chans[i]]: [k, N, ...]
                permuted = inputs[:, chans].movedim(1, 0)[copy_idx.unsqueeze(1), perms[chans]]
                copies[copy_idx, :, chans] = permuted
                out = _forward_rows(model, copies.flatten(0, 1), batch_size)
                rep_targets = targets.unsqueeze(0).expand(k, *targets.shape).flatten(0, 1)
                rep_extra = tuple(e.unsqueeze(0).expand(k, *e.shape).flatten(0, 1) for e in extra)
                per_copy = loss_fn(out, rep_targets, *rep_extra).view(k, n).mean(1)
                total[c0:c0 + k] += (per_copy - base).double()
        return (total / n_repeats).float()
    finally:
        model.train(was_training)


@torch.no_grad()
def zeroing_saliency(
    model: nn.Module,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    labels: torch.Tensor,
    distance: PairDistance,
    *,
    batch_size: int = 8192,
) -> torch.Tensor:
    """NTDH's channel tag on images: [C] mean per-sample `distance(model(x with channel c set to 0),
    reference, labels)` for every channel c (dim 1 of `inputs` [N, C, ...]). Zeroing is
    deterministic, so there are no repeats; channels are evaluated a chunk at a time (stacked
    copies, at most `batch_size` rows per forward pass). The model runs in eval mode (restored)."""
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be [N, C, ...], got shape {tuple(inputs.shape)}")
    was_training = model.training
    model.eval()
    try:
        n, c = inputs.shape[:2]
        batch_size = _rows_per_pass(inputs, batch_size)
        chunk = max(1, min(c, batch_size // max(1, n)))
        out = torch.empty(c, dtype=torch.float64, device=inputs.device)
        for c0 in range(0, c, chunk):
            chans = torch.arange(c0, min(c, c0 + chunk), device=inputs.device)
            k = chans.numel()
            keep = torch.ones(k, c, dtype=inputs.dtype, device=inputs.device)
            keep[torch.arange(k, device=inputs.device), chans] = 0
            copies = inputs.unsqueeze(0) * keep.view(k, 1, c, *([1] * (inputs.dim() - 2)))  # [k, N, C, ...]
            outputs = _forward_rows(model, copies.flatten(0, 1), batch_size)
            rep = [x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1) for x in (reference, labels)]
            out[c0:c0 + k] = distance(outputs, *rep).view(k, n).mean(1).double()
        return out.float()
    finally:
        model.train(was_training)


def train_modality_pair(
    teacher: nn.Module,
    student: nn.Module,
    teacher_inputs: torch.Tensor,
    student_inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int = 200,
    lr: float = 0.01,
    momentum: float = 0.9,
    batch_size: int | None = None,
    distance: str = "mse",
    distance_weight: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> list[float]:
    """Step 1 of Algorithm 1: train both networks in place on
    CE(teacher(x_a), y) + CE(student(x_b), y) + distance_weight * dist(teacher(x_a), student(x_b))
    with SGD (momentum), full batch when `batch_size` is None, else shuffled minibatches of
    `batch_size` rows every epoch (drawn from `generator`). `distance`: a `PAIR_DISTANCES` name
    (mse: MFH; ntdh: NTDH). Returns the loss per epoch."""
    from tqdm.auto import tqdm

    dist_fn = pair_distance(distance)
    params = list(teacher.parameters()) + list(student.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    teacher.train()
    student.train()
    n = teacher_inputs.shape[0]
    bs = n if batch_size is None else batch_size
    history = []
    for _ in tqdm(range(epochs), desc="algorithm 1: joint pair", disable=not progress, leave=False):
        order = (torch.randperm(n, generator=generator).to(teacher_inputs.device) if bs < n
                 else torch.arange(n, device=teacher_inputs.device))
        total = 0.0
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            out_t, out_s = teacher(teacher_inputs[idx]), student(student_inputs[idx])
            loss = (cross_entropy(out_t, targets[idx]) + cross_entropy(out_s, targets[idx])
                    + distance_weight * dist_fn(out_t, out_s, targets[idx]).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        history.append(total / n)
    teacher.eval()
    student.eval()
    return history


LEVELS = ("input", "feature")
#: how Algorithm 1 tags a channel: permuted across samples (MFH; NTDH on vectors) or set to zero (NTDH on images)
SALIENCY_RULES = ("permute", "zero")


def algorithm1(
    teacher: nn.Module,
    student: nn.Module,
    teacher_inputs: torch.Tensor,
    student_inputs: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    *,
    level: str = "input",
    n_repeats: int = 10,
    train_pair: bool = True,
    pair_epochs: int = 200,
    pair_lr: float = 0.01,
    pair_batch_size: int | None = None,
    distance: str = "mse",
    generator: torch.Generator | None = None,
    batch_size: int = 8192,
    progress: bool = False,
    saliency: str = "permute",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MFH Algorithm 1 -> (top-k teacher channels [k] int64, saliency [C] in [0, 1]).

    `teacher` / `student` see `teacher_inputs` [N, C, ...] / `student_inputs`; with `train_pair`
    they are first trained jointly in place (`train_modality_pair`; pass fresh networks, as the
    paper does), otherwise used as they are. The salience of channel c is the mean
    dist(teacher(x_a with channel c permuted), student(x_b)) over `n_repeats` permutations,
    min-max normalised (the ranking is that of the raw values). Channels are returned by
    decreasing salience. `level="input"` ranks the teacher's input channels (the paper's
    synthetic experiments); `level="feature"` ranks the channels of `teacher.features(x_a)`,
    permuted in front of `teacher.head` (the paper's real-data experiments, where the teacher's
    penultimate features are permuted), and C is then the feature width. `saliency="zero"` tags a
    channel by the distance with that channel set to zero instead (NTDH's MNIST code; no repeats).
    """
    if saliency not in SALIENCY_RULES:
        raise ValueError(f"saliency must be one of {SALIENCY_RULES}, got {saliency!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if train_pair:
        train_modality_pair(teacher, student, teacher_inputs, student_inputs, targets, epochs=pair_epochs, lr=pair_lr,
                            batch_size=pair_batch_size, distance=distance, generator=generator, progress=progress)
    was = teacher.training, student.training
    teacher.eval()
    student.eval()
    with torch.no_grad():
        reference = _forward_rows(student, student_inputs, _rows_per_pass(student_inputs, batch_size))
        if level == "feature":
            inputs, model = _forward_rows(teacher.features, teacher_inputs,
                                          _rows_per_pass(teacher_inputs, batch_size)), teacher.head
        else:
            inputs, model = teacher_inputs, teacher
    teacher.train(was[0])
    student.train(was[1])
    num_channels = inputs.shape[1]
    if not 1 <= k <= num_channels:
        raise ValueError(f"k must be in [1, {num_channels}] (the teacher's {level} channels), got {k}")
    dist_fn = pair_distance(distance)
    if saliency == "zero":
        increase = zeroing_saliency(model, inputs, reference, targets, dist_fn, batch_size=batch_size)
    elif distance in SALIENCY_LOSSES:  # label-free (MFH's): the exact computation exp_mfh_alg1 always ran
        increase = permutation_saliency(model, inputs, reference, n_repeats, generator, loss=distance,
                                        batch_size=batch_size)
    else:
        increase = permutation_saliency(model, inputs, reference, n_repeats, generator,
                                        loss=lambda out, ref, y: dist_fn(out, ref, y),
                                        batch_size=batch_size, labels=targets)
    span = increase.max() - increase.min()
    saliency = (increase - increase.min()) / span if span > 0 else torch.zeros_like(increase)
    channels = torch.argsort(increase, descending=True, stable=True)[:k]
    return channels.cpu(), saliency.cpu()


def channel_mask(channels: Sequence[int] | torch.Tensor, num_channels: int) -> torch.Tensor:
    """[num_channels] bool, True at `channels`."""
    idx = torch.as_tensor(channels, dtype=torch.long).reshape(-1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_channels):
        raise ValueError(f"channel indices {idx.tolist()} outside [0, {num_channels})")
    mask = torch.zeros(num_channels, dtype=torch.bool)
    mask[idx] = True
    return mask


class ChannelMasked(nn.Module):
    """`model` with the channels (dim 1) outside `mask` set to zero: of its input
    (`level="input"`) or of its `features()` (`level="feature"`, before the head).

    Keeps the features()/head interface: forward(x) = head(features(x)).
    """

    def __init__(self, model: nn.Module, mask: torch.Tensor, level: str = "input"):
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.model = model
        self.level = level
        self.register_buffer("mask", mask.to(torch.bool).clone())
        self.feature_dim = getattr(model, "feature_dim", None)

    @property
    def head(self) -> nn.Module:
        return self.model.head

    def _apply_mask(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mask.numel():
            raise ValueError(f"{self.level} has {x.shape[1]} channels, the mask {self.mask.numel()}")
        return x * self.mask.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.level == "input":
            return self.model.features(self._apply_mask(x))
        return self._apply_mask(self.model.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.features(x))


def retrain_teacher_on_channels(
    teacher: nn.Module,
    channels: Sequence[int] | torch.Tensor,
    num_channels: int,
    train: Any,
    val: Any,
    cfg: Any,
    *,
    task: str,
    num_classes: int,
    level: str = "input",
    reinitialise: bool | None = None,
    ignore_index: int | None = -1,
    checkpoint_dir: Any = None,
    log_dir: Any = None,
    progress: bool = False,
    desc: str = "modality-general teacher",
) -> tuple[ChannelMasked, Any]:
    """Train the modality-general teacher on `channels` only (the others zeroed), by supervised CE
    with `cmkd.training.loop.fit` (`train` / `val`: engine SplitData; `cfg`: engine TrainConfig).

    `level="input"`: `teacher`'s architecture re-initialised (the paper retrains a new teacher on
    the kept input channels). `level="feature"`: feature channels are only meaningful for the
    network they were measured on, so `teacher` (Algorithm 1's jointly trained one) is trained
    further with its other feature channels masked. `reinitialise` overrides that default.
    Returns (the trained ChannelMasked teacher, the FitResult)."""
    from cmkd.methods.supervised import TeacherSupervised

    if reinitialise is None:
        reinitialise = level == "input"
    net = reinitialised_copy(teacher) if reinitialise else teacher.requires_grad_(True)
    masked = ChannelMasked(net, channel_mask(channels, num_channels), level)
    trainer = TeacherSupervised(student=masked, teacher=None, cfg={}, num_classes=num_classes)
    result = fit(trainer, train, val, cfg, task=task, num_classes=num_classes, ignore_index=ignore_index,
                 checkpoint_dir=checkpoint_dir, log_dir=log_dir, progress=progress, desc=desc)
    masked.eval()
    return masked, result


def _leading_rows(data: Any, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Up to `n` shuffled rows of an engine SplitData as one batch of tensors."""
    return next(iter(data.batches(min(n, len(data)), shuffle=True, seed=seed)))


#: The parameters of `modality_general_teacher` (shared by MG-KD and NTDH's feature mask).
ALGORITHM1_DEFAULTS: dict[str, Any] = {
    "level": "auto",
    "k_fraction": 0.5,
    "channels": None,
    "n_repeats": 10,
    "pair_epochs": 200,
    "pair_lr": 0.01,
    "pair_batch_size": None,
    "saliency_samples": 4096,
}


def validate_algorithm1_cfg(merged: Mapping[str, Any], key: str, fraction_key: str = "k_fraction") -> None:
    """ConfigError for a bad `ALGORITHM1_DEFAULTS` entry (`fraction_key`: the name of k_fraction)."""
    if merged["level"] not in ("auto",) + LEVELS:
        raise ConfigError(f"{key}.level", f"must be auto, input or feature, got {merged['level']!r}")
    if not 0.0 < float(merged[fraction_key]) <= 1.0:
        raise ConfigError(f"{key}.{fraction_key}", f"must be in (0, 1], got {merged[fraction_key]}")
    ch = merged["channels"]
    if ch is not None and (not isinstance(ch, list) or not ch or not all(isinstance(i, int) and i >= 0 for i in ch)):
        raise ConfigError(f"{key}.channels", f"must be null or a non-empty list of channel indices, got {ch!r}")
    for name in ("n_repeats", "pair_epochs", "saliency_samples"):
        if not isinstance(merged[name], int) or isinstance(merged[name], bool) or merged[name] < 1:
            raise ConfigError(f"{key}.{name}", f"must be a positive integer, got {merged[name]!r}")
    pbs = merged["pair_batch_size"]
    if pbs is not None and (not isinstance(pbs, int) or pbs < 1):
        raise ConfigError(f"{key}.pair_batch_size", f"must be null (full batch) or a positive integer, got {pbs!r}")


def modality_general_teacher(
    teacher: nn.Module, student: nn.Module, train: Any, val: Any, train_cfg: Any, cfg: Mapping[str, Any], *,
    distance: str, task: str, num_classes: int, ignore_index: int | None = -1, checkpoint_dir: Any = None,
    progress: bool = False, name: str = "algorithm1", fraction_key: str = "k_fraction",
    k: int | None = None, saliency_rule: str = "permute", retrain: bool = True,
) -> tuple[ChannelMasked, dict[str, Any]]:
    """Algorithm 1 followed by a teacher retrained on the kept channels: MG-KD's teacher
    (distance "mse", MFH) and NTDH's feature-masked teacher (distance "ntdh").

    `teacher` / `student` give the architectures: Algorithm 1 runs on fresh copies of them
    (`reinitialised_copy`) on up to `saliency_samples` shuffled rows of `train`, keeps the top
    `cfg[fraction_key]` of the teacher's channels (or takes `cfg["channels"]`) and retrains the
    teacher on them with `cmkd.training.loop.fit` (`train_cfg`: engine TrainConfig). `cfg` holds the
    `ALGORITHM1_DEFAULTS` keys. Deterministic given torch's global seed and `train_cfg.seed`.
    `k` (a channel count) overrides `cfg[fraction_key]`; `saliency_rule`: `algorithm1`'s `saliency`. With
    `retrain=False` the teacher is Algorithm 1's jointly trained one with the other channels zeroed
    (NTDH's MNIST code), not retrained (`teacher_val` is then None).
    Returns (the trained ChannelMasked teacher, {"level", "channels", "saliency", "teacher_val"}).
    """
    rows = _leading_rows(train, int(cfg["saliency_samples"]), seed=int(train_cfg.seed))
    device = resolve_device(train_cfg.device)
    x_t, x_s, y = (rows[name].to(device) for name in ("teacher_input", "student_input", "target"))
    level = cfg["level"] if cfg["level"] != "auto" else ("input" if x_t.dim() == 2 else "feature")
    pair_teacher = reinitialised_copy(teacher).to(device)
    pair_student = reinitialised_copy(student).to(device)
    pair = dict(epochs=int(cfg["pair_epochs"]), lr=float(cfg["pair_lr"]), batch_size=cfg["pair_batch_size"],
                distance=distance)
    saliency = None
    if cfg["channels"] is not None:
        channels = torch.tensor(cfg["channels"], dtype=torch.long)
        if level == "feature":  # feature channels need the network they index
            train_modality_pair(pair_teacher, pair_student, x_t, x_s, y,
                                generator=torch.Generator().manual_seed(int(train_cfg.seed)), **pair)
    else:
        with torch.no_grad():
            width = x_t.shape[1] if level == "input" else pair_teacher.eval().features(x_t[:2]).shape[1]
        kept = max(1, int(round(float(cfg[fraction_key]) * width))) if k is None else min(int(k), width)
        channels, saliency = algorithm1(
            pair_teacher, pair_student, x_t, x_s, y, kept, level=level, n_repeats=int(cfg["n_repeats"]),
            pair_epochs=pair["epochs"], pair_lr=pair["lr"], pair_batch_size=pair["batch_size"], distance=distance,
            generator=torch.Generator().manual_seed(int(train_cfg.seed)), progress=progress, saliency=saliency_rule,
        )
    with torch.no_grad():
        num_channels = x_t.shape[1] if level == "input" else pair_teacher.eval().features(x_t[:2]).shape[1]
    if retrain:
        masked, result = retrain_teacher_on_channels(
            pair_teacher, channels, num_channels, train, val, train_cfg, task=task, num_classes=num_classes,
            level=level, ignore_index=ignore_index, checkpoint_dir=checkpoint_dir, progress=progress,
        )
        teacher_val = result.best_val
    else:
        masked, teacher_val = ChannelMasked(pair_teacher, channel_mask(channels, num_channels), level).eval(), None
    selection = {
        "level": level,
        "distance": distance,
        "channels": [int(c) for c in channels],
        "saliency": None if saliency is None else [float(s) for s in saliency],
        "teacher_val": teacher_val,
        "retrained": bool(retrain),
    }
    log.info("%s: teacher (retrained: %s) on %s channels %s (distance %s), val %s", name, retrain, level,
             selection["channels"], distance, teacher_val)
    return masked, selection


#: MG-KD's mechanism: the teacher sees only its modality-general channels
MGKD_SPEC = MechanismSpec("MG-KD channel mask", "removed", "teacher channels",
                          "KD from a teacher retrained on all its channels")


@register("mgkd")
class MGKD(Distiller):
    """MG-KD: Hinton KD from the modality-general teacher (MFH's implication, Table 2).

    The teacher is not the pipeline's pre-trained one: call `prepare(...)` before training. It
    runs Algorithm 1 on fresh copies of the teacher and student architectures (or takes the
    `channels` parameter), keeps the top `k_fraction` of the teacher's channels, retrains the
    teacher on them with `cmkd.training.loop.fit`, and installs it (frozen) as `self.teacher`.
    `set_teacher(masked_teacher)` installs an already retrained ChannelMasked teacher instead.

    `level`: "input" ranks the teacher's input channels (MFH's synthetic experiments),
    "feature" the channels of its penultimate features (MFH's real-data experiments; input
    channels of an image, one to three, are too few to separate), "auto" = input for vector
    inputs [N, D], feature for images. The teacher's logits are always computed, never taken
    from a cache: cached logits would be the full teacher's.
    """

    needs_teacher = False  # the teacher is trained by prepare(); `teacher` only gives its architecture
    uses_teacher_logits_only = False
    defaults = {"ce_weight": 0.0, "kd_weight": 1.0, "temperature": 4.0, "lskd": False, **ALGORITHM1_DEFAULTS}

    @classmethod
    def validate(cls, cfg, key):
        super().validate(cfg, key)
        validate_algorithm1_cfg({**cls.defaults, **cfg}, key)

    def __init__(self, student, teacher, cfg, num_classes):
        if teacher is None:
            raise ConfigError("runs", "method 'mgkd' needs the teacher architecture (a teacher-modality network)")
        super().__init__(student, teacher, cfg, num_classes)
        self.prepared = False
        #: set by prepare(): {"level", "channels", "saliency", "teacher_val"}
        self.selection: dict[str, Any] = {}

    def mechanism_parts(self, activity):
        channels = channel_mask_record(MGKD_SPEC, self.teacher)
        return [channels] if channels is not None else []

    def set_teacher(self, masked_teacher: nn.Module) -> None:
        """Use an already trained modality-general teacher (frozen from here on)."""
        self.teacher = masked_teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.prepared = True

    def prepare(
        self, train: Any, val: Any, train_cfg: Any, *, task: str, num_classes: int, ignore_index: int | None = -1,
        checkpoint_dir: Any = None, progress: bool = False,
    ) -> dict[str, Any]:
        """Algorithm 1 on (up to `saliency_samples` rows of) `train`, then retrain the teacher on the
        selected channels (`train_cfg`: engine TrainConfig, normally the teacher's). Deterministic
        given torch's global seed and `train_cfg.seed`. Returns `self.selection`."""
        masked, self.selection = modality_general_teacher(
            self.teacher, self.student, train, val, train_cfg, self.cfg, distance="mse", task=task,
                                                          num_classes=num_classes,
            ignore_index=ignore_index, checkpoint_dir=checkpoint_dir, progress=progress, name="mgkd")
        self.set_teacher(masked)
        return self.selection

    def teacher_logits(self, batch):
        with torch.no_grad():
            return self.teacher(batch["teacher_input"])

    def forward(self, batch):
        if not self.prepared:
            raise RuntimeError("mgkd: call prepare(...) (or set_teacher) before training; the teacher must be the "
                               "modality-general one")
        s = self.student(batch["student_input"])
        t = self.teacher_logits(batch)
        valid = batch["target"] >= 0
        s_kd, t_kd = (standardize_logits(s), standardize_logits(t)) if self.cfg["lskd"] else (s, t)
        losses = {"kd": self.cfg["kd_weight"] * kd_loss(s_kd, t_kd, self.cfg["temperature"], mask=valid)}
        if self.cfg["ce_weight"]:
            losses["ce"] = self.cfg["ce_weight"] * cross_entropy(s, batch["target"])
        return losses
