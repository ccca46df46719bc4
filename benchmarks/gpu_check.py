"""GPU check: a short real-size training run on a CUDA machine, AMP off and on.

For two workloads, with the networks of params.yaml's presets and the engine's own step
(cmkd.training: autocast, GradScaler for fp16, channels_last):

- `semantickitti`: the preset's camera teacher (ResNet-34 seg encoder) and LiDAR student on
  batches of 8 full-size rows (rgb uint8 3 x 256 x 1024, LiDAR float16 5 x 256 x 1024, labels)
  streamed from a prepared HDF5 file in a temporary directory through the loader
  (cmkd/data/loader.py: workers, pinned memory, prefetch), as `fit` reads a large split;
- `sunrgbd`: the DisCoM-KD preset's ResNet-18 on batches of 128 RGB 224 x 224 images (an
  in-memory split, as `fit` keeps SUN RGB-D).

Each workload runs `--steps` optimiser steps after `--warmup` steps, with amp off (float32)
and on (`auto`: bf16 where supported, else fp16 + GradScaler), and reports the median step
time, samples per second, peak GPU memory and the loader wait share (the fraction of step
wall time spent waiting for the next batch).

    python benchmarks/gpu_check.py                       # on a CUDA machine
    python benchmarks/gpu_check.py --steps 20 --workers 4
    python benchmarks/gpu_check.py --device cpu          # the same code on the CPU, reduced size

Without CUDA, the default (`--device cuda`) says so and exits 0. `--device cpu` runs the same
path (loader, models, AMP switch, optimiser step) on the CPU at a reduced size (rows of 64 x 256,
batches of 2 rows and 4 images of 64 x 64, one warm-up step and one timed step): a check that the
script works, its times not a measurement (tests/test_gpu_check.py runs it).
Result: benchmarks/results/gpu_check.json (`--device cpu`: gpu_check_cpu.json)
"""

from __future__ import annotations

import argparse
import json
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

HERE = Path(__file__).resolve().parent

# Per device: SemanticKITTI row size and batch, SUN RGB-D image size and batch, and the defaults
# of --steps, --warmup and --workers. CUDA: the real sizes; CPU: small enough for seconds a step.
SIZES = {
    "cuda": {"rows": (256, 1024), "kitti_batch": 8, "image": 224, "sunrgbd_batch": 128,
             "steps": 10, "warmup": 3, "workers": 4},
    "cpu": {"rows": (64, 256), "kitti_batch": 2, "image": 64, "sunrgbd_batch": 4,
            "steps": 1, "warmup": 1, "workers": 1},
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_loop(distiller, batches, precision, optimizer, params, steps: int, warmup: int, channels_last: bool,
               batch_size: int, device: torch.device) -> dict:
    from cmkd.training.loop import _to_device
    from cmkd.training.precision import backward_and_step, to_channels_last

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    it = iter(batches)
    step_times, waits = [], []
    batch = next(it)
    for i in range(warmup + steps):
        _synchronize(device)
        t0 = time.perf_counter()
        b = _to_device(batch, device)
        if channels_last:
            b = to_channels_last(b)
        with precision.autocast():
            loss = sum(distiller(b).values())
        backward_and_step(loss, optimizer, params, precision, 0.0)
        t1 = time.perf_counter()
        batch = next(it)  # the loader prepares it while the GPU works
        t2 = time.perf_counter()
        _synchronize(device)
        t3 = time.perf_counter()
        if i >= warmup:
            step_times.append(t3 - t0)
            waits.append(t2 - t1)
    if hasattr(it, "close"):
        it.close()
    step = float(np.median(step_times))
    if device.type == "cuda":
        peak = {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    else:  # the process's peak resident memory (Linux: KiB)
        peak = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    return {"step_s": round(step, 4), "samples_per_s": round(batch_size / step, 1), **peak,
            "loader_wait_share": round(sum(waits) / sum(step_times), 4), "loss_finite": bool(torch.isfinite(loss))}


def _build(params, ds: str, role: str, in_shape, num_classes: int, amp, channels_last: bool, device: torch.device):
    from cmkd.methods import build_distiller
    from cmkd.models import build_model
    from cmkd.training.config import TrainConfig
    from cmkd.training.distributed import seed_everything
    from cmkd.training.loop import _optimizer
    from cmkd.training.precision import Precision

    seed_everything(0)
    net = build_model(params["models"][ds][role], in_shape, num_classes)
    distiller = build_distiller({"method": "supervised"}, student=net, teacher=None, num_classes=num_classes).to(device)
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
    cfg = TrainConfig.from_params({**params["train"][ds][role], "amp": amp}, f"train.{ds}.{role}")
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    return distiller, Precision(cfg.amp, device), _optimizer(trainable, cfg), trainable, cfg


def semantickitti(params, args, tmp: Path, device: torch.device) -> dict:
    from benchmarks.loader import write_rows
    from cmkd.data.h5 import read_attrs
    from cmkd.training.data import load_split

    size = SIZES[device.type]
    batch = size["kitti_batch"]
    path = tmp / "semantickitti.h5"
    n_rows = batch * (args.steps + args.warmup + 2)
    write_rows(path, n_rows, *size["rows"])
    data = load_split(path, "train", read_attrs(path), in_memory=False)
    out = {"rows": n_rows, "row_shape": list(size["rows"]), "batch_size": batch}
    for role, key in (("teacher", "teacher_input"), ("student", "student_input")):
        for amp in (False, "auto"):
            distiller, precision, opt, trainable, cfg = _build(params, "semantickitti", role, data.sample_shape(key),
                                                               19,
                                                              amp, True, device)
            if role == "teacher":  # the supervised distiller trains on student_input: feed it the camera rows
                source = ({**b, "student_input": b["teacher_input"]}
                          for b in _batches(data, args.workers, batch, device))
            else:
                source = _batches(data, args.workers, batch, device)
            res = _step_loop(distiller, source, precision, opt, trainable, args.steps, args.warmup, True, batch, device)
            res["autocast"] = str(precision.dtype).replace("torch.", "") if precision.dtype else "float32"
            out[f"{role}_amp_{'on' if amp else 'off'}"] = res
            print("semantickitti", role, "amp", amp, res, flush=True)
            del distiller, opt
            _empty_cache(device)
    return out


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _batches(data, workers: int, batch_size: int, device: torch.device):
    from cmkd.data.loader import LoaderConfig

    loader = LoaderConfig(workers=workers, pin_memory=device.type == "cuda", persistent=True, buffer_chunks=16)
    epoch = 0
    while True:  # as many epochs as the steps need
        yield from data.batches(batch_size, shuffle=True, seed=epoch, augment="flip", aug_seed=epoch + 1,
                                loader=loader, device=device)  # narrow rows copied to the device, normalised there
        epoch += 1


def sunrgbd(params, args, device: torch.device) -> dict:
    from cmkd.training.data import SplitData

    size = SIZES[device.type]
    batch, side = size["sunrgbd_batch"], size["image"]
    rng = np.random.default_rng(0)
    n = batch * 4
    x = rng.normal(size=(n, 3, side, side)).astype(np.float32)
    y = rng.integers(0, 10, n)
    data = SplitData.from_arrays(teacher_input=x, student_input=x, target=y)
    out = {"batch_size": batch, "image_size": side}

    def source():
        epoch = 0
        while True:
            yield from data.batches(batch, shuffle=True, seed=epoch, augment="flip_rot90", aug_seed=epoch + 1)
            epoch += 1

    for amp in (False, "auto"):
        distiller, precision, opt, trainable, cfg = _build(params, "sunrgbd", "student", (3, side, side), 10, amp, True,
                                                          device)
        res = _step_loop(distiller, source(), precision, opt, trainable, args.steps, args.warmup, True, batch, device)
        res["autocast"] = str(precision.dtype).replace("torch.", "") if precision.dtype else "float32"
        out[f"student_amp_{'on' if amp else 'off'}"] = res
        print("sunrgbd amp", amp, res, flush=True)
        del distiller, opt
        _empty_cache(device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=sorted(SIZES), default="cuda",
                   help="cuda (default: real sizes) or cpu (the same code at a reduced size)")
    p.add_argument("--steps", type=int, help="timed steps (default: 10 on cuda, 1 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--workers", type=int, help="loader workers (default: 4 on cuda, 1 on cpu)")
    p.add_argument("--out", help="results file (default: benchmarks/results/gpu_check.json, "
                                 "gpu_check_cpu.json with --device cpu)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to measure "
              "(--device cpu runs the same code on the CPU).")
        return
    device = torch.device(args.device)
    for name in ("steps", "warmup", "workers"):
        if getattr(args, name) is None:
            setattr(args, name, SIZES[device.type][name])
    if args.steps < 1 or args.warmup < 0 or args.workers < 0:
        raise SystemExit("error: --steps must be at least 1, --warmup and --workers at least 0")
    sys.path.insert(0, str(HERE.parent))
    params = yaml.safe_load((HERE.parent / "params.yaml").read_text())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        result = {"device": torch.cuda.get_device_name(), "bf16_supported": torch.cuda.is_bf16_supported()}
    else:
        torch.set_num_threads(1)  # as the stages train on the CPU
        result = {"device": f"cpu ({platform.processor() or platform.machine()})"}
    result.update({"torch": torch.__version__, "machine": platform.platform(), "steps": args.steps,
                   "warmup": args.warmup, "loader_workers": args.workers})
    with tempfile.TemporaryDirectory(prefix="cmkd-gpu-check-") as tmp:
        result["semantickitti"] = semantickitti(params, args, Path(tmp), device)
    result["sunrgbd"] = sunrgbd(params, args, device)
    out = Path(args.out or HERE / "results" / ("gpu_check.json" if device.type == "cuda" else "gpu_check_cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
