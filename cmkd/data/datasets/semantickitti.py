"""SemanticKITTI: readers for its exact file formats, and the camera -> LiDAR `prepare`.

Layout (KITTI odometry + SemanticKITTI labels, merged)::

    dataset/sequences/NN/velodyne/FFFFFF.bin    float32 [N, 4] x, y, z, remission
    dataset/sequences/NN/labels/FFFFFF.label    uint32 [N]: semantic = low 16 bits, instance = high 16
    dataset/sequences/NN/image_2/FFFFFF.png     left colour image; sizes differ per sequence
    dataset/sequences/NN/calib.txt              "P2: 12 numbers", "Tr: 12 numbers" (3x4 each)
    dataset/sequences/NN/poses.txt              optional

`prepare` turns every scan into one row of the prepared HDF5 file (cmkd.data.h5):

    rgb     [3, h, w]  uint8: the camera pixels as read; the file attribute `normalise`
                       tells loaders to use (x / 255 - rgb_mean) / rgb_std (cmkd.training.data applies it)
    lidar   [5, h, w]  range, x, y, z, intensity of the point nearest to the camera in each
                       pixel, (value - lidar_mean) / lidar_std, 0 where no point falls
                       (+3 channels nx, ny, nz when `normals` is on); float32 or float16
                       (`dtype`; seg_resnet casts its input)
    labels  [h, w]     int8: 0..18 the 19 classes of `learning_map`, -1 = unlabelled or no point
    valid   [h, w]     uint8: 1 where a LiDAR point falls (labelled or not)
    scan    []         int32: sequence * 1_000_000 + frame, the source scan of the row
    range, range_labels  [5, 64, W] (`dtype`), [64, W] int8: the spherical range image, when
                       `range_image` is on

The narrow dtypes are there because, after PNG decoding, the bytes written are `prepare`'s
largest cost (the kernel copies every byte into the page cache): a 256 x 1024 scan is
3.75 MiB with float16 LiDAR (4.75 MiB with the float16 RGB and int16 labels stored before),
and uint8 RGB is exact where float16 rounded it.

h x w is the crop (`crop.<split>`): a random window per training scan (seeded by
seed, sequence and frame, so it does not depend on worker scheduling) and the centre window
for the other splits. The normalisation constants are recorded in the file attributes.

With several workers each scan is processed straight into a shared-memory buffer that the
main process writes to HDF5 from, so rows never travel through a pipe (see `iter_prepared`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import mmap
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cmkd.data.registry import register_dataset
from cmkd.data.download import fetch, sha256_file, source_roots
from cmkd.data.h5 import PreparedWriter
from cmkd.errors import ConfigError, DataFormatError
from cmkd.utils.parallel import (
    available_cores, die_with_parent, keep_freed_memory, pid_named_semaphores, remove_dead_shm, shm_name,
)
from cmkd.data.geometry import LIDAR_CHANNELS, lidar_image, range_projection

log = logging.getLogger("cmkd.data.semantickitti")  # the public module name

# --------------------------------------------------------------------------- semantic-kitti.yaml
# The official label definitions (semantic-kitti-api, config/semantic-kitti.yaml), as data.

LABELS: dict[int, str] = {
    0: "unlabeled", 1: "outlier", 10: "car", 11: "bicycle", 13: "bus", 15: "motorcycle",
    16: "on-rails", 18: "truck", 20: "other-vehicle", 30: "person", 31: "bicyclist",
    32: "motorcyclist", 40: "road", 44: "parking", 48: "sidewalk", 49: "other-ground",
    50: "building", 51: "fence", 52: "other-structure", 60: "lane-marking", 70: "vegetation",
    71: "trunk", 72: "terrain", 80: "pole", 81: "traffic-sign", 99: "other-object",
    252: "moving-car", 253: "moving-bicyclist", 254: "moving-person", 255: "moving-motorcyclist",
    256: "moving-on-rails", 257: "moving-bus", 258: "moving-truck", 259: "moving-other-vehicle",
}

# BGR, as in the yaml.
COLOR_MAP_BGR: dict[int, tuple[int, int, int]] = {
    0: (0, 0, 0), 1: (0, 0, 255), 10: (245, 150, 100), 11: (245, 230, 100), 13: (250, 80, 100),
    15: (150, 60, 30), 16: (255, 0, 0), 18: (180, 30, 80), 20: (255, 0, 0), 30: (30, 30, 255),
    31: (200, 40, 255), 32: (90, 30, 150), 40: (255, 0, 255), 44: (255, 150, 255), 48: (75, 0, 75),
    49: (75, 0, 175), 50: (0, 200, 255), 51: (50, 120, 255), 52: (0, 150, 255), 60: (170, 255, 150),
    70: (0, 175, 0), 71: (0, 60, 135), 72: (80, 240, 150), 80: (150, 240, 255), 81: (0, 0, 255),
    99: (255, 255, 50), 252: (245, 150, 100), 256: (255, 0, 0), 253: (200, 40, 255),
    254: (30, 30, 255), 255: (90, 30, 150), 257: (250, 80, 100), 258: (180, 30, 80), 259: (255, 0, 0),
}

# Raw id -> training id; 0 is "unlabelled" (ignored), 1..19 the classes.
LEARNING_MAP: dict[int, int] = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8,
    40: 9, 44: 10, 48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17,
    80: 18, 81: 19, 99: 0, 252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}

LEARNING_MAP_INV: dict[int, int] = {
    0: 0, 1: 10, 2: 11, 3: 15, 4: 18, 5: 20, 6: 30, 7: 31, 8: 32, 9: 40, 10: 44, 11: 48,
    12: 49, 13: 50, 14: 51, 15: 70, 16: 71, 17: 72, 18: 80, 19: 81,
}

# The 19 classes, in the order of the prepared labels 0..18 (= learning_map ids 1..19).
CLASS_NAMES: list[str] = [LABELS[LEARNING_MAP_INV[i]] for i in range(1, 20)]

OFFICIAL_SPLIT: dict[str, list[int]] = {"train": [0, 1, 2, 3, 4, 5, 6, 7, 9, 10], "val": [8]}

# Image sizes (width, height) of the KITTI odometry colour sequences; read per image anyway.
KITTI_IMAGE_SIZES = {(1241, 376): [0, 1, 2], (1242, 375): [3], (1226, 370): [4, 5, 6, 7, 8, 9, 10]}

# Normalisation defaults: ImageNet statistics for RGB; RangeNet++'s SemanticKITTI statistics
# (range, x, y, z, remission) for the LiDAR channels.
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
LIDAR_MEAN = (12.12, 10.88, 0.23, -1.04, 0.21)
LIDAR_STD = (12.32, 11.47, 6.91, 0.86, 0.16)

_MAP_LUT_SIZE = 1 << 16
# learning_map as a lookup table over all uint16 ids: -2 = not in the map, -1 = ignore, 0..18.
_LUT = np.full(_MAP_LUT_SIZE, -2, np.int16)
for _raw, _train in LEARNING_MAP.items():
    _LUT[_raw] = _train - 1


# --------------------------------------------------------------------------- readers

def read_scan(path: str | Path) -> np.ndarray:
    """A velodyne scan: float32 [N, 4] (x, y, z, remission)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "scan file does not exist")
    size = path.stat().st_size
    if size == 0 or size % 16:
        raise DataFormatError(path, f"size {size} bytes is not a positive multiple of 16 (4 float32 per point): truncated scan?")
    points = np.fromfile(path, dtype="<f4").reshape(-1, 4)
    if not np.isfinite(points).all():  # one check over the whole array, not per row
        bad = ~np.isfinite(points[:, :3]).all(axis=1)
        if bad.any():
            raise DataFormatError(path, f"{int(bad.sum())} point(s) with NaN or infinite coordinates (first at row {int(np.argmax(bad))})")
        row = int(np.argmax(~np.isfinite(points[:, 3])))
        raise DataFormatError(path, f"NaN or infinite remission (first at row {row})")
    return points


def read_labels(path: str | Path, n_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A label file: (semantic, instance), uint16 [N] each (low and high 16 bits of uint32)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "label file does not exist")
    size = path.stat().st_size
    if size % 4:
        raise DataFormatError(path, f"size {size} bytes is not a multiple of 4 (one uint32 per point)")
    raw = np.fromfile(path, dtype="<u4")
    if n_points is not None and len(raw) != n_points:
        raise DataFormatError(path, f"has {len(raw)} labels but the scan has {n_points} points")
    return (raw & 0xFFFF).astype(np.uint16), (raw >> 16).astype(np.uint16)


def map_labels(semantic: np.ndarray, path: str | Path = "<labels>") -> np.ndarray:
    """Raw semantic ids -> int16 training labels (0..18, -1 = ignore) through `learning_map`."""
    mapped = _LUT[np.asarray(semantic, np.uint16)]
    if (mapped == -2).any():
        unknown = np.unique(np.asarray(semantic)[mapped == -2])
        raise DataFormatError(path, f"label id(s) {unknown[:10].tolist()} are not in learning_map")
    return mapped


def read_calib(path: str | Path) -> dict[str, np.ndarray]:
    """calib.txt: every "KEY: numbers" line; P2 as [3, 4] and Tr as [4, 4] (velodyne -> camera 0)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "calibration file does not exist")
    values: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        if not sep:
            raise DataFormatError(path, f"line {lineno} is not 'KEY: numbers'")
        try:
            values[key.strip()] = np.array(rest.split(), np.float64)
        except ValueError as err:
            raise DataFormatError(path, f"line {lineno} ({key.strip()}): {err}") from err
    calib = {}
    for key in ("P2", "Tr"):
        if key not in values:
            raise DataFormatError(path, f"has no {key} entry")
        if values[key].size != 12:
            raise DataFormatError(path, f"{key} has {values[key].size} numbers, expected 12 (3x4)")
        calib[key] = values[key].reshape(3, 4)
    calib["Tr"] = np.vstack([calib["Tr"], [0.0, 0.0, 0.0, 1.0]])
    return calib


def read_image(path: str | Path) -> np.ndarray:
    """A colour image as uint8 [H, W, 3]; its own size (sizes differ per sequence)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "image file does not exist (every scan needs its image_2 image)")
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except OSError as err:
        raise DataFormatError(path, f"not a readable image ({err})") from err


# KITTI's principal points lie within 4 % of the image centre; a resized image moves the centre
# by a quarter of the image or more (half size: 50 %), so this bound separates the two.
_CENTRE_TOLERANCE = 0.15


def check_image_fits_calib(path: str | Path, width: int, height: int, P2: np.ndarray) -> None:
    """The image must have the size its calibration implies: P2's principal point near its
    centre. A resized image (its calib.txt made for the original size) would project the LiDAR
    points to the wrong pixels without any error."""
    cx, cy = float(P2[0, 2]) / float(P2[2, 2] or 1.0), float(P2[1, 2]) / float(P2[2, 2] or 1.0)
    if abs(cx - width / 2) > _CENTRE_TOLERANCE * width or abs(cy - height / 2) > _CENTRE_TOLERANCE * height:
        raise DataFormatError(path, f"image is {width}x{height} but its sequence's calib.txt (principal point "
                                    f"{cx:.1f}, {cy:.1f}) is for an image of about {2 * cx:.0f}x{2 * cy:.0f}: "
                                    "resized image, or calibration of another sequence")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image, from its header only."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "image file does not exist (every scan needs its image_2 image)")
    try:
        with Image.open(path) as img:
            return img.size
    except OSError as err:
        raise DataFormatError(path, f"not a readable image ({err})") from err


# --------------------------------------------------------------------------- layout

def sequence_name(seq: int | str) -> str:
    return f"{int(seq):02d}"


@dataclass(frozen=True)
class ScanRecord:
    sequence: str
    frame: int
    scan: Path
    label: Path
    image: Path
    calib: Path


def sequences_dirs(roots: Sequence[Path]) -> list[Path]:
    """Every `sequences` folder found in the roots (root/dataset/sequences, root/sequences)."""
    found = []
    for root in roots:
        for candidate in (root / "dataset" / "sequences", root / "sequences", root):
            if candidate.name == "sequences" and candidate.is_dir():
                found.append(candidate)
                break
    return found


def _locate(seq_dirs: Sequence[Path], seq: str, rel: str) -> Path | None:
    # Velodyne, labels, calib and images may come from different archives or folders.
    for base in seq_dirs:
        if (base / seq / rel).exists():
            return base / seq / rel
    return None


def list_scans(roots: Sequence[Path], sequences: Sequence[int | str], frame_step: int = 1,
               max_scans: int | None = None) -> list[ScanRecord]:
    """The scans of `sequences`, in (sequence, frame) order, every `frame_step`-th frame.

    Raises DataFormatError naming the missing folder or file (a sequence without velodyne
    scans, its labels, calib.txt or an image of a scan).
    """
    seq_dirs = sequences_dirs(roots)
    if not seq_dirs:
        raise DataFormatError(roots[0] if roots else Path("."), "no 'sequences' folder found (expected dataset/sequences/NN/...)")
    records = []
    for seq in map(sequence_name, sequences):
        velodyne = _locate(seq_dirs, seq, "velodyne")
        if velodyne is None:
            raise DataFormatError(seq_dirs[0] / seq / "velodyne", f"sequence {seq} has no velodyne folder")
        labels = _locate(seq_dirs, seq, "labels") or seq_dirs[0] / seq / "labels"
        images = _locate(seq_dirs, seq, "image_2") or seq_dirs[0] / seq / "image_2"
        calib = _locate(seq_dirs, seq, "calib.txt") or seq_dirs[0] / seq / "calib.txt"
        if not calib.is_file():
            raise DataFormatError(calib, f"sequence {seq} has no calib.txt")
        frames = sorted(int(p.stem) for p in velodyne.glob("*.bin"))
        if not frames:
            raise DataFormatError(velodyne, "no .bin scans")
        for frame in frames[::frame_step]:
            name = f"{frame:06d}"
            record = ScanRecord(seq, frame, velodyne / f"{name}.bin", labels / f"{name}.label",
                                images / f"{name}.png", calib)
            if not record.label.is_file():
                raise DataFormatError(record.label, f"label file missing for scan {record.scan}")
            if not record.image.is_file():
                raise DataFormatError(record.image, f"image missing for scan {record.scan}")
            records.append(record)
    return records[:max_scans] if max_scans else records


# --------------------------------------------------------------------------- per-scan work

def scan_id(sequence: int | str, frame: int) -> int:
    """The `scan` column of the prepared file: sequence * 1_000_000 + frame."""
    return int(sequence) * 1_000_000 + int(frame)


@dataclass(frozen=True)
class PrepareSettings:
    crop: tuple[int, int]               # (height, width)
    random_crop: bool
    seed: int = 0
    dtype: str = "float32"
    rgb_mean: tuple[float, ...] = RGB_MEAN
    rgb_std: tuple[float, ...] = RGB_STD
    lidar_mean: tuple[float, ...] = LIDAR_MEAN
    lidar_std: tuple[float, ...] = LIDAR_STD
    voxel_size: float = 0.0
    outlier_neighbors: int = 0
    outlier_std_ratio: float = 2.0
    normals: bool = False
    normal_radius: float = 1.0
    range_image: bool = False
    range_size: tuple[int, int] = (64, 1024)
    fov: tuple[float, float] = (3.0, -25.0)


@functools.lru_cache(maxsize=64)
def _calib_by_version(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    return read_calib(path)


def _calib_cached(path: Path) -> dict[str, np.ndarray]:
    """read_calib once per sequence and worker (keyed by mtime too, so an edited file is re-read)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return read_calib(path)
    return _calib_by_version(str(path), st.st_mtime_ns, st.st_size)


def voxel_downsample_index(xyz: np.ndarray, voxel_size: float) -> np.ndarray:
    """Rows of the first point of every occupied voxel, in input order.

    A real point is kept per voxel (not Open3D's voxel mean) so it keeps its own label and
    remission.
    """
    keys = np.floor(xyz / voxel_size).astype(np.int64)
    _, first = np.unique(keys, axis=0, return_index=True)
    return np.sort(first)


def _open3d_filters(points: np.ndarray, s: PrepareSettings) -> tuple[np.ndarray, np.ndarray | None]:
    """Optional Open3D work: statistical outlier removal (returns the kept rows) and normals
    (of the kept points, in their order)."""
    keep = np.arange(len(points))
    normals = None
    if s.outlier_neighbors <= 0 and not s.normals:
        return keep, normals
    import open3d as o3d

    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points[:, :3].astype(np.float64)))
    if s.outlier_neighbors > 0:
        pcd, kept = pcd.remove_statistical_outlier(nb_neighbors=s.outlier_neighbors, std_ratio=s.outlier_std_ratio)
        keep = np.asarray(kept, np.int64)
    if s.normals:
        pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=s.normal_radius, max_nn=30))
        # Orient towards the sensor at the origin, so the sign of a normal means something.
        pcd.orient_normals_towards_camera_location(np.zeros(3))
        normals = np.asarray(pcd.normals, np.float32)
    return keep, normals


def crop_box(width: int, height: int, crop: tuple[int, int], rng: np.random.Generator | None, image: Path) -> tuple[int, int, int, int]:
    """(top, left, h, w): random when `rng` is given, else centred."""
    ch, cw = crop
    if ch > height or cw > width:
        raise DataFormatError(image, f"image is {width}x{height}, smaller than the crop {cw}x{ch} (width x height)")
    if rng is None:
        return (height - ch) // 2, (width - cw) // 2, ch, cw
    return int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1)), ch, cw


def row_spec(s: PrepareSettings) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array of a prepared row (see the module docstring)."""
    ch, cw = s.crop
    spec = {
        "rgb": ((3, ch, cw), np.dtype(np.uint8)),
        "lidar": ((len(LIDAR_CHANNELS) + (3 if s.normals else 0), ch, cw), np.dtype(s.dtype)),
        "labels": ((ch, cw), np.dtype(np.int8)),
        "valid": ((ch, cw), np.dtype(np.uint8)),
        "scan": ((), np.dtype(np.int32)),
    }
    if s.range_image:
        rh, rw = s.range_size
        spec["range"] = ((5, rh, rw), np.dtype(s.dtype))
        spec["range_labels"] = ((rh, rw), np.dtype(np.int8))
    return spec


def empty_row(s: PrepareSettings) -> dict[str, np.ndarray]:
    return {name: np.empty(shape, dtype) for name, (shape, dtype) in row_spec(s).items()}


def process_scan(record: ScanRecord, s: PrepareSettings, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One scan -> the arrays of one prepared row (see the module docstring).

    `out` (arrays as `row_spec`, e.g. a buffer reused from scan to scan) is filled instead of
    new arrays; every element is written.
    """
    points = read_scan(record.scan)
    semantic, _ = read_labels(record.label, len(points))
    labels = map_labels(semantic, record.label)
    calib = _calib_cached(record.calib)
    if s.voxel_size > 0:
        rows = voxel_downsample_index(points[:, :3], s.voxel_size)
        points, labels = points[rows], labels[rows]
    rows, normals = _open3d_filters(points, s)  # normals belong to the kept rows
    if len(rows) != len(points):
        points, labels = points[rows], labels[rows]

    image = read_image(record.image)
    height, width = image.shape[:2]
    check_image_fits_calib(record.image, width, height, calib["P2"])
    rng = np.random.default_rng([s.seed, int(record.sequence), record.frame]) if s.random_crop else None
    top, left, ch, cw = crop_box(width, height, s.crop, rng, record.image)

    row = empty_row(s) if out is None else out
    np.copyto(row["rgb"], image[top:top + ch, left:left + cw].transpose(2, 0, 1))
    lidar_image(points, calib["P2"], calib["Tr"], width, height, labels=labels, extra=normals,
                box=(top, left, ch, cw), mean=s.lidar_mean, std=s.lidar_std,
                out=(row["lidar"], row["labels"], row["valid"]))
    row["scan"][()] = scan_id(record.sequence, record.frame)
    if s.range_image:
        rh, rw = s.range_size
        rng_img, idx = range_projection(points, rh, rw, s.fov[0], s.fov[1])
        hit = idx >= 0
        src = points[idx[hit]]
        channels = np.zeros((5, rh, rw), np.float32)
        channels[0][hit] = rng_img[hit]
        channels[1:4, hit] = src[:, :3].T
        channels[4][hit] = src[:, 3]
        mean = np.asarray(s.lidar_mean, np.float32)[:, None, None]
        std = np.asarray(s.lidar_std, np.float32)[:, None, None]
        row["range"][...] = np.where(hit, (channels - mean) / std, 0.0)
        row["range_labels"].fill(-1)
        row["range_labels"][hit] = labels[idx[hit]]
    return row


# --------------------------------------------------------------------------- worker pool
#
# Rows reach the main process through shared memory: it owns a ring of buffers ("slots", one
# per scan in flight plus the row being written), a worker processes its scan straight into the
# slot it is given and sends back only where the arrays lie, and the main process writes the
# HDF5 file from views of the slot before handing the slot out again. No row is pickled,
# piped or unpickled, and a row's arrays are not allocated anew for every scan.

_ALIGN = 64  # bytes: every array in a slot starts at a multiple

_Fields = tuple[tuple[str, str, tuple[int, ...], int], ...]  # (name, dtype, shape, byte offset)

# Worker-process state: the settings are sent once per worker, not with every scan; a slot is
# attached once per worker and kept.
_WORKER_SETTINGS: dict[str, PrepareSettings] = {}
_WORKER_SLOTS: dict[str, SharedMemory] = {}


def _init_worker(settings: dict[str, PrepareSettings]) -> None:
    die_with_parent()  # the forkserver, which ends with the stage: no worker outlives a kill
    _WORKER_SETTINGS.clear()
    _WORKER_SETTINGS.update(settings)
    # A scan allocates and frees some 15 MB of temporaries (points in float64, masks, the
    # decoded image). By default glibc returns freed memory to the system and serves large
    # arrays with fresh mappings, so every scan page-faults ~900 zeroed pages: about a third of
    # a worker's CPU time. Keeping freed memory for reuse (up to the worker's peak) avoids it.
    keep_freed_memory(mmap_threshold=32 << 20, trim_threshold=256 << 20)


def _layout(s: PrepareSettings) -> tuple[_Fields, int]:
    """Where the arrays of a row lie in a slot, and the bytes the row needs."""
    fields, size = [], 0
    for name, (shape, dtype) in row_spec(s).items():
        fields.append((name, dtype.str, shape, size))
        size += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return tuple(fields), size


def _views(buffer: Any, fields: _Fields) -> dict[str, np.ndarray]:
    # frombuffer holds the buffer (a view keeps its mapping alive), unlike ndarray(buffer=).
    return {name: np.frombuffer(buffer, dtype, math.prod(shape), offset).reshape(shape)
            for name, dtype, shape, offset in fields}


@dataclass(frozen=True)
class _Failure:
    """A worker's DataFormatError, sent back as data: the error's own pickling would lose
    its (path, problem) arguments."""

    kind: type
    path: str
    problem: str


@dataclass(frozen=True)
class _InSlot:
    """A row a worker wrote into its slot."""

    fields: _Fields


def _work(job: tuple[str, ScanRecord, str | None]) -> _InSlot | dict[str, np.ndarray] | _Failure:
    """Worker: one scan into the slot named by the job; returned as arrays when there is no
    slot or the row does not fit in it."""
    split, record, slot = job
    s = _WORKER_SETTINGS[split]
    fields, size = _layout(s)
    try:
        if slot is not None and slot not in _WORKER_SLOTS:
            _WORKER_SLOTS[slot] = SharedMemory(slot)
        if slot is None or size > _WORKER_SLOTS[slot].size:
            return process_scan(record, s)
        process_scan(record, s, out=_views(_WORKER_SLOTS[slot].buf, fields))
        return _InSlot(fields)
    except DataFormatError as err:
        return _Failure(type(err), str(err.path), err.problem)


class _Slots:
    """The main process's ring of shared-memory slots of `size` bytes, unlinked by `close`.

    Their pages are reserved up front, so a full /dev/shm fails here rather than with SIGBUS
    in a worker. Rows are views of the main process's own mapping of each slot, which stays
    mapped as long as a view of it does: `close` never waits for the caller's rows.
    """

    def __init__(self, count: int, size: int):
        self._shms: list[SharedMemory] = []
        self.maps: list[mmap.mmap] = []
        try:
            for _ in range(count):
                shm = SharedMemory(name=shm_name(), create=True, size=size)  # named by owner PID
                self._shms.append(shm)
                # SharedMemory has no public descriptor, and its own mapping could not be
                # closed while rows view it: map the segment again and close that one now.
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(shm._fd, 0, size)
                self.maps.append(mmap.mmap(shm._fd, size))
                shm.close()
        except BaseException:
            self.close()
            raise
        self.names = [shm.name for shm in self._shms]
        self.free = collections.deque(range(count))

    def close(self) -> None:
        for shm in self._shms:
            shm.close()
            shm.unlink()
        self._shms = []


def iter_prepared(jobs: Sequence[tuple[str, ScanRecord]], settings: dict[str, PrepareSettings],
                  workers: int, ahead: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """Processed rows in job order, computed by `workers` processes (in-process when 1).

    A row's arrays are views of a buffer that is reused: they hold until the next row is asked
    for, so copy what must outlive that. At most `ahead` scans per worker are in flight, so
    memory stays bounded however slowly the caller writes. On an error the pending scans are
    cancelled and the running ones finish before the error propagates (no terminate(), whose
    races can hang a Pool); the shared memory is unlinked whatever happens.
    """
    if workers <= 1 or len(jobs) <= 1:
        buffers = {split: empty_row(s) for split, s in settings.items()}
        for split, record in jobs:
            yield process_scan(record, settings[split], out=buffers[split])
        return
    in_flight = ahead * workers
    remove_dead_shm()  # what a killed run left in /dev/shm (its resource tracker died with it)
    # forkserver: workers start from a clean process (no threads or torch state inherited from
    # the caller), once, and the settings travel once per worker through the initializer.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else None)
    with contextlib.ExitStack() as stack:
        try:
            slots: _Slots | None = _Slots(in_flight + 1, max(_layout(s)[1] for s in settings.values()))
            stack.callback(slots.close)  # runs after the pool's shutdown: no worker writes any more
        except OSError as err:  # e.g. a container's small /dev/shm
            slots = None
            log.warning("no shared memory for the rows (%s): they are sent through a pipe", err)
        with pid_named_semaphores():  # the pool's queue semaphores stay named until shutdown
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(settings,))
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        pending: collections.deque = collections.deque()

        def submit(job: tuple[str, ScanRecord]) -> None:
            i = slots.free.popleft() if slots is not None else None
            pending.append((i, pool.submit(_work, (*job, None if i is None else slots.names[i]))))

        todo = iter(jobs)
        for job in itertools.islice(todo, in_flight):
            submit(job)
        while pending:
            i, future = pending.popleft()
            result = future.result()
            for job in itertools.islice(todo, 1):
                submit(job)  # into the one free slot: the row yielded below keeps its own
            if isinstance(result, _Failure):
                raise result.kind(result.path, result.problem)
            yield _views(slots.maps[i], result.fields) if isinstance(result, _InSlot) else result
            if i is not None:
                slots.free.append(i)


# --------------------------------------------------------------------------- config

def _pair(cfg: Mapping[str, Any], key: str, name: str) -> tuple[int, int]:
    value = cfg.get(name)
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ConfigError(f"{key}.{name}", f"must be [height, width] of positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def split_sequences(cfg: Mapping[str, Any], key: str) -> dict[str, list[str]]:
    split = cfg.get("split", OFFICIAL_SPLIT)
    if not isinstance(split, Mapping) or "train" not in split or "val" not in split:
        raise ConfigError(f"{key}.split", "must map split names (train, val, optional test) to lists of sequence numbers")
    out = {}
    for name, seqs in split.items():
        if name not in ("train", "val", "test"):
            raise ConfigError(f"{key}.split.{name}", "split names are train, val and test")
        if not isinstance(seqs, list) or not seqs:
            raise ConfigError(f"{key}.split.{name}", f"must be a non-empty list of sequence numbers, got {seqs!r}")
        try:
            out[name] = [sequence_name(s) for s in seqs]
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}.split.{name}", f"sequence numbers must be integers, got {seqs!r}") from err
    return out


def _crop_for(cfg: Mapping[str, Any], key: str, split: str) -> tuple[int, int]:
    crops = cfg.get("crop", {})
    if not isinstance(crops, Mapping):
        raise ConfigError(f"{key}.crop", "must map split names to [height, width]")
    name = split if split in crops else "val"
    return _pair(crops, f"{key}.crop", name)


def validate(cfg: Mapping[str, Any], key: str) -> None:
    splits = split_sequences(cfg, key)
    for split in splits:
        _crop_for(cfg, key, split)
    sources = cfg.get("sources", [])
    if not isinstance(sources, list):
        raise ConfigError(f"{key}.sources", "must be a list of {url|path, sha256} entries")
    if cfg.get("dtype", "float32") not in ("float16", "float32"):
        raise ConfigError(f"{key}.dtype", f"must be float16 or float32, got {cfg.get('dtype')!r}")
    for name, n in (("rgb_mean", 3), ("rgb_std", 3), ("lidar_mean", 5), ("lidar_std", 5)):
        value = cfg.get(name)
        if value is not None and (not isinstance(value, list) or len(value) != n):
            raise ConfigError(f"{key}.{name}", f"must be a list of {n} numbers")
        if value is not None and name.endswith("std") and min(value) <= 0:
            raise ConfigError(f"{key}.{name}", "standard deviations must be > 0")
    for name in ("frame_step",):
        if int(cfg.get(name, 1)) < 1:
            raise ConfigError(f"{key}.{name}", "must be >= 1")
    if float(cfg.get("voxel_size", 0.0)) < 0:
        raise ConfigError(f"{key}.voxel_size", "must be >= 0 (0 = off)")
    workers = cfg.get("workers")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"{key}.workers", "must be a non-negative integer (0 or null = all available cores)")


def settings_for(cfg: Mapping[str, Any], key: str, split: str) -> PrepareSettings:
    outliers = cfg.get("outlier_removal") or {}
    return PrepareSettings(
        crop=_crop_for(cfg, key, split),
        random_crop=split == "train" and bool(cfg.get("random_train_crop", True)),
        seed=int(cfg.get("seed", 0)),
        dtype=str(cfg.get("dtype", "float32")),
        rgb_mean=tuple(cfg.get("rgb_mean") or RGB_MEAN),
        rgb_std=tuple(cfg.get("rgb_std") or RGB_STD),
        lidar_mean=tuple(cfg.get("lidar_mean") or LIDAR_MEAN),
        lidar_std=tuple(cfg.get("lidar_std") or LIDAR_STD),
        voxel_size=float(cfg.get("voxel_size", 0.0)),
        outlier_neighbors=int(outliers.get("neighbors", 0)),
        outlier_std_ratio=float(outliers.get("std_ratio", 2.0)),
        normals=bool(cfg.get("normals", False)),
        normal_radius=float(cfg.get("normal_radius", 1.0)),
        range_image=bool(cfg.get("range_image", False)),
        range_size=tuple(cfg.get("range_size", (64, 1024))),
        fov=(float(cfg.get("fov_up", 3.0)), float(cfg.get("fov_down", -25.0))),
    )


# --------------------------------------------------------------------------- stages

def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True, key: str = "data.semantickitti") -> None:
    """Fetch the user's SemanticKITTI sources (URLs, local archives or extracted folders)."""
    sources = cfg.get("sources") or []
    if not sources:
        raise ConfigError(f"{key}.sources", "no sources given: list the URLs or local paths of the SemanticKITTI "
                                            "archives (velodyne, labels, calib, colour images) or of an extracted "
                                            "dataset folder; or use the offline dataset 'semantickitti-sample'")
    fetch(list(sources), raw_dir, progress=progress, key=f"{key}.sources",
          keep_downloads=bool(cfg.get("keep_downloads", False)), max_extract_bytes=cfg.get("max_extract_bytes"))


def source_checksum(raw_dir: Path) -> str:
    """Provenance for the prepared file: the sha256 of the download manifest."""
    manifest = Path(raw_dir) / "SOURCES.json"
    return sha256_file(manifest) if manifest.exists() else "unknown"


_CHUNK_BYTES = 4 << 20  # the HDF5 chunk size aimed at


@register_dataset("semantickitti")
def prepare(cfg: Mapping[str, Any], raw_dir: Path, out_path: Path, progress: bool = True,
            key: str = "data.semantickitti") -> None:
    """Read, project, crop and write every scan of every split, streamed into the HDF5 file."""
    validate(cfg, key)
    raw_dir = Path(raw_dir)
    roots = source_roots(raw_dir)
    splits = split_sequences(cfg, key)
    frame_step = int(cfg.get("frame_step", 1))
    max_scans = cfg.get("max_scans") or {}
    jobs: list[tuple[str, ScanRecord]] = []
    for split, seqs in splits.items():
        records = list_scans(roots, seqs, frame_step, max_scans.get(split) if isinstance(max_scans, Mapping) else None)
        jobs.extend((split, r) for r in records)
    settings = {split: settings_for(cfg, key, split) for split in splits}
    workers = int(cfg.get("workers") or 0) or available_cores()
    first = settings[next(iter(settings))]
    attrs = {
        "task": "segmentation",
        "class_names": CLASS_NAMES,
        "modalities": ["rgb", "lidar"],
        "teacher_modality": str(cfg.get("teacher_modality", "rgb")),
        "student_modality": str(cfg.get("student_modality", "lidar")),
        "ignore_index": -1,
        "source_checksum": source_checksum(raw_dir),
        "lidar_channels": list(LIDAR_CHANNELS) + (["nx", "ny", "nz"] if first.normals else []),
        # Loaders turn the stored uint8 RGB into (x / scale - mean) / std (cmkd.training.data.load_split).
        "normalise": {"rgb": {"scale": 255.0, "mean": list(first.rgb_mean), "std": list(first.rgb_std)}},
        "lidar_mean": list(first.lidar_mean), "lidar_std": list(first.lidar_std),
        "crops": {split: list(s.crop) for split, s in settings.items()},
        "splits": splits,
    }
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(jobs), desc="prepare semantickitti", unit="scan", disable=not progress))
        rows_iter = stack.enter_context(contextlib.closing(iter_prepared(jobs, settings, workers)))
        chunks: _Chunks | None = None
        for (split, _), row in zip(jobs, rows_iter):
            if chunks is None:
                # Rows of a few MB (full-size crops) get one row per chunk; small crops several.
                chunk_rows = max(1, min(64, _CHUNK_BYTES // max(1, sum(a.nbytes for a in row.values()))))
                chunks = _Chunks(stack.enter_context(PreparedWriter(out_path, attrs, chunk_rows=chunk_rows)))
            chunks.add(split, row)
            bar.update()
        if chunks is None:
            raise DataFormatError(raw_dir, "no scans to prepare")
        chunks.flush()


class _Chunks:
    """Rows gathered per split into whole HDF5 chunks before they are written (a row from
    `iter_prepared` only holds until the next one is asked for)."""

    def __init__(self, writer: PreparedWriter):
        self.writer = writer
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        self.filled: dict[str, int] = {}

    def add(self, split: str, row: Mapping[str, np.ndarray]) -> None:
        rows = self.writer.chunk_rows
        if rows == 1:  # full-size rows: written straight from the worker's buffer
            self.writer.append(split, {name: a[None] for name, a in row.items()})
            return
        if split not in self.arrays:
            self.arrays[split] = {name: np.empty((rows,) + a.shape, a.dtype) for name, a in row.items()}
        n = self.filled.get(split, 0)
        for name, a in row.items():
            self.arrays[split][name][n] = a
        self.filled[split] = n + 1
        if n + 1 == rows:
            self.flush(split)

    def flush(self, split: str | None = None) -> None:
        for name in [split] if split is not None else list(self.filled):
            n = self.filled.pop(name, 0)
            if n:
                self.writer.append(name, {k: a[:n] for k, a in self.arrays[name].items()})
