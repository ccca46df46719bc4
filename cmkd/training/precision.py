"""The training step's optional parts, on torch's own tools: mixed precision (`torch.amp`),
learning-rate schedules with warm-up (`torch.optim.lr_scheduler`), gradient clipping,
channels_last and `torch.compile`. Every one is off by default, so a run that does not ask
for them executes exactly the operations it did before they existed.

params.yaml (`train.<dataset>.<role>`):

    amp: false | bf16 | fp16 | auto     auto: bf16 on GPUs that support it, fp16 + GradScaler
                                        on older GPUs, off on CPU
    channels_last: false                4-d weights and image inputs in NHWC (tensor cores);
                                        auto: on CUDA only
    grad_clip: 0.0                      max global gradient L2 norm; 0 = off
    compile: false                      true (inductor) or a torch.compile backend name
    schedule:                           stepped every optimiser step; epochs may be fractional
      name: none | cosine | step | poly
      warmup_epochs: 0                  linear warm-up from warmup_factor * lr to lr
      warmup_factor: 0.001
      min_lr: 0.0                       cosine: the final learning rate
      step_epochs: 30, gamma: 0.1       step: multiply by gamma every step_epochs
      power: 0.9                        poly: (1 - t / T) ** power
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cmkd.errors import ConfigError

AMP_MODES = (False, "bf16", "fp16", "auto")
SCHEDULES = ("none", "cosine", "step", "poly")
_SCHEDULE_KEYS = {
    "none": {"name", "warmup_epochs", "warmup_factor"},
    "cosine": {"name", "warmup_epochs", "warmup_factor", "min_lr"},
    "step": {"name", "warmup_epochs", "warmup_factor", "step_epochs", "gamma"},
    "poly": {"name", "warmup_epochs", "warmup_factor", "power"},
}
_SCHEDULE_DEFAULTS = {"warmup_epochs": 0, "warmup_factor": 0.001, "min_lr": 0.0, "step_epochs": 30,
                      "gamma": 0.1, "power": 0.9}


# ------------------------------------------------------------------------- validation


def validate_schedule(spec: Any, key: str) -> dict[str, Any] | None:
    """The schedule mapping with defaults filled in (None: no scheduler), or a ConfigError."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ConfigError(key, f"must be a mapping such as {{name: cosine, warmup_epochs: 1}}, got {spec!r}")
    name = spec.get("name", "none")
    if name not in SCHEDULES:
        raise ConfigError(f"{key}.name", f"must be one of {SCHEDULES}, got {name!r}")
    unknown = sorted(set(spec) - _SCHEDULE_KEYS[name])
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}",
                          f"not a parameter of schedule {name!r}; known: {sorted(_SCHEDULE_KEYS[name])}")
    out: dict[str, Any] = {"name": name}
    for k in sorted(_SCHEDULE_KEYS[name] - {"name"}):
        v = spec.get(k, _SCHEDULE_DEFAULTS[k])
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.{k}", f"must be a number, got {v!r}") from None
        out[k] = v
    if out["warmup_epochs"] < 0:
        raise ConfigError(f"{key}.warmup_epochs", f"must be >= 0, got {out['warmup_epochs']!r}")
    if not 0 < out["warmup_factor"] <= 1:
        raise ConfigError(f"{key}.warmup_factor", f"must be in (0, 1], got {out['warmup_factor']!r}")
    if name == "cosine" and out["min_lr"] < 0:
        raise ConfigError(f"{key}.min_lr", f"must be >= 0, got {out['min_lr']!r}")
    if name == "step" and (out["step_epochs"] <= 0 or not 0 < out["gamma"] <= 1):
        bad = "step_epochs" if out["step_epochs"] <= 0 else "gamma"
        raise ConfigError(f"{key}.{bad}", f"must be > 0 (gamma in (0, 1]), got {out[bad]!r}")
    if name == "poly" and out["power"] <= 0:
        raise ConfigError(f"{key}.power", f"must be > 0, got {out['power']!r}")
    if name == "none" and out["warmup_epochs"] == 0:
        return None  # nothing would change the learning rate
    return out


def validate_amp(value: Any, key: str) -> Any:
    if value in (None, "off", "none"):
        value = False
    if value not in AMP_MODES or value is True:
        raise ConfigError(key, f"must be one of false, bf16, fp16, auto; got {value!r}")
    return value


# ------------------------------------------------------------------------------- amp


class Precision:
    """Autocast dtype and gradient scaler for one run (`dtype` None: full precision)."""

    def __init__(self, mode: Any, device: torch.device):
        self.device_type = device.type
        self.dtype: torch.dtype | None = None
        if mode == "bf16":
            self.dtype = torch.bfloat16
        elif mode == "fp16":
            self.dtype = torch.float16
        elif mode == "auto" and device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # fp16's narrow exponent underflows small gradients: scale the loss (bf16 needs none).
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, precision: Precision,
                      grad_clip: float) -> None:
    """zero_grad, backward, optional clipping of the global gradient norm, step (through the
    scaler under fp16: gradients are unscaled before they are clipped)."""
    optimizer.zero_grad(set_to_none=True)
    scaler = precision.scaler
    if scaler is None:
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()


# -------------------------------------------------------------------------- schedule


def build_scheduler(optimizer: torch.optim.Optimizer, spec: Mapping[str, Any] | None, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The run's scheduler, stepped once per optimiser step (None when `spec` is None).

    Warm-up is LinearLR from warmup_factor to 1; the main part (CosineAnnealingLR, StepLR,
    PolynomialLR) covers the remaining steps; SequentialLR joins them."""
    if spec is None:
        return None
    from torch.optim import lr_scheduler as sch

    steps_per_epoch = max(1, int(steps_per_epoch))
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total, int(round(spec["warmup_epochs"] * steps_per_epoch)))
    rest = max(1, total - warmup)
    name = spec["name"]
    main: sch.LRScheduler | None
    if name == "cosine":
        main = sch.CosineAnnealingLR(optimizer, T_max=rest, eta_min=spec["min_lr"])
    elif name == "step":
        main = sch.StepLR(optimizer, step_size=max(1, int(round(spec["step_epochs"] * steps_per_epoch))),
                          gamma=spec["gamma"])
    elif name == "poly":
        main = sch.PolynomialLR(optimizer, total_iters=rest, power=spec["power"])
    else:
        main = None
    if warmup == 0:
        assert main is not None
        return main
    warm = sch.LinearLR(optimizer, start_factor=spec["warmup_factor"], end_factor=1.0, total_iters=warmup)
    if main is None:
        return warm
    return sch.SequentialLR(optimizer, [warm, main], milestones=[warmup])


def scheduled_lr(spec: Mapping[str, Any], base_lr: float, step: int, epochs: int, steps_per_epoch: int) -> float:
    """The learning rate a schedule prescribes before optimiser step `step` (closed form, for
    tests and documentation; the engine uses `build_scheduler`)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total, int(round(spec["warmup_epochs"] * steps_per_epoch)))
    if step < warmup:
        f = spec["warmup_factor"]
        return base_lr * (f + (1 - f) * step / warmup)
    t, rest = step - warmup, max(1, total - warmup)
    if spec["name"] == "cosine":
        return spec["min_lr"] + (base_lr - spec["min_lr"]) * (1 + math.cos(math.pi * t / rest)) / 2
    if spec["name"] == "step":
        return base_lr * spec["gamma"] ** (t // max(1, int(round(spec["step_epochs"] * steps_per_epoch))))
    if spec["name"] == "poly":
        return base_lr * (1 - min(t, rest) / rest) ** spec["power"]
    return base_lr


# -------------------------------------------------------------------- model plumbing


def to_channels_last(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Image-shaped (4-d) floating inputs in NHWC memory order; other tensors untouched."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 and v.is_floating_point() else v
            for k, v in batch.items()}


def maybe_compile(module: nn.Module, option: Any) -> nn.Module:
    """`torch.compile(module)` when asked (true: the default inductor backend; a string: that
    backend). The wrapper shares the module's parameters; state dicts stay the module's own."""
    if option is False or option is None:
        return module
    return torch.compile(module) if option is True else torch.compile(module, backend=str(option))
