"""The `Distiller` base class every method derives from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from cmkd.errors import ConfigError
from cmkd.training.activity import ActivityCounter, part_record

# Batch keys (a batch is a dict of tensors):
#   student_input  [N, ...]  the student modality
#   teacher_input  [N, ...]  the teacher modality
#   target         [N] int64 or [N, H, W] (segmentation; -1 = ignore)
#   teacher_logits [N, C(, H, W)] cached outputs of the frozen teacher, when valid
#   index          [N] row indices in the split
Batch = Mapping[str, torch.Tensor]


class Distiller(nn.Module):
    """One training recipe.

    Subclasses set the class attributes, implement `forward(batch) -> {name: loss}`, and
    may override `on_epoch_start` (warm-ups, ramps) and `deployables`.
    """

    method_name: ClassVar[str] = ""
    #: which modality the trained network sees ("student" or "teacher").
    input_key: ClassVar[str] = "student_input"
    #: the method needs a pre-trained teacher.
    needs_teacher: ClassVar[bool] = True
    #: the teacher's parameters are trained too (C2KD); disables teacher-output caching.
    trains_teacher: ClassVar[bool] = False
    #: the method reads only the frozen teacher's logits, so cached logits are valid.
    uses_teacher_logits_only: ClassVar[bool] = True
    #: the tasks the method is defined for; on another task its run is skipped (shown as n/a).
    tasks: ClassVar[tuple[str, ...]] = ("classification", "segmentation")
    #: the inputs the method is defined for: "vector" ([N, F] rows) and/or "image" ([N, C, H, W]
    #: maps); on other inputs its run is skipped (n/a), as for `tasks`.
    inputs: ClassVar[tuple[str, ...]] = ("vector", "image")
    #: hyper-parameters with their defaults; anything else in the config is an error.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: Mapping[str, Any], num_classes: int):
        super().__init__()
        self.cfg = {**self.defaults, **cfg}
        self.num_classes = num_classes
        self.student = student
        self.teacher = teacher
        if teacher is not None and not self.trains_teacher:
            teacher.requires_grad_(False)
        self.epoch = 0
        self.total_epochs = 1

    @classmethod
    def validate(cls, cfg: Mapping[str, Any], key: str) -> None:
        unknown = sorted(set(cfg) - set(cls.defaults))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}",
                              f"not a parameter of method {cls.method_name!r}; known: {sorted(cls.defaults)}")
        merged = {**cls.defaults, **cfg}
        # A value of the wrong kind (`temperature: four`) is one line naming the key, not a
        # float() traceback in a subclass's range check. Numbers and switches only: string
        # defaults such as `strong_aug: auto` also accept other kinds.
        for name, value in cfg.items():
            default = cls.defaults.get(name)
            if value is None or default is None:
                continue
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{key}.{name}", f"must be true or false, got {value!r}")
            elif isinstance(default, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{key}.{name}", f"must be a number, got {value!r}")
        if "temperature" in merged and not float(merged["temperature"]) > 0:
            raise ConfigError(f"{key}.temperature", f"must be > 0, got {merged['temperature']}")
        for name, value in merged.items():
            if name.endswith("_weight") and float(value) < 0:
                raise ConfigError(f"{key}.{name}", f"must be >= 0, got {value}")

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None and not self.trains_teacher:
            self.teacher.eval()  # a frozen teacher keeps its BatchNorm statistics
        return self

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.epoch = epoch
        self.total_epochs = total_epochs

    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        """The teacher's logits: cached ones when present, else computed (without grad if frozen)."""
        if "teacher_logits" in batch and not self.trains_teacher:
            return batch["teacher_logits"]
        assert self.teacher is not None
        if self.trains_teacher:
            return self.teacher(batch["teacher_input"])
        with torch.no_grad():
            return self.teacher(batch["teacher_input"])

    def deployables(self) -> dict[str, tuple[nn.Module, str]]:
        """Networks to evaluate after training: name -> (network, batch input key)."""
        return {"student": (self.student, self.input_key)}

    def activity_counters(self) -> Mapping[str, ActivityCounter]:
        """The counters of the method's dynamic mechanisms (cmkd.training.activity), by key; none here."""
        return {}

    def take_activity(self) -> dict[str, list[int]]:
        """{key: [affected, total]} counted since the last call (the loop calls it every epoch)."""
        return {key: counter.take() for key, counter in self.activity_counters().items()}

    def mechanism_parts(self, activity: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One seed's mechanism records (`cmkd.training.activity.part_record`) from the counts the
        loop summed over the run (`activity`: {key: [affected, total]}); [] without a mechanism."""
        counters = self.activity_counters()
        return [part_record(counter.spec, *activity.get(key, (0, 0)), unit=counter.unit())
                for key, counter in counters.items()]

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
