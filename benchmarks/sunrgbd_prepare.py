"""Benchmark: SUN RGB-D preparation cost per frame at the real data's size.

Renders a small sample at the Kinect v2 resolution SUN RGB-D stores (730 x 530), then times
the reader path `prepare` runs per frame (read + verify + decode + register + resize to the
model input) and the HHA-like encoding, and extrapolates to the 2105 frames of the subset.
Writes benchmarks/results/sunrgbd_prepare.json.

    python benchmarks/sunrgbd_prepare.py [--frames-per-class 2] [--image-size 224]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from cmkd.data import sunrgbd
from cmkd.data.samples import sunrgbd as sunrgbd_sample
from cmkd.utils.atomic import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames-per-class", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sunrgbd_prepare.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = sunrgbd_sample.generate(Path(tmp), frames_per_class=args.frames_per_class,
                                       image_scale=1.0, progress=False)
        render_s = time.perf_counter() - t0
        frames, _ = sunrgbd.index_frames(root)
        reader = sunrgbd.VerifiedReader(root, None)
        load_s, hha_s = [], []
        for frame in frames:
            t0 = time.perf_counter()
            _, depth, k, _ = sunrgbd.load_frame(frame, reader, args.image_size)
            load_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sunrgbd.hha_encode(depth, k)
            hha_s.append(time.perf_counter() - t0)
    n_real = sum(sunrgbd.PAPER_COUNTS.values())
    result = {
        "frames": len(frames),
        "frame_size": list(sunrgbd_sample.KINECT2_HW),
        "image_size": args.image_size,
        "render_s_per_frame": render_s / len(frames),
        "load_s_per_frame": {"median": float(np.median(load_s)), "mean": float(np.mean(load_s))},
        "hha_s_per_frame": {"median": float(np.median(hha_s)), "mean": float(np.mean(hha_s))},
        "extrapolated_prepare_s_for_2105_frames": {
            "depth_only": float(np.mean(load_s)) * n_real,
            "with_hha": float(np.mean(load_s) + np.mean(hha_s)) * n_real,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}: {result}")


if __name__ == "__main__":
    main()
