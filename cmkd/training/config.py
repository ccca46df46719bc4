"""A training stage's settings (`train.<dataset>.<role>` of params.yaml), validated."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cmkd.data.loader import LoaderConfig
from cmkd.errors import ConfigError
from cmkd.training.precision import validate_amp, validate_schedule

AUGMENTS = (None, "flip", "flip_rot90")
OPTIMIZERS = ("adam", "adamw", "sgd")
_REAL_SCALE_KEYS = ("nesterov", "schedule", "amp", "channels_last", "grad_clip", "compile")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    augment: str | None = None
    eval_batch_size: int = 512
    # Real-scale options (cmkd/training/precision.py, cmkd/data/loader.py); the defaults change nothing.
    nesterov: bool = False
    schedule: Any = None
    amp: Any = False
    channels_last: bool = False
    grad_clip: float = 0.0
    compile: Any = False
    loader: Any = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any], key: str, **overrides: Any) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown training parameter; known: {sorted(names)}")
        merged = {**params, **overrides}
        # YAML 1.1 (PyYAML) reads DVC-written numbers such as 1e-05 as strings.
        for name in ("lr", "weight_decay", "momentum", "grad_clip"):
            if isinstance(merged.get(name), str):
                try:
                    merged[name] = float(merged[name])
                except ValueError:
                    raise ConfigError(f"{key}.{name}", f"must be a number, got {merged[name]!r}") from None
        cfg = cls(**merged)
        cfg.validate(key)
        return cfg

    def validate(self, key: str) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"{key}.epochs", f"must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"{key}.batch_size", f"must be a positive integer, got {self.batch_size!r}")
        if not float(self.lr) > 0:
            raise ConfigError(f"{key}.lr", f"must be > 0, got {self.lr!r}")
        if float(self.weight_decay) < 0:
            raise ConfigError(f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{key}.optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"{key}.augment", f"must be one of {AUGMENTS}, got {self.augment!r}")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"{key}.nesterov", f"must be true or false, got {self.nesterov!r}")
        if self.nesterov and self.optimizer != "sgd":
            raise ConfigError(f"{key}.nesterov", f"applies to optimizer sgd only, not {self.optimizer!r}")
        validate_schedule(self.schedule, f"{key}.schedule")
        validate_amp(self.amp, f"{key}.amp")
        if self.channels_last not in (True, False, "auto") or not isinstance(self.channels_last, (bool, str)):
            raise ConfigError(f"{key}.channels_last",
                              f"must be true, false or auto (on CUDA only), got {self.channels_last!r}")
        if not isinstance(self.grad_clip, (int, float)) or isinstance(self.grad_clip, bool) or self.grad_clip < 0:
            raise ConfigError(f"{key}.grad_clip", f"must be a number >= 0 (0 = off), got {self.grad_clip!r}")
        if not (isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile)):
            raise ConfigError(f"{key}.compile",
                              f"must be true, false or a torch.compile backend name, got {self.compile!r}")
        LoaderConfig.from_params(self.loader, f"{key}.loader")

    @property
    def schedule_spec(self) -> dict[str, Any] | None:
        return validate_schedule(self.schedule, "schedule")

    @property
    def loader_config(self) -> LoaderConfig:
        return LoaderConfig.from_params(self.loader, "loader")

    def fingerprint(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("device")
        d.pop("eval_batch_size")
        d.pop("loader")  # how batches arrive, not which: the same with any number of workers
        for f in dataclasses.fields(self):  # options left at their defaults keep the old hash
            if f.name in _REAL_SCALE_KEYS and d.get(f.name) == f.default:
                d.pop(f.name)
        return d
