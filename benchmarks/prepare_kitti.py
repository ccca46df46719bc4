"""Benchmark: SemanticKITTI `prepare` throughput (scans per second) on full-size scans.

Writes synthetic scans in SemanticKITTI's exact layout (about 120k points per scan from a
64-beam sensor: downward beams hit a ground plane, the others random ranges; 1241 x 376 and
1226 x 370 PNG images made from natural photographs so they compress like camera images;
KITTI's calibration), then times `cmkd.data.datasets.semantickitti.prepare` end to end (reading,
projection, cropping to 256 x 1024, HDF5 writing) with the given number of worker processes.
The machine may be shared, so CPU time per scan is also measured part by part with
time.process_time (insensitive to other load), running the pipeline's own per-scan functions
in one process: the worker processing a scan straight into a shared-memory slot, the
(small) result it sends through the pipe, and the main process writing HDF5 from views of the
slot. `idle_two_core_bound_scans_per_s` is what two idle cores could reach at most (2000 / CPU
ms per scan; the pipe's system calls for the few hundred bytes of a result are not counted).

    python benchmarks/prepare_kitti.py                 # 200 + 50 scans, 2 workers
    python benchmarks/prepare_kitti.py --scans 40 --workers 1

Result: benchmarks/results/prepare_kitti.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from cmkd.data.datasets import semantickitti as sk
from cmkd.data.geometry import lidar_image
from cmkd.data.h5 import PreparedWriter
from cmkd.data.samples.semantickitti import KITTI_CALIB, write_calib

HERE = Path(__file__).resolve().parent
BEAMS, AZIMUTHS = 64, 1875  # 120,000 rays


def synthetic_scan(rng: np.random.Generator) -> np.ndarray:
    elev = np.radians(np.linspace(2.0, -24.8, BEAMS))[:, None].repeat(AZIMUTHS, 1).ravel()
    azim = np.tile(np.linspace(-np.pi, np.pi, AZIMUTHS, endpoint=False), BEAMS)
    far = rng.uniform(3.0, 80.0, elev.size)
    ground = np.where(elev < -0.01, 1.73 / np.sin(np.clip(-elev, 1e-3, None)), np.inf)
    r = np.minimum(far, ground) + rng.normal(0, 0.02, elev.size)
    pts = np.column_stack([r * np.cos(elev) * np.cos(azim), r * np.cos(elev) * np.sin(azim), r * np.sin(elev),
                           rng.random(elev.size)])
    return pts.astype(np.float32)


def natural_images(sizes: list[tuple[int, int]], rng: np.random.Generator) -> dict[tuple[int, int], list[bytes]]:
    """A few PNGs per size cut from scikit-learn's bundled photographs (plus sensor noise)."""
    import io

    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    out: dict[tuple[int, int], list[bytes]] = {}
    for size in sizes:
        out[size] = []
        for k in range(4):
            img = Image.fromarray(photos[k % len(photos)]).resize(size, Image.BILINEAR)
            arr = np.clip(np.asarray(img, np.float32) + rng.normal(0, 3, (size[1], size[0], 3)),
                          0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            out[size].append(buf.getvalue())
    return out


def write_dataset(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    sizes = {"00": (1241, 376), "08": (1226, 370)}
    pngs = natural_images(list(set(sizes.values())), rng)
    labels_pool = np.array(sorted(sk.LEARNING_MAP), np.uint32)
    for seq, n in counts.items():
        d = root / "dataset" / "sequences" / seq
        for sub in ("velodyne", "labels", "image_2"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        calib = KITTI_CALIB[sizes[seq]]
        write_calib(d / "calib.txt", np.array(calib["P2"]).reshape(3, 4),
                    np.vstack([np.array(calib["Tr"]).reshape(3, 4), [0, 0, 0, 1]]))
        for i in range(n):
            pts = synthetic_scan(rng)
            pts.tofile(d / "velodyne" / f"{i:06d}.bin")
            (rng.choice(labels_pool, len(pts)) | (rng.integers(0, 50, len(pts),
                                                               dtype=np.uint32) << 16)).astype("<u4").tofile(
                d / "labels" / f"{i:06d}.label")
            (d / "image_2" / f"{i:06d}.png").write_bytes(pngs[sizes[seq]][i % 4])
    png_kb = float(np.mean([len(b) for v in pngs.values() for b in v]) / 1024)
    return {"points_per_scan": BEAMS * AZIMUTHS, "png_kib": round(png_kb, 1)}


def cpu_cost(root: Path, cfg: dict, n: int = 20) -> dict[str, float]:
    """CPU milliseconds per scan of each part of the parallel pipeline, measured in one
    process with time.process_time (so other load on the machine does not inflate them):
    the worker's read/project/crop into its shared-memory slot, pickling its result (where
    the arrays lie in the slot), the main process's unpickling and its HDF5 write from views of
    the slot. Two idle cores can do at most 2000 / total scans per second."""
    records = sk.list_scans([root], ["00"])[:n]
    settings = {"train": sk.settings_for(cfg, "benchmark", "train")}
    sk._init_worker(settings)  # as in a worker process
    slots = sk._Slots(1, sk._layout(settings["train"])[1])
    parts = {"worker_read_project_crop": 0.0, "worker_pickle": 0.0, "main_unpickle": 0.0, "main_hdf5_write": 0.0}
    try:
        jobs = [("train", r, slots.names[0]) for r in records]
        sk._work(jobs[0])  # warm: calib cache, imports, the slot attached and its pages touched
        with tempfile.TemporaryDirectory() as tmp:
            with PreparedWriter(Path(tmp) / "w.h5", {"task": "segmentation"}, chunk_rows=1) as writer:
                for job in jobs:
                    t0 = time.process_time()
                    result = sk._work(job)
                    t1 = time.process_time()
                    blob = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
                    t2 = time.process_time()
                    result = pickle.loads(blob)
                    t3 = time.process_time()
                    row = sk._views(slots.maps[0], result.fields)
                    writer.append("train", {k: v[None] for k, v in row.items()})
                    t4 = time.process_time()
                    for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        parts[key] += dt
                t0 = time.process_time()
            parts["main_hdf5_write"] += time.process_time() - t0  # closing the file
    finally:
        slots.close()
    out = {k: round(v / n * 1000, 2) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / n * 1000, 2)
    out["row_mib"] = round(sum(v.nbytes for v in row.values()) / 2**20, 2)
    out["result_bytes_through_pipe"] = len(blob)
    return out


def step_times(root: Path, n: int = 20) -> dict[str, float]:
    """CPU milliseconds per scan of the worker's steps (single process, into a reused row)."""
    d = root / "dataset" / "sequences" / "00"
    t = {"read_scan": 0.0, "read_labels_map": 0.0, "read_image": 0.0, "project_scatter": 0.0, "crop_rgb": 0.0}
    calib = sk.read_calib(d / "calib.txt")
    row = sk.empty_row(sk.PrepareSettings(crop=(256, 1024), random_crop=False, dtype="float16"))
    for i in range(n):
        t0 = time.process_time()
        pts = sk.read_scan(d / "velodyne" / f"{i:06d}.bin")
        t1 = time.process_time()
        sem, _ = sk.read_labels(d / "labels" / f"{i:06d}.label", len(pts))
        lab = sk.map_labels(sem)
        t2 = time.process_time()
        img = sk.read_image(d / "image_2" / f"{i:06d}.png")
        t3 = time.process_time()
        h, w = img.shape[:2]
        top, left, ch, cw = sk.crop_box(w, h, (256, 1024), None, d)
        lidar_image(pts, calib["P2"], calib["Tr"], w, h, labels=lab, box=(top, left, ch, cw), mean=sk.LIDAR_MEAN,
                    std=sk.LIDAR_STD, out=(row["lidar"], row["labels"], row["valid"]))
        t4 = time.process_time()
        np.copyto(row["rgb"], img[top:top + ch, left:left + cw].transpose(2, 0, 1))
        t5 = time.process_time()
        for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            t[key] += dt
    return {k: round(v / n * 1000, 2) for k, v in t.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, default=200, help="training scans (plus a quarter as many validation scans)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "prepare_kitti.json")
    p.add_argument("--dtype", default="float16",
                   help="dtype of lidar in the HDF5 file (params default: float16; rgb is uint8)")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the synthetic data (default: a temp dir)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        counts = {"00": args.scans, "08": max(1, args.scans // 4)}
        t0 = time.perf_counter()
        info = write_dataset(root / "raw", counts)
        gen_s = time.perf_counter() - t0
        cfg = {"split": {"train": [0], "val": [8]}, "crop": {"train": [256, 1024], "val": [256, 1024]},
               "workers": args.workers, "dtype": args.dtype}
        n_profile = min(20, args.scans)
        sk._init_worker({})  # this process then allocates memory as a worker process does
        steps = step_times(root / "raw", n_profile)
        cost = cpu_cost(root / "raw", cfg, n_profile)
        # Warm the page cache the same way for every run: the files were just written.
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        sk.prepare(cfg, root / "raw", root / "out.h5", progress=False)
        seconds = time.perf_counter() - t0
        load_after = os.getloadavg()
        total = sum(counts.values())
        out_mb = (root / "out.h5").stat().st_size / 2**20

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=HERE).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "benchmark": "prepare_kitti",
        "what": "cmkd.data.datasets.semantickitti.prepare end to end: read .bin/.label/.png/calib, project, crop "
                "256x1024, write HDF5",
        "transport": "workers write rows into shared-memory slots; the main process writes HDF5 from views of them",
        "scans": total,
        "scans_per_s": round(total / seconds, 2),
        "seconds": round(seconds, 2),
        "workers": args.workers,
        "target_scans_per_s": 40,
        "meets_target": total / seconds >= 40,
        "dtype": args.dtype,
        "worker_steps_cpu_ms_per_scan": steps,
        "pipeline_cpu_ms_per_scan": cost,
        "idle_two_core_bound_scans_per_s": round(2000 / cost["total"], 1),
        "output_mib_per_scan": round(out_mb / total, 2),
        "image_sizes": ["1241x376 (seq 00)", "1226x370 (seq 08)"],
        "generation_s": round(gen_s, 1),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "commit": commit,
        **info,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_out, args.out)
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
