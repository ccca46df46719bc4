"""`nyudv2-sample`: procedural rooms written as NYU-Depth-V2's own files, for offline runs.

`generate` renders `frames` indoor scenes and writes them exactly as the real dataset lays
them out, so `prepare` runs the real reader path on them (cmkd/data/datasets/nyudv2.py;
`validate` and `download` here also take the real data's settings, then the reader's):

* `nyu_depth_v2_labeled.mat`: a MATLAB v7.3 file (HDF5 with MATLAB's 512-byte user block and
  `MATLAB_class` attributes) holding `images` [N, 3, 640, 480] uint8, `depths` and `rawDepths`
  [N, 640, 480] single (metres; rawDepths with the sensor's holes as 0), `labels` [N, 640, 480]
  uint16 (raw NYU class ids, 0 = unlabeled) and `instances` [N, 640, 480] uint8: MATLAB's
  480 x 640 x 3 x N column-major arrays as h5py sees them;
* `splits.mat`: a MATLAB v5 file with `trainNdxs` / `testNdxs` (1-based column vectors).

Each scene is a box room (walls, floor, ceiling) with furniture and wall objects (bed, table,
chairs, sofa, cabinet, books, pillow, lamp, television, window, picture, door) as axis-aligned
boxes, ray-cast from a camera with NYU's Kinect colour intrinsics at 1 / `render_scale` of the
native resolution (then repeated up to 640 x 480). Raw label ids are the ids whose 40-class
mapping is the object's class, so the 40- and 13-class maps apply as on real frames; the
frame's 8-pixel border is unlabeled, as in the real data. Colours: a per-class base colour
with per-object jitter, Lambert shading and sensor noise. Deterministic for a seed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from cmkd.data.datasets import nyudv2
from cmkd.data.datasets.nyudv2 import LABELED, SPLITS
from cmkd.data.datasets.nyudv2_classes import MAP_894_TO_40
from cmkd.data.registry import register_dataset
from cmkd.errors import ConfigError

NATIVE_HW = (480, 640)
# NYU-Depth-V2 colour camera intrinsics (the toolbox's camera_params.m)
FX, FY, CX, CY = 518.857901, 519.469611, 325.582449, 253.736166
BORDER = 8

# object -> (40-class id, base colour RGB)
_CLASSES = {
    "wall": (1, (200, 190, 170)), "floor": (2, (130, 95, 70)), "ceiling": (22, (235, 235, 230)),
    "cabinet": (3, (150, 110, 70)), "bed": (4, (180, 60, 60)), "chair": (5, (60, 60, 70)), "sofa": (6, (70, 90, 150)),
    "table": (7, (160, 120, 80)), "door": (8, (110, 80, 50)), "window": (9, (170, 210, 240)), "picture": (11, (90, 140, 90)),
    "books": (23, (40, 90, 160)), "television": (25, (20, 20, 25)), "pillow": (18, (230, 230, 210)), "lamp": (35, (240, 220, 150)),
}


def raw_id(class40: int) -> int:
    """The first raw NYU class id that maps to `class40` (1-based)."""
    return int(np.flatnonzero(MAP_894_TO_40 == class40)[0]) + 1


def validate_sample(cfg: Mapping[str, Any], key: str) -> None:
    """Check the `sample:` settings (`cfg` is that section, `key` its params key)."""
    known = {"frames", "train_frames", "seed", "render_scale"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown sample parameter; known: {sorted(known)}")
    frames, train = cfg.get("frames", 40), cfg.get("train_frames", 24)
    if not isinstance(frames, int) or frames < 4:
        raise ConfigError(f"{key}.frames", f"must be an integer >= 4, got {frames!r}")
    if not isinstance(train, int) or not 2 <= train < frames:
        raise ConfigError(f"{key}.train_frames", f"must be an integer in [2, frames), got {train!r}")
    if cfg.get("render_scale", 4) not in (1, 2, 4, 8):
        raise ConfigError(f"{key}.render_scale", f"must be 1, 2, 4 or 8, got {cfg.get('render_scale')!r}")


def _yaw_pitch_rotation(yaw: float, pitch: float) -> np.ndarray:
    """Camera (x right, y down, z forward) -> world (x, y horizontal, z up)."""
    forward = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.cross(forward, right)
    return np.stack([right, down, forward], axis=1)


def _room(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, str]]]:
    size = np.array([rng.uniform(3.5, 6.0), rng.uniform(3.5, 6.0), rng.uniform(2.5, 3.0)])
    objects: list[tuple[np.ndarray, np.ndarray, str]] = []

    def floor_box(name, dims, against_wall=False):
        dims = np.asarray(dims) * rng.uniform(0.85, 1.15, 3)
        lo = np.array([rng.uniform(0.1, size[0] - dims[0] - 0.1), rng.uniform(0.1, size[1] - dims[1] - 0.1), 0.0])
        if against_wall:
            lo[1] = size[1] - dims[1] - 0.02
        objects.append((lo, lo + dims, name))
        return lo, lo + dims

    def wall_box(name, width, z0, z1):
        x0 = rng.uniform(0.2, size[0] - width - 0.2)
        objects.append((np.array([x0, size[1] - 0.04, z0]), np.array([x0 + width, size[1] - 0.001, z1]), name))

    if rng.random() < 0.7:
        lo, hi = floor_box("bed", (2.0, 1.5, 0.5))
        p = np.array([lo[0] + 0.1, lo[1] + 0.1, hi[2]])
        objects.append((p, p + [0.6, 0.4, 0.15], "pillow"))
    if rng.random() < 0.8:
        lo, hi = floor_box("table", (1.2, 0.8, 0.75))
        if rng.random() < 0.5:
            p = np.array([lo[0] + 0.2, lo[1] + 0.2, hi[2]])
            objects.append((p, p + [0.25, 0.25, 0.5], "lamp"))
        for _ in range(rng.integers(1, 3)):
            floor_box("chair", (0.5, 0.5, 0.9))
    if rng.random() < 0.6:
        floor_box("sofa", (2.0, 0.9, 0.8))
    if rng.random() < 0.7:
        lo, hi = floor_box("cabinet", (1.2, 0.5, 1.8), against_wall=True)
        if rng.random() < 0.7:
            objects.append((np.array([lo[0] + 0.1, lo[1] + 0.05, hi[2]]), np.array([lo[0] + 0.7, lo[1] + 0.3, hi[2] + 0.25]), "books"))
    wall_box("window", rng.uniform(0.8, 1.6), 0.9, 2.1)
    if rng.random() < 0.6:
        wall_box("picture", rng.uniform(0.4, 0.9), 1.3, 1.9)
    if rng.random() < 0.5:
        wall_box("television", rng.uniform(0.8, 1.2), 0.9, 1.5)
    if rng.random() < 0.5:
        wall_box("door", 0.9, 0.0, 2.05)
    return size, objects


def render_frame(rng: np.random.Generator, scale: int) -> dict[str, np.ndarray]:
    """One scene at the native size: rgb [H, W, 3] uint8, depth [H, W] metres, raw labels [H, W]
    uint16, instances [H, W] uint8."""
    h, w = NATIVE_HW[0] // scale, NATIVE_HW[1] // scale
    size, objects = _room(rng)
    origin = np.array([rng.uniform(0.25, 0.75) * size[0], rng.uniform(0.1, 0.3) * size[1], rng.uniform(1.2, 1.6)])
    rot = _yaw_pitch_rotation(np.pi / 2 + rng.uniform(-0.5, 0.5), -rng.uniform(0.1, 0.4))
    v, u = np.meshgrid((np.arange(h) + 0.5) * scale, (np.arange(w) + 0.5) * scale, indexing="ij")
    d_cam = np.stack([(u - CX) / FX, (v - CY) / FY, np.ones_like(u)], axis=-1).reshape(-1, 3)
    d = d_cam @ rot.T  # unnormalised: the hit distance t is the depth along the optical axis
    safe = np.where(np.abs(d) < 1e-9, 1e-9, d)
    # the room from inside: the nearest exit face
    t_face = np.where(safe > 0, (size - origin) / safe, (0 - origin) / safe)
    axis = t_face.argmin(axis=1)
    t = t_face.min(axis=1)
    hit_pos_face = origin + t[:, None] * d
    names = np.where(axis < 2, "wall", np.where(hit_pos_face[:, 2] < size[2] / 2, "floor", "ceiling")).astype(object)
    normal_axis = axis.copy()
    instance = np.where(axis < 2, 1, np.where(names == "floor", 2, 3)).astype(np.uint8)
    for k, (lo, hi, name) in enumerate(objects):
        t1, t2 = (lo - origin) / safe, (hi - origin) / safe
        near, far = np.minimum(t1, t2), np.maximum(t1, t2)
        t_near, t_far = near.max(axis=1), far.min(axis=1)
        hit = (t_far >= t_near) & (t_near > 0) & (t_near < t)
        t = np.where(hit, t_near, t)
        names[hit] = name
        normal_axis = np.where(hit, near.argmax(axis=1), normal_axis)
        instance[hit] = 4 + k
    # colour: base colour per class, per-instance jitter, Lambert shading, noise
    light = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    shade = 0.45 + 0.55 * np.abs(light[normal_axis])
    jitter = rng.uniform(0.8, 1.2, size=(256, 3))
    base = np.array([_CLASSES[n][1] for n in names], np.float64) * jitter[instance]
    rgb = base * shade[:, None] + rng.normal(0, 6, size=base.shape)
    depth = (t + rng.normal(0, 0.005, t.shape)).clip(0.05, None).astype(np.float32)
    labels = np.array([raw_id(_CLASSES[n][0]) for n in names], np.uint16)
    out = {"rgb": np.clip(rgb, 0, 255).astype(np.uint8).reshape(h, w, 3), "depth": depth.reshape(h, w),
           "labels": labels.reshape(h, w), "instances": instance.reshape(h, w)}
    out = {k: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1) for k, a in out.items()}
    out["labels"][:BORDER], out["labels"][-BORDER:], out["labels"][:, :BORDER], out["labels"][:, -BORDER:] = 0, 0, 0, 0
    return out


def _mat73_header() -> bytes:
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {time.strftime('%a %b %d %H:%M:%S %Y', time.gmtime(0))} HDF5 schema 1.00 ."
    return text.encode().ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"


def write_labeled(path: Path, frames: list[dict[str, np.ndarray]]) -> None:
    """Write frames as a MATLAB v7.3 labeled file: every array axis-reversed as MATLAB stores it."""
    n = len(frames)
    h, w = frames[0]["depth"].shape
    with h5py.File(path, "w", userblock_size=512, libver="earliest") as f:
        spec = {"images": ((n, 3, w, h), np.uint8, "uint8"), "depths": ((n, w, h), np.float32, "single"),
                "rawDepths": ((n, w, h), np.float32, "single"), "labels": ((n, w, h), np.uint16, "uint16"),
                "instances": ((n, w, h), np.uint8, "uint8")}
        for name, (shape, dtype, mclass) in spec.items():
            ds = f.create_dataset(name, shape=shape, dtype=dtype, chunks=(1,) + shape[1:], compression="gzip", compression_opts=1, shuffle=True)
            ds.attrs["MATLAB_class"] = np.bytes_(mclass)
        for i, fr in enumerate(frames):
            f["images"][i] = fr["rgb"].transpose(2, 1, 0)
            f["depths"][i] = fr["depth"].T
            f["rawDepths"][i] = fr["raw_depth"].T
            f["labels"][i] = fr["labels"].T
            f["instances"][i] = fr["instances"].T
    with open(path, "r+b") as fh:  # MATLAB's header in the user block (h5py leaves it zeroed)
        fh.write(_mat73_header())


def generate(raw_dir: Path, frames: int = 40, train_frames: int = 24, seed: int = 0, render_scale: int = 4) -> None:
    """Write nyu_depth_v2_labeled.mat and splits.mat for `frames` rendered scenes into raw_dir."""
    from scipy.io import savemat

    raw_dir = Path(raw_dir)
    rng = np.random.default_rng(seed)
    rendered = []
    for _ in range(frames):
        fr = render_frame(rng, render_scale)
        block = rng.random((NATIVE_HW[0] // 8, NATIVE_HW[1] // 8)) < 0.03  # missing returns, in 8 x 8 blocks
        holes = np.repeat(np.repeat(block, 8, axis=0), 8, axis=1) | (fr["depth"] > 5.5)
        fr["raw_depth"] = np.where(holes, 0.0, fr["depth"]).astype(np.float32)
        rendered.append(fr)
    write_labeled(raw_dir / LABELED, rendered)
    train = np.sort(rng.choice(frames, size=train_frames, replace=False)) + 1
    test = np.setdiff1d(np.arange(1, frames + 1), train)
    savemat(raw_dir / SPLITS, {"trainNdxs": train.astype(np.float64)[:, None], "testNdxs": test.astype(np.float64)[:, None]})


# ----------------------------------------------------------------------------- the dataset

def validate(cfg: Mapping[str, Any], key: str) -> None:
    """Check `data.<nyudv2 sample>` (without `sample:`: the real data's settings, the reader's check)."""
    if "sample" not in cfg:
        nyudv2.validate(cfg, key)
        return
    nyudv2.validate_prepare(cfg, key)
    validate_sample(cfg["sample"], f"{key}.sample")


def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True) -> None:
    """Generate the sample's two files into `raw_dir`, check and record them as the reader does
    for the real files (without `sample:`: the reader's download)."""
    from cmkd.data.download import sha256_file

    if "sample" not in cfg:
        nyudv2.download(cfg, raw_dir, progress)
        return
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    validate_sample(cfg["sample"], "data.<nyudv2 sample>.sample")
    generate(raw_dir, **cfg["sample"])
    # the generator's module name as recorded since the sample existed (the raw files stay identical)
    source: dict[str, Any] = {"generated": "cmkd.data.nyudv2_sample", "params": dict(cfg["sample"]),
                              "labeled": {"sha256": sha256_file(raw_dir / LABELED)},
                              "splits": {"sha256": sha256_file(raw_dir / SPLITS)}}
    nyudv2.record_download(raw_dir, source)


@register_dataset("nyudv2-sample")
def prepare(cfg: Mapping[str, Any], raw_dir: Path, out_path: Path, progress: bool = True) -> None:
    """The generated files are prepared by the real reader."""
    nyudv2.prepare(cfg, raw_dir, out_path, progress)
