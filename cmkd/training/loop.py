"""The training loop: seeded, deterministic on CPU, checkpointed every epoch, resumable,
data-parallel with torch.distributed when launched by torchrun.

Determinism: model initialisation is seeded by the caller (`seed_everything`); every epoch
re-seeds torch from (seed, epoch) and shuffles with its own generator, so a run resumed from
the checkpoint of epoch k is bit-identical to one that never stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmkd.training.checkpoint import _cpu_state, load_checkpoint, run_fingerprint, save_checkpoint
from cmkd.training.config import TrainConfig
from cmkd.training.data import SplitData
from cmkd.training.distributed import distributed_info, resolve_device
from cmkd.training.evaluate import evaluate
from cmkd.training.live import open_live
from cmkd.training.metrics import primary_metric
from cmkd.training.precision import Precision, backward_and_step, build_scheduler, maybe_compile, to_channels_last

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    #: {key: [affected, total]} summed over the training steps of every epoch: what the method's
    #: mechanism did (cmkd.training.activity); empty for a method without one
    activity: dict[str, list[int]] = field(default_factory=dict)


def _optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Adam's fused kernel takes its square root with the exact instruction; the unfused update
    # calls torch.sqrt, which MKL's vector math serves with a kernel chosen by the machine
    # (cmkd/utils/exactmath.py), so its weights would differ between AVX-512 and AVX2-only machines.
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.nesterov:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _run_state(scheduler, precision: Precision) -> dict[str, Any]:
    """What a checkpoint needs besides weights and optimiser to resume the exact run."""
    state = {}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if precision.scaler is not None:
        state["scaler"] = precision.scaler.state_dict()
    return state


def _load_run_state(state: Mapping[str, Any], scheduler, precision: Precision) -> None:
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if precision.scaler is not None:
        precision.scaler.load_state_dict(state["scaler"])


def fit(
    distiller: nn.Module,
    train: SplitData,
    val: SplitData,
    cfg: TrainConfig,
    *,
    task: str,
    num_classes: int,
    ignore_index: int | None = -1,
    checkpoint_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "",
    fingerprint: str = "",
) -> FitResult:
    """Train `distiller` (a cmkd.methods Distiller) and load its best state on `val`.

    The network selected on validation is the first deployable (`deployables()`); its
    primary metric (weighted F1 or mIoU) picks the best epoch. Test data is never seen here.
    """
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    rank, world = distributed_info()
    distiller.to(device)
    channels_last = cfg.channels_last is True or (cfg.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
    # A distiller may give some parameters their own learning rate (CTKD's temperature).
    if hasattr(distiller, "param_groups"):
        params = distiller.param_groups(cfg.lr)
    else:
        params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)
    precision = Precision(cfg.amp, device)
    scheduler = build_scheduler(optimizer, cfg.schedule_spec, cfg.epochs,
                                train.steps_per_epoch(cfg.batch_size, rank, world))
    loader_cfg = cfg.loader_config
    select = primary_metric(task)
    main_name, (main_net, main_key) = next(iter(distiller.deployables().items()))
    if cfg.augment is not None and "teacher_logits" in train.keys:
        train = train.without("teacher_logits")  # cached logits are those of un-augmented inputs

    fingerprint = fingerprint or run_fingerprint(cfg.fingerprint(), type(distiller).__name__)
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    start_epoch, best_val, best_epoch, best_state, history = 0, None, -1, None, []
    activity: dict[str, list[int]] = {}
    resumed = None
    state = load_checkpoint(ckpt_path, fingerprint, distiller, optimizer, desc) if ckpt_path is not None else None
    if state is not None:
        start_epoch = int(state["epoch"]) + 1
        best_val = json.loads(state["best_val"])
        best_epoch = int(state["best_epoch"])
        best_state = state["best_state"]
        history = json.loads(state["history"])
        activity = json.loads(state["activity"])
        _load_run_state(state, scheduler, precision)
        resumed = start_epoch
        log.info("%s: resumed after epoch %d from %s", desc, start_epoch - 1, ckpt_path)

    if hasattr(distiller, "on_train_start"):
        distiller.on_train_start(train)  # e.g. NTDH's feature mask, estimated once on train rows

    step_module: nn.Module = distiller
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(distiller, find_unused_parameters=True)
    step_module = maybe_compile(step_module, cfg.compile)

    live = open_live(log_dir, history) if log_dir is not None and rank == 0 else None

    bar = tqdm(range(start_epoch, cfg.epochs), desc=desc or "train", disable=not progress or rank != 0,
               initial=start_epoch, total=cfg.epochs, leave=False, dynamic_ncols=True)
    for epoch in bar:
        epoch_seed = cfg.seed * 1_000_003 + epoch
        torch.manual_seed(epoch_seed)
        distiller.on_epoch_start(epoch, cfg.epochs)
        distiller.train()
        _add_activity(activity, distiller, count=False)  # from zero: nothing before this epoch's steps counts
        sums: dict[str, float] = {}
        n_steps = 0
        # Augmented as the batches are made (in the loader's workers for streamed splits).
        for batch in train.batches(cfg.batch_size, shuffle=True, seed=epoch_seed, rank=rank, world=world,
                                   augment=cfg.augment, aug_seed=epoch_seed + 1, loader=loader_cfg, device=device):
            if len(batch["index"]) < 2:
                continue  # a trailing batch of one row breaks BatchNorm's batch statistics
            batch = _to_device(batch, device)
            if channels_last:
                batch = to_channels_last(batch)
            with precision.autocast():
                losses = step_module(batch)
                loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss at epoch {epoch}: "
                                         f"{ {k: float(v) for k, v in losses.items()} }")
            backward_and_step(loss, optimizer, params, precision, cfg.grad_clip)
            if scheduler is not None:
                scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            n_steps += 1
        _add_activity(activity, distiller)
        val_metrics = evaluate(main_net, val, main_key, task=task, num_classes=num_classes,
                               ignore_index=ignore_index, batch_size=cfg.eval_batch_size, device=device,
                               precision=precision, channels_last=channels_last, loader=loader_cfg)
        record = {"epoch": epoch, **{f"train/{k}": v / max(n_steps, 1) for k, v in sums.items()},
                  **{f"val/{k}": v for k, v in val_metrics.items() if isinstance(v, float)}}
        if hasattr(distiller, "epoch_log"):  # a method's own per-epoch values (CTKD's tau)
            record.update({f"train/{k}": float(v) for k, v in distiller.epoch_log().items()})
        if scheduler is not None:
            record["train/lr"] = optimizer.param_groups[0]["lr"]  # for the next epoch's first step
        history.append(record)
        if best_val is None or val_metrics[select] > best_val[select]:
            best_val, best_epoch, best_state = val_metrics, epoch, _cpu_state(distiller)
        bar.set_postfix(loss=f"{record['train/loss']:.3f}", **{select: f"{val_metrics[select]:.3f}"})
        if live is not None:
            live.record(record)
        if ckpt_path is not None and rank == 0:
            save_checkpoint(ckpt_path, {
                "fingerprint": fingerprint, "epoch": epoch, "distiller": _cpu_state(distiller),
                "optimizer": optimizer.state_dict(), "best_val": json.dumps(best_val),
                "best_epoch": best_epoch, "best_state": best_state, "history": json.dumps(history),
                "activity": json.dumps(activity), **_run_state(scheduler, precision),
            })
    bar.close()
    if live is not None:
        live.end()
    assert best_state is not None
    distiller.load_state_dict(best_state)
    log.info("%s: best %s %.4f at epoch %d (%s)", desc, select, best_val[select], best_epoch, main_name)
    return FitResult(best_epoch=best_epoch, best_val=best_val, history=history, resumed_from_epoch=resumed,
                     activity=activity)


def _add_activity(activity: dict[str, list[int]], distiller: nn.Module, count: bool = True) -> None:
    """Add the mechanism counts the distiller gathered since the last call to `activity`
    (integers read once per epoch; `count=False` only resets them)."""
    if not hasattr(distiller, "take_activity"):
        return
    for key, (affected, total) in distiller.take_activity().items():
        if count:
            summed = activity.setdefault(key, [0, 0])
            summed[0] += affected
            summed[1] += total
