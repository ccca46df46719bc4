"""Benchmark: the streamed input pipeline (cmkd/data/loader.py) on full-size SemanticKITTI rows.

Writes a prepared file of `--rows` rows in a temporary directory with the project's HDF5 writer,
laid out as `prepare` writes SemanticKITTI (rgb uint8 [3, 256, 1024] with its `normalise`
attribute, LiDAR float16 [5, 256, 1024], labels int8 [256, 1024]: 3.75 MiB a row; chunks of
4 MiB, i.e. one row each), then for 0, 1 and 2 loader workers:

- samples_per_s, cpu_ms_per_sample: one epoch of training batches (batch 8, chunk-aware
  shuffle, random flips, uint8 -> float32 normalisation) with no training step, timed on the
  wall clock; CPU time is the main process's plus the (reaped) workers' (getrusage), so
  `cpu_ms_per_sample` is what a sample costs whatever else runs on the machine;
- step_wait_share: the fraction of a training step's wall time spent waiting for the next
  batch, with a real step (forward, backward, Adam) of the `semantickitti` preset's student
  network (the LiDAR branch, what every distillation run trains) on those batches, one
  intra-op thread as the stages use; the first batch (worker start-up) is not counted.

The file is read from the page cache (it was just written): the numbers are the pipeline's
CPU cost, not a disk's bandwidth.

    python benchmarks/loader.py                 # 512 rows, 2 timed steps per worker count
    python benchmarks/loader.py --rows 500 --steps 4
    python benchmarks/loader.py --simulated-step-s 0.25 --steps 40   # a GPU's step rate

A CPU step of that network on 8 full-size rows takes about a minute on a busy 2-core machine,
hence the 2 timed steps by default (about 10 minutes in all).

Results: benchmarks/results/loader.json ({"rows", "workers": {"0": {...}, "1": ..., "2": ...},
"context": step times, model, machine}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from cmkd.data.datasets.semantickitti import CLASS_NAMES, RGB_MEAN, RGB_STD  # noqa: E402
from cmkd.data.h5 import PreparedWriter, read_attrs  # noqa: E402
from cmkd.data.loader import LoaderConfig  # noqa: E402
from cmkd.methods import build_distiller  # noqa: E402
from cmkd.models import build_model  # noqa: E402
from cmkd.training.data import load_split
from cmkd.training.distributed import seed_everything  # noqa: E402

HERE = Path(__file__).resolve().parent
H, W = 256, 1024
BATCH = 8


def write_rows(path: Path, n: int, height: int = H, width: int = W) -> None:
    """`n` rows of `height` x `width` (SemanticKITTI's projection size by default)."""
    rng = np.random.default_rng(0)
    attrs = {"task": "segmentation", "class_names": list(CLASS_NAMES), "modalities": ["rgb", "lidar"],
             "teacher_modality": "rgb", "student_modality": "lidar", "ignore_index": -1, "source_checksum": "bench",
             "normalise": {"rgb": {"scale": 255.0, "mean": list(RGB_MEAN), "std": list(RGB_STD)}}}
    # Eight distinct random rows, repeated: the bytes read per row are what matters here.
    block = {"rgb": rng.integers(0, 256, (8, 3, height, width), dtype=np.uint8),
             "lidar": rng.normal(size=(8, 5, height, width)).astype(np.float16),
             "labels": rng.integers(-1, 19, (8, height, width)).astype(np.int8)}
    row_bytes = sum(a[0].nbytes for a in block.values())
    with PreparedWriter(path, attrs, chunk_rows=max(1, (4 << 20) // row_bytes)) as w:
        for start in range(0, n, 8):
            w.append("train", {k: v[: min(8, n - start)] for k, v in block.items()})


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def loader_cfg(workers: int) -> LoaderConfig:
    # Not persistent: the workers exit (and are reaped) at the end of each timed epoch, so
    # their CPU time shows in RUSAGE_CHILDREN.
    return LoaderConfig(workers=workers, prefetch=2, pin_memory=False, persistent=False, buffer_chunks=16)


def pipeline_epoch(data, workers: int) -> dict[str, float]:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    rows = 0
    for batch in data.batches(BATCH, shuffle=True, seed=1, augment="flip", aug_seed=2, loader=loader_cfg(workers)):
        rows += len(batch["index"])
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"rows": rows, "wall_s": wall, "cpu_s": cpu}


def stepped_epoch(data, workers: int, steps: int, model_cfg: dict, simulated_step_s: float = 0.0) -> dict[str, float]:
    seed_everything(0)
    net = build_model(model_cfg, data.sample_shape("student_input"), len(CLASS_NAMES))
    distiller = build_distiller({"method": "supervised"}, student=net, teacher=None, num_classes=len(CLASS_NAMES))
    distiller.train()
    opt = torch.optim.Adam(distiller.parameters(), lr=1e-3)
    batches = data.batches(BATCH, shuffle=True, seed=3, augment="flip", aug_seed=4, loader=loader_cfg(workers))
    batch = next(batches)  # start-up (worker fork, first read) is not a steady-state wait
    waits, totals = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if simulated_step_s:
            # A GPU step as the training process sees it: it idles while the accelerator works.
            time.sleep(simulated_step_s)
        else:
            loss = sum(distiller(batch).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t1 = time.perf_counter()
        batch = next(batches)
        t2 = time.perf_counter()
        waits.append(t2 - t1)
        totals.append(t2 - t0)
    batches.close()  # shuts the workers down
    return {"step_wait_share": sum(waits) / sum(totals),
            "step_s": float(np.median([t - w for t, w in zip(totals, waits)])),
            "wait_s_per_step": sum(waits) / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--simulated-step-s", type=float, default=0.0,
                   help="instead of the CPU step, idle this long per step (a GPU's step time); "
                        "default output then benchmarks/results/loader_simulated_step.json")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.out = args.out or str(HERE / "results" / ("loader_simulated_step.json" if args.simulated_step_s
                                                    else "loader.json"))
    if args.rows < BATCH * (args.steps + 2):
        raise SystemExit(f"error: --rows {args.rows} is too few for {args.steps} steps of batch {BATCH}")
    torch.set_num_threads(1)
    params = yaml.safe_load((HERE.parent / "params.yaml").read_text())
    model_cfg = params["models"]["semantickitti"]["student"]
    results: dict = {"rows": args.rows, "workers": {}}
    context: dict = {"batch_size": BATCH, "row_shape": {"rgb": [3, H, W], "lidar": [5, H, W], "labels": [H, W]},
                     "model": model_cfg, "steps": args.steps, "machine": platform.platform(),
                     "cpus": os.cpu_count(), "torch_threads": 1, "simulated_step_s": args.simulated_step_s,
                     "load_average_at_start": os.getloadavg(), "per_workers": {}}
    with tempfile.TemporaryDirectory(prefix="cmkd-loader-") as tmp:
        path = Path(tmp) / "semantickitti.h5"
        t0 = time.perf_counter()
        write_rows(path, args.rows)
        context["write_s"] = time.perf_counter() - t0
        context["file_mib"] = path.stat().st_size / 2**20
        data = load_split(path, "train", read_attrs(path), in_memory=False)
        for w in args.workers:
            epoch = pipeline_epoch(data, w)
            step = stepped_epoch(data, w, args.steps, model_cfg, args.simulated_step_s)
            results["workers"][str(w)] = {
                "samples_per_s": round(epoch["rows"] / epoch["wall_s"], 2),
                "cpu_ms_per_sample": round(1000 * epoch["cpu_s"] / epoch["rows"], 2),
                "step_wait_share": round(step["step_wait_share"], 4),
            }
            context["per_workers"][str(w)] = {**epoch, **step}
            print(f"workers {w}: {results['workers'][str(w)]}  step {step['step_s']:.2f} s, "
                  f"wait {step['wait_s_per_step'] * 1000:.0f} ms/step", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "context": context}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
