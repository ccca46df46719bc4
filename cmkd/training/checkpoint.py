"""Resumable checkpoints, written every epoch: a run resumes only from a checkpoint of the same
configuration and code (`run_fingerprint`), and an unreadable one is set aside."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmkd.utils.atomic import atomic_path

log = logging.getLogger(__name__)


def code_fingerprint() -> str:
    """Hash of the library's source, so a checkpoint made by other code is never resumed."""
    digest = hashlib.sha256()
    package = Path(__file__).parent.parent  # all of cmkd/
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(*parts: Any) -> str:
    """A hash of everything that defines a run (and of the code); a checkpoint is resumed only
    when it matches."""
    return hashlib.sha256(json.dumps([code_fingerprint(), *parts],
                                     sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


_CHECKPOINT_KEYS = ("fingerprint", "epoch", "distiller", "optimizer", "best_val", "best_epoch", "best_state", "history",
                    "activity")


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a resumable checkpoint atomically (a kill mid-write leaves the previous one)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: Path, fingerprint: str, distiller: nn.Module, optimizer: torch.optim.Optimizer,
                    desc: str = "") -> dict[str, Any] | None:
    """The checkpoint at `path` loaded into `distiller` and `optimizer`, or None to start afresh:
    when there is none, when it is for another configuration, or when it is unreadable (a disk
    fault, a truncated copy). An unreadable one is moved aside (`<name>.corrupt-<pid>`) with a
    warning naming it, so this run and every retry restart instead of failing on it again."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise KeyError(f"missing {missing}")
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside, whatever broke
        _set_aside(path, err, desc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("%s: checkpoint %s is for another configuration; starting afresh", desc, path)
        return None
    model_before = _cpu_state(distiller)
    try:
        distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:  # noqa: BLE001 - shapes or keys that do not fit: same as unreadable
        distiller.load_state_dict(model_before)
        _set_aside(path, err, desc)
        return None
    return state


def _set_aside(path: Path, err: BaseException, desc: str) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{os.getpid()}")
    os.replace(path, aside)
    log.warning("%s: checkpoint %s is unreadable (%s: %s); moved to %s, training restarts from epoch 0",
                desc, path, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "", aside)
