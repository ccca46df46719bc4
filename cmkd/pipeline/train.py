"""The training stages' node function: one call per stage, given explicit paths
(cmkd/pipeline/layout.py); what it writes in a run's folder:

    <run_dir>/metrics.json           per seed: test metrics of every deployable, best epoch; for a
                                     method with a mechanism that can be inert, `mechanism` (what it
                                     did: cmkd.training.activity), per seed and summed over seeds
    <run_dir>/seed<k>/<name>.pt      state dict of each deployable network
    <run_dir>/seed<k>/train_logits.h5  (teacher runs) cached training-split logits
    <run_dir>/seed<k>/live/          DVCLive per-epoch metrics
    <checkpoint_root>/seed<k>/last.pt  resumable checkpoint (outside DVC's outputs, so a
                                     killed stage resumes instead of restarting)
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from cmkd.data.h5 import read_attrs, sample_shapes, seed_root
from cmkd.methods import build_distiller, get_method
from cmkd.training.activity import summarise
from cmkd.training.checkpoint import run_fingerprint
from cmkd.training.config import TrainConfig
from cmkd.training.data import load_split
from cmkd.training.distributed import distributed_info, resolve_device, seed_everything
from cmkd.training.evaluate import evaluate
from cmkd.training.logit_cache import cache_logits
from cmkd.training.loop import fit
from cmkd.training.networks import build_networks
from cmkd.training.precision import Precision
from cmkd.utils.atomic import write_json
from cmkd.utils.determinism import provenance
from cmkd.utils.jsonable import jsonable
from cmkd.utils.parallel import die_with_parent

log = logging.getLogger(__name__)


def train_run(
    *,
    dataset: str,
    prepared: Path,
    run_name: str,
    run_cfg: Mapping[str, Any],
    models: Mapping[str, Any],
    train_cfg: TrainConfig,
    seeds: Sequence[int],
    out_dir: Path,
    checkpoint_root: Path | None,
    teacher_dir: Path | None = None,
    teacher_train_cfg: TrainConfig | None = None,
    cache_train_logits: bool = False,
    progress: bool = True,
    seed_workers: int = 1,
    selected_on: str = "default",
    evaluate_test: bool = True,
    write_metrics: bool = True,
) -> dict[str, Any]:
    """Train one run (teacher, student or a distillation method) for every seed into `out_dir`.

    Seeds are independent, so on CPU they can train side by side in `seed_workers` forked
    processes (at most one per seed). Each seed is seeded as before, so the results are
    identical whatever the number of workers. Forking is only safe while this process has not
    started an OpenMP thread team: callers use workers > 1 only in a process that set
    torch.set_num_threads(1) before any computation (as the stage scripts do).

    metrics.json records at top level `hyperparameters` (the method's defaults with the run's
    values over them: what was actually used), `training` (the lr and weight decay used: STUDENT's
    tuned recipe where tuned.yaml selects one) and `selected_on` ("val" when the values came
    from the tuning protocol's selection, "default" otherwise). The tuning protocol trains with
    `evaluate_test=False` (the test split is never evaluated) and `write_metrics=False`.
    """
    attrs = read_attrs(prepared)
    task = attrs["task"]
    rank, world = distributed_info()
    if selected_on not in ("val", "default"):
        raise ValueError(f"selected_on must be 'val' or 'default', got {selected_on!r}")
    results: dict[str, Any] = {"dataset": dataset, "run": run_name, "method": run_cfg["method"], "task": task,
                               "hyperparameters": resolved_hyperparameters(run_cfg), "selected_on": selected_on,
                               "training": {"lr": float(train_cfg.lr), "weight_decay": float(train_cfg.weight_decay)},
                               "seeds": {}}
    skipped = skip_reason(run_cfg["method"], dataset, prepared, attrs)
    if skipped:
        # Not an error: the default `methods` list spans datasets of both tasks and of vector
        # and image inputs. The row says why.
        results["skipped"] = skipped
        log.warning("%s on %s: skipped (%s)", run_name, dataset, results["skipped"])
        if rank == 0:
            write_json(out_dir / "metrics.json", results)
        return results
    job = functools.partial(
        _train_seed, dataset=dataset, prepared=prepared, run_name=run_name, run_cfg=dict(run_cfg), models=dict(models),
        train_cfg=train_cfg, out_dir=out_dir, checkpoint_root=checkpoint_root, teacher_dir=teacher_dir,
        teacher_train_cfg=teacher_train_cfg, cache_train_logits=cache_train_logits, progress=progress,
        evaluate_test=evaluate_test)
    workers = _seed_workers(seed_workers, len(seeds), resolve_device(train_cfg.device), world)
    if workers <= 1:
        seed_results = [job(seed) for seed in seeds]
    else:
        log.info("training %d seeds in %d processes", len(seeds), workers)
        import_before_fork()
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent) as pool:
            seed_results = list(pool.map(job, seeds))
    for seed, seed_result in zip(seeds, seed_results):
        results["seeds"][str(seed)] = seed_result
    mechanism = summarise([r.get("mechanism", []) for r in seed_results])
    if mechanism is not None:  # what the method's own mechanism did (cmkd.training.activity)
        results["mechanism"] = mechanism
    results["provenance"] = provenance()
    if rank == 0 and write_metrics:
        write_json(out_dir / "metrics.json", results)
    return results


def input_kind(prepared: Path, attrs: Mapping[str, Any]) -> str:
    """"vector" when the student's rows are 1-D feature vectors, else "image"."""
    shapes = sample_shapes(prepared, "train", seed_root(attrs, 0))
    shape = shapes.get(attrs["student_modality"])
    return "vector" if shape is not None and len(shape) == 1 else "image"


def skip_reason(method: str, dataset: str, prepared: Path, attrs: Mapping[str, Any]) -> str | None:
    """Why `method` does not apply to this dataset (its task or its inputs), or None."""
    cls = get_method(method)
    if attrs["task"] not in cls.tasks:
        return f"method {method!r} supports {' and '.join(cls.tasks)} only; {dataset} is {attrs['task']}"
    kind = input_kind(prepared, attrs)
    if kind not in cls.inputs:
        return f"method {method!r} needs {' or '.join(cls.inputs)} inputs; {dataset} has {kind} inputs"
    return None


def import_before_fork() -> None:
    """Import, once in the parent, the heavy libraries every seed worker imports lazily (the
    optimizer pulls torch._dynamo, evaluation torchmetrics and scipy.signal, logging dvclive,
    whose Live() imports dvc.scm; engine.LiveLog keeps it from opening the repository):
    forked workers inherit them instead of each paying ~4 s of CPU for the same imports.
    Nothing here starts a thread or computes, so forking stays safe."""
    import dvc.scm  # noqa: F401
    import dvclive  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torchmetrics.classification  # noqa: F401


def resolved_hyperparameters(run_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The method's defaults with the run's values over them (what the distiller uses)."""
    cfg = dict(run_cfg)
    cls = get_method(cfg["method"], "runs")
    return jsonable({"method": cfg.pop("method"), **cls.defaults, **cfg})


def _seed_workers(requested: int, n_seeds: int, device: torch.device, world: int) -> int:
    # Forking is only safe before CUDA is initialised, and DDP ranks already share the work.
    if device.type != "cpu" or world > 1 or sys.platform != "linux":
        return 1
    return max(1, min(int(requested), n_seeds))


def _train_seed(
    seed: int, *, dataset: str, prepared: Path, run_name: str, run_cfg: Mapping[str, Any], models: Mapping[str, Any],
    train_cfg: TrainConfig, out_dir: Path, checkpoint_root: Path | None, teacher_dir: Path | None,
    teacher_train_cfg: TrainConfig | None, cache_train_logits: bool, progress: bool, evaluate_test: bool = True,
) -> dict[str, Any]:
    """Train, test and save one seed of a run; returns its entry of metrics.json."""
    attrs = read_attrs(prepared)
    task = attrs["task"]
    num_classes = len(attrs["class_names"])
    ignore_index = -1 if task == "segmentation" else None
    rank, _ = distributed_info()
    root = seed_root(attrs, seed)
    # Tuning never loads the test split, so no test number can reach a selection.
    splits = {s: load_split(prepared, s, attrs, root)
              for s in (("train", "val", "test") if evaluate_test else ("train", "val"))}
    seed_everything(seed)
    teacher, student = build_networks(attrs, splits["train"], models, dataset)
    cfg = dict(run_cfg)
    method = cfg["method"]
    if method == "teacher":
        student, teacher = teacher, None  # the network trained is the teacher-modality one
    distiller = build_distiller(cfg, student=student, teacher=teacher, num_classes=num_classes, key=f"runs.{run_name}")
    if distiller.needs_teacher:
        if teacher_dir is None:
            raise ValueError(f"run {run_name!r} (method {method}) needs a trained teacher")
        state = torch.load(teacher_dir / f"seed{seed}" / "model.pt", map_location="cpu", weights_only=True)
        distiller.teacher.load_state_dict(state)
        logits_path = teacher_dir / f"seed{seed}" / "train_logits.h5"
        if distiller.uses_teacher_logits_only and not distiller.trains_teacher and logits_path.exists():
            splits["train"] = splits["train"].with_teacher_logits(logits_path)
    seed_cfg = TrainConfig(**{**train_cfg.__dict__, "seed": seed})
    prepared_info = None
    if hasattr(distiller, "prepare"):
        # Methods that build something before training (MFH's Algorithm 1 retrains the teacher
        # on its modality-general channels) do it here, deterministically for the seed.
        t_cfg = TrainConfig(**{**(teacher_train_cfg or train_cfg).__dict__, "seed": seed})
        prepared_info = jsonable(distiller.prepare(splits["train"], splits["val"], t_cfg, task=task,
                                                    num_classes=num_classes, ignore_index=ignore_index,
                                                    progress=progress))
    fingerprint = run_fingerprint(dataset, run_name, dict(run_cfg), dict(models), train_cfg.fingerprint(), seed,
                                  attrs.get("source_checksum"), str(prepared.stat().st_size))
    result = fit(
        distiller, splits["train"], splits["val"], seed_cfg, task=task, num_classes=num_classes,
        ignore_index=ignore_index,
        checkpoint_dir=(checkpoint_root / f"seed{seed}") if checkpoint_root else None,
        log_dir=out_dir / f"seed{seed}" / "live", progress=progress,
        desc=f"{dataset}/{run_name}/seed{seed}", fingerprint=fingerprint,
    )
    seed_result: dict[str, Any] = {"best_epoch": result.best_epoch, "val": result.best_val, "test": {}}
    if prepared_info is not None:
        seed_result["prepare"] = prepared_info
    if hasattr(distiller, "summary"):  # a method's own end-of-run values (CTKD's tau trajectory)
        seed_result["method"] = jsonable(distiller.summary(result.history))
    mechanism_parts = distiller.mechanism_parts(result.activity)
    if mechanism_parts:
        seed_result["mechanism"] = mechanism_parts
    device = resolve_device(seed_cfg.device)
    for name, (net, input_key) in distiller.deployables().items():
        if evaluate_test:
            seed_result["test"][name] = evaluate(net, splits["test"], input_key, task=task, num_classes=num_classes,
                                                 ignore_index=ignore_index, batch_size=seed_cfg.eval_batch_size,
                                                 device=device,
                                                 precision=Precision(seed_cfg.amp, device),
                                                 channels_last=seed_cfg.channels_last is True or (
                                                     seed_cfg.channels_last == "auto" and device.type == "cuda"),
                                                 loader=seed_cfg.loader_config)
        if rank == 0:
            (out_dir / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in net.state_dict().items()}, out_dir / f"seed{seed}" / f"{name}.pt")
    if cache_train_logits and rank == 0:
        net, input_key = distiller.deployables()["model"]
        cache_logits(net, splits["train"].without("teacher_logits"), input_key,
                     out_dir / f"seed{seed}" / "train_logits.h5", seed_cfg.eval_batch_size)
    return seed_result
