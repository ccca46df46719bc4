"""Mechanism activity: how much of the training data a method's own mechanism touched.

A method that differs from a simpler one only through a mechanism (NTDH's PSSM sample mask,
MLKD's confidence mask, C2KD's OFSD selection, MG-KD's and NTDH's channel masks) measures that
simpler method whenever the mechanism does nothing: PSSM weighing every row 1, a confidence mask
no row passes, a channel mask keeping every channel. Such a row must read as inert, not as the
method's result, so each of these methods counts what its mechanism did:

* dynamic mechanisms (masks built every step) count, in integers, the units (rows, or pixels for
  segmentation) they affected of those they saw, from the mask the method builds anyway, under
  `torch.no_grad()`: no RNG draw, no float operation of the loss, nothing the loss reads;
* static ones (a channel mask fixed before training) count channels removed of channels.

`summarise` turns the counts of every seed into the run's record
`{"name", "active_share", "inert", "reason", "measures"}`: inert when the share affected is below
`INERT_BELOW` (a configuration that switches the mechanism off, `k_fraction: 1.0`, gives 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: A mechanism that affects less than this share of its units (rows, pixels, channels) over a
#: whole run is inert: the row measures the method without it. 1 %: a mask changing one row in
#: a hundred cannot move a mean metric by more than the seeds' noise.
INERT_BELOW = 0.01


@dataclass(frozen=True)
class MechanismSpec:
    """What a mechanism is and how its counts read.

    name: "PSSM sample mask"; affects: the verb of what it does to a unit ("reweighted (weight != 1)");
    unit: what it counts ("valid training rows"); measures: what the row measures when it is inert."""

    name: str
    affects: str
    unit: str
    measures: str


class ActivityCounter:
    """Integer counts of one dynamic mechanism since the last `take()`: units affected of units seen.

    `add` only reads boolean masks the method has built and sums them (integer ops under no_grad),
    so counting changes no value, gradient or random draw of training."""

    def __init__(self, spec: MechanismSpec):
        self.spec = spec
        self.affected: torch.Tensor | int = 0
        self.total: torch.Tensor | int = 0
        #: True once a mask of more than one dimension (pixels) was counted
        self.per_pixel = False

    def add(self, affected: torch.Tensor, considered: torch.Tensor) -> None:
        """Count `affected & considered` of `considered` (bool masks of one shape). The sums stay
        on the mask's device (no synchronisation per step); `take` reads them once per epoch."""
        with torch.no_grad():
            considered = considered.to(torch.bool)
            self.affected = self.affected + (affected.to(torch.bool) & considered).sum()
            self.total = self.total + considered.sum()
            self.per_pixel = self.per_pixel or considered.dim() > 1

    def take(self) -> list[int]:
        """[affected, total] since the last call, and start again from zero."""
        counts = [int(self.affected), int(self.total)]
        self.affected, self.total = 0, 0
        return counts

    def unit(self) -> str:
        return self.spec.unit.replace("rows", "pixels") if self.per_pixel else self.spec.unit


def part_record(spec: MechanismSpec, affected: int, total: int, unit: str | None = None) -> dict[str, Any]:
    """One mechanism's counts for one seed (an entry of `seeds.<k>.mechanism` in a run's metrics.json)."""
    return {"name": spec.name, "affects": spec.affects, "unit": unit or spec.unit, "measures": spec.measures,
            "affected": int(affected), "total": int(total), "active_share": share(affected, total)}


def share(affected: int, total: int) -> float:
    return affected / total if total else 0.0


def summarise(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any] | None:
    """The run's record from every seed's `part_record`s: counts summed over seeds per mechanism;
    the run is inert when every mechanism is (a combined mask is inert only if each part is).

    {"name", "active_share" (the largest part's share), "inert", "reason" ("" when active),
    "measures" (what the row measures when inert)}; None for a method without a mechanism."""
    parts: dict[str, dict[str, Any]] = {}
    for seed_parts in per_seed:
        for p in seed_parts:
            merged = parts.setdefault(p["name"], {**p, "affected": 0, "total": 0})
            merged["affected"] += int(p["affected"])
            merged["total"] += int(p["total"])
    if not parts:
        return None
    shares = {name: share(p["affected"], p["total"]) for name, p in parts.items()}
    inert = all(s < INERT_BELOW for s in shares.values())
    reason = ""
    if inert:
        reason = "; ".join(f"{name} {p['affects']} {p['affected']} of {p['total']} {p['unit']} "
                           f"({shares[name]:.2%}; inert below {INERT_BELOW:.0%})" for name, p in parts.items())
    return {"name": " + ".join(parts), "active_share": max(shares.values()), "inert": inert, "reason": reason,
            "measures": " + ".join(dict.fromkeys(p["measures"] for p in parts.values()))}


def channel_mask_record(spec: MechanismSpec, teacher: Any) -> dict[str, Any] | None:
    """Channels removed of channels, from a `ChannelMasked` teacher's `mask` (None for another teacher)."""
    mask = getattr(teacher, "mask", None)
    if not isinstance(mask, torch.Tensor):
        return None
    return part_record(spec, int((~mask).sum()), mask.numel(), unit=f"teacher {teacher.level} channels")
