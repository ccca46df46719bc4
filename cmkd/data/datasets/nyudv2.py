"""NYU-Depth-V2 (Silberman et al., ECCV 2012): RGB <-> depth semantic segmentation (mIoU).

Sources (`data.<name>` in params.yaml), each a URL or a local path with an optional sha256:

* `labeled`: `nyu_depth_v2_labeled.mat`, the 1449 densely labelled frames. A MATLAB v7.3
  file, i.e. HDF5 (read with h5py). MATLAB stores arrays column-major, so h5py sees every
  axis reversed: `images` [N, 3, W, H] uint8, `depths` [N, W, H] float (metres, in-painted),
  `labels` [N, W, H] uint16 (0 = unlabeled, 1..894 = the raw classes of `names`); frame i is
  `images[i].transpose(2, 1, 0)` -> [H, W, 3] (480 x 640 in the real file).
* `splits`: `splits.mat` of the authors' toolbox (a MATLAB v5 file; v7.3 is read too):
  `trainNdxs` (795) and `testNdxs` (654), 1-based frame numbers - the standard split.

`prepare` aligns the three arrays of every frame, resizes them to `image_size` [H, W]
(RGB bilinear; depth and labels nearest), maps the raw labels to the 40-class (Gupta et al.)
or 13-class (Couprie et al.) set (`classes`; `cmkd.data.datasets.nyudv2_classes`), carves a seeded
validation part (`val_fraction` of the training frames, `split_seed`) from the 795 training
frames, and writes the project's HDF5 file (cmkd.data.h5)::

    /<train|val|test>/rgb         [N, 3, H, W] uint8
    /<train|val|test>/depth       [N, 1, H, W] float32, metres
    /<train|val|test>/labels      [N, H, W] int8, class index or -1 (unlabeled)
    /<train|val|test>/frame       [N] int64, the 1-based frame number in the labeled file

with attrs `normalise` (per-channel mean / std of the training frames; loaders standardise
each batch), task `segmentation` and `teacher_modality` / `student_modality` from params:
rgb -> depth (the papers' direction) or depth -> rgb.

Bad input - a file that is not HDF5, a missing dataset, shapes that do not agree, raw labels
outside 0..894, split indices out of range or overlapping, a checksum mismatch - raises a
DataFormatError / ChecksumError naming the file; the stages write nothing in that case.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
from PIL import Image

from cmkd.utils.atomic import write_json
from cmkd.data.h5 import PreparedWriter
from cmkd.data.datasets.nyudv2_classes import NUM_RAW_CLASSES, class_names, raw_to_train_ids
from cmkd.errors import ChecksumError, ConfigError, DataFormatError

log = logging.getLogger(__name__)

LABELED = "nyu_depth_v2_labeled.mat"
SPLITS = "splits.mat"
SOURCE = "nyudv2_source.json"
LABELED_URL = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat"
SPLITS_URL = "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat"
MODALITIES = {"rgb": 3, "depth": 1}
STANDARD_COUNTS = {"frames": 1449, "train": 795, "test": 654}
_WRITE_ROWS = 32


# ----------------------------------------------------------------------------- params

def validate(cfg: Mapping[str, Any], key: str) -> None:
    """Check `data.<nyudv2 dataset>`; errors name the offending key."""
    validate_prepare(cfg, key)
    if "sample" in cfg:
        from cmkd.data.samples import nyudv2 as nyudv2_sample

        nyudv2_sample.validate(cfg["sample"], f"{key}.sample")
        return
    from cmkd.data.download import _check_source

    for name in ("labeled", "splits"):
        if not isinstance(cfg.get(name), Mapping):
            url = LABELED_URL if name == "labeled" else SPLITS_URL
            raise ConfigError(f"{key}.{name}", f"give the file as {{url: ..., sha256: ...}} or {{path: ...}} (official: {url}); see docs/nyudv2.md")
        _check_source(cfg[name], f"{key}.{name}")


def validate_prepare(cfg: Mapping[str, Any], key: str) -> None:
    if cfg.get("classes", 40) not in (13, 40):
        raise ConfigError(f"{key}.classes", f"must be 40 (Gupta et al.) or 13 (Couprie et al.), got {cfg.get('classes')!r}")
    size = cfg.get("image_size", [240, 320])
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(s, int) and s >= 8 for s in size):
        raise ConfigError(f"{key}.image_size", f"must be [height, width], integers >= 8, got {size!r}")
    frac = cfg.get("val_fraction", 0.1)
    if not isinstance(frac, (int, float)) or not 0 < float(frac) < 1:
        raise ConfigError(f"{key}.val_fraction", f"must lie in (0, 1), got {frac!r}")
    if not isinstance(cfg.get("split_seed", 0), int):
        raise ConfigError(f"{key}.split_seed", f"must be an integer, got {cfg.get('split_seed')!r}")
    for field in ("teacher_modality", "student_modality"):
        if cfg.get(field) not in MODALITIES:
            raise ConfigError(f"{key}.{field}", f"must be one of {sorted(MODALITIES)}, got {cfg.get(field)!r}")
    if cfg["teacher_modality"] == cfg["student_modality"]:
        raise ConfigError(f"{key}.student_modality", "must differ from teacher_modality (rgb -> depth or depth -> rgb)")


# ----------------------------------------------------------------------------- file formats

def open_labeled(path: str | Path) -> tuple[h5py.File, int, int, int]:
    """Open the labeled .mat and check its layout: (file, N, H, W)."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, "the NYU-Depth-V2 labeled file is missing (run the download stage)")
    if not h5py.is_hdf5(path):
        raise DataFormatError(path, "not a MATLAB v7.3 (HDF5) file; nyu_depth_v2_labeled.mat is one")
    f = h5py.File(path, "r")
    try:
        missing = [k for k in ("images", "depths", "labels") if k not in f]
        if missing:
            raise DataFormatError(path, f"missing dataset(s) {missing}; the labeled file has images, depths and labels")
        images, depths, labels = f["images"], f["depths"], f["labels"]
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataFormatError(path, f"images must be [N, 3, W, H] (MATLAB H x W x 3 x N), got shape {images.shape}")
        n, _, w, h = images.shape
        for name, ds in (("depths", depths), ("labels", labels)):
            if ds.shape != (n, w, h):
                raise DataFormatError(path, f"{name} must be [N, W, H] = {(n, w, h)} like images, got shape {ds.shape}")
        if images.dtype != np.uint8:
            raise DataFormatError(path, f"images must be uint8, got {images.dtype}")
        if depths.dtype.kind != "f":
            raise DataFormatError(path, f"depths must be floating point (metres), got {depths.dtype}")
        if labels.dtype.kind not in "ui":
            raise DataFormatError(path, f"labels must be integers, got {labels.dtype}")
        if n == 0:
            raise DataFormatError(path, "holds no frames")
    except BaseException:
        f.close()
        raise
    return f, n, h, w


def read_frame(f: h5py.File, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame i (0-based) as rgb [H, W, 3] uint8, depth [H, W] float32 metres, raw labels [H, W]."""
    rgb = np.ascontiguousarray(f["images"][i].transpose(2, 1, 0))
    depth = np.ascontiguousarray(f["depths"][i].T, dtype=np.float32)
    labels = np.ascontiguousarray(f["labels"][i].T)
    return rgb, depth, labels


def read_splits(path: str | Path, n_frames: int) -> dict[str, np.ndarray]:
    """The standard split as 0-based frame indices {"train", "test"} (splits.mat is 1-based)."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, "the split file (splits.mat) is missing (run the download stage)")
    raw: dict[str, np.ndarray] = {}
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            raw = {k: f[k][()] for k in ("trainNdxs", "testNdxs") if k in f}
    else:
        from scipy.io import loadmat

        try:
            raw = {k: v for k, v in loadmat(path).items() if k in ("trainNdxs", "testNdxs")}
        except (ValueError, TypeError, OSError, NotImplementedError) as err:
            raise DataFormatError(path, f"not a readable MATLAB file ({err})") from err
    missing = [k for k in ("trainNdxs", "testNdxs") if k not in raw]
    if missing:
        raise DataFormatError(path, f"missing variable(s) {missing}; splits.mat holds trainNdxs and testNdxs")
    out = {}
    for split, name in (("train", "trainNdxs"), ("test", "testNdxs")):
        values = np.asarray(raw[name], dtype=np.float64).reshape(-1)
        if values.size == 0 or not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataFormatError(path, f"{name} must be a non-empty list of integer frame numbers")
        idx = values.astype(np.int64)
        if idx.min() < 1 or idx.max() > n_frames:
            raise DataFormatError(path, f"{name} must be 1-based frame numbers in 1..{n_frames}, found {idx.min()}..{idx.max()}")
        if len(np.unique(idx)) != len(idx):
            raise DataFormatError(path, f"{name} repeats frame numbers")
        out[split] = np.sort(idx - 1)
    overlap = np.intersect1d(out["train"], out["test"])
    if len(overlap):
        raise DataFormatError(path, f"trainNdxs and testNdxs share {len(overlap)} frame(s), e.g. {overlap[0] + 1}")
    if n_frames == STANDARD_COUNTS["frames"] and (len(out["train"]), len(out["test"])) != (STANDARD_COUNTS["train"], STANDARD_COUNTS["test"]):
        log.warning("%s: %d / %d train / test frames, not the standard 795 / 654", path, len(out["train"]), len(out["test"]))
    return out


def carve_validation(train: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): a seeded random `fraction` of the training frames (at least one) set aside."""
    perm = np.random.default_rng(seed).permutation(train)
    n_val = min(len(train) - 1, max(1, int(round(fraction * len(train)))))
    if n_val < 1:
        raise ValueError("need at least two training frames to carve a validation part")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def map_labels(raw: np.ndarray, lut: np.ndarray, path: Path, frame: int) -> np.ndarray:
    """Raw 0..894 labels -> class indices (-1 unlabeled) through the lookup table."""
    if raw.size and (int(raw.min()) < 0 or int(raw.max()) > NUM_RAW_CLASSES):
        raise DataFormatError(path, f"frame {frame}: label ids must lie in 0..{NUM_RAW_CLASSES}, found {int(raw.min())}..{int(raw.max())}")
    return lut[raw.astype(np.int64)].astype(np.int8)


def resize_frame(rgb: np.ndarray, depth: np.ndarray, labels: np.ndarray, hw: tuple[int, int]):
    """RGB bilinear, depth and labels nearest, to [H, W] = hw (no-op at the native size)."""
    h, w = hw
    if rgb.shape[:2] == (h, w):
        return rgb, depth, labels
    rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
    rows = (np.arange(h) * depth.shape[0] // h)[:, None]
    cols = (np.arange(w) * depth.shape[1] // w)[None, :]
    return rgb, depth[rows, cols], labels[rows, cols]


# ----------------------------------------------------------------------------- download

def _fetch_one(source: Mapping[str, Any], dest: Path, key: str, progress: bool) -> dict[str, Any]:
    """Bring one source file to `dest` (downloaded, or copied from a local path), verified."""
    from cmkd.data.download import _check_source, default_cache_dir, download, sha256_file

    source = _check_source(source, key)
    if "url" in source:
        got = download(source["url"], default_cache_dir(), progress=progress)
    else:
        got = Path(source["path"]).expanduser()
        if not got.is_file():
            raise DataFormatError(got, "source file does not exist")
    checksum = sha256_file(got)
    if source.get("sha256") and checksum.lower() != str(source["sha256"]).lower():
        raise ChecksumError(got, f"sha256 mismatch: expected {source['sha256']}, got {checksum}")
    shutil.copyfile(got, dest)
    return {**{k: str(v) for k, v in source.items() if k != "sha256"}, "sha256": checksum}


def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True) -> None:
    """Fill `raw_dir` with nyu_depth_v2_labeled.mat and splits.mat (fetched and verified, or,
    for the offline sample, generated), check their layout, and record where they came from."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    if "sample" in cfg:
        from cmkd.data.samples import nyudv2 as nyudv2_sample

        nyudv2_sample.validate(cfg["sample"], "data.<nyudv2 sample>.sample")
        nyudv2_sample.generate(raw_dir, **cfg["sample"])
        from cmkd.data.download import sha256_file

        source: dict[str, Any] = {"generated": "cmkd.data.nyudv2_sample", "params": dict(cfg["sample"]),
                                  "labeled": {"sha256": sha256_file(raw_dir / LABELED)}, "splits": {"sha256": sha256_file(raw_dir / SPLITS)}}
    else:
        validate(cfg, "data.<nyudv2 dataset>")
        source = {name: _fetch_one(cfg[name], raw_dir / file, f"data.<nyudv2 dataset>.{name}", progress)
                  for name, file in (("labeled", LABELED), ("splits", SPLITS))}
    f, n, _, _ = open_labeled(raw_dir / LABELED)
    f.close()
    read_splits(raw_dir / SPLITS, n)
    write_json(raw_dir / SOURCE, source)


# ----------------------------------------------------------------------------- prepare

def _load_frames(f, idx, lut, hw, path, progress, desc):
    from tqdm.auto import tqdm

    h, w = hw
    out = {"rgb": np.empty((len(idx), 3, h, w), np.uint8), "depth": np.empty((len(idx), 1, h, w), np.float32),
           "labels": np.empty((len(idx), h, w), np.int8), "frame": (np.asarray(idx) + 1).astype(np.int64)}
    for row, i in enumerate(tqdm(idx, desc=desc, disable=not progress, leave=False)):
        rgb, depth, raw = read_frame(f, int(i))
        if not np.all(np.isfinite(depth)) or float(depth.min(initial=0.0)) < 0:
            raise DataFormatError(path, f"frame {int(i) + 1}: depths must be finite metres >= 0")
        rgb, depth, raw = resize_frame(rgb, depth, raw, hw)
        out["rgb"][row] = rgb.transpose(2, 0, 1)
        out["depth"][row, 0] = depth
        out["labels"][row] = map_labels(raw, lut, path, int(i) + 1)
    return out


def _stats(x: np.ndarray, scale: float) -> dict[str, Any]:
    v = x.astype(np.float64) / scale
    std = v.std(axis=(0, 2, 3))
    return {"scale": scale, "mean": v.mean(axis=(0, 2, 3)).tolist(), "std": np.where(std > 1e-8, std, 1.0).tolist()}


def prepare(cfg: Mapping[str, Any], raw_dir: Path, out_path: Path, progress: bool = True) -> None:
    raw_dir, out_path = Path(raw_dir), Path(out_path)
    validate_prepare(cfg, "data.<nyudv2 dataset>")
    n_classes = int(cfg.get("classes", 40))
    hw = tuple(int(s) for s in cfg.get("image_size", [240, 320]))
    labeled = raw_dir / LABELED
    f, n, height, width = open_labeled(labeled)
    with f:
        split = read_splits(raw_dir / SPLITS, n)
        if len(split["train"]) < 2:
            raise DataFormatError(raw_dir / SPLITS, "needs at least two training frames (one is carved off for validation)")
        train, val = carve_validation(split["train"], float(cfg.get("val_fraction", 0.1)), int(cfg.get("split_seed", 0)))
        lut = raw_to_train_ids(n_classes)
        plan = {"train": train, "val": val, "test": split["test"]}
        # Training frames first: their statistics go into the attributes, written on open.
        first = _load_frames(f, train, lut, hw, labeled, progress, "nyudv2 train")
        source = raw_dir / SOURCE
        import json

        checksum = json.loads(source.read_text())["labeled"]["sha256"] if source.exists() else None
        attrs = {
            "task": "segmentation",
            "class_names": list(class_names(n_classes)),
            "modalities": [cfg["teacher_modality"], cfg["student_modality"]],
            "teacher_modality": cfg["teacher_modality"],
            "student_modality": cfg["student_modality"],
            "ignore_index": -1,
            "source_checksum": checksum,
            "normalise": {"rgb": _stats(first["rgb"], 255.0), "depth": _stats(first["depth"], 1.0)},
            "image_size": list(hw),
            "source_image_size": [height, width],
            "depth_unit": "m",
            "label_set": f"nyu{n_classes}",
            "split_counts": {k: int(len(v)) for k, v in plan.items()},
            "split_seed": int(cfg.get("split_seed", 0)),
            "val_fraction": float(cfg.get("val_fraction", 0.1)),
        }
        with PreparedWriter(out_path, attrs, chunk_rows=16) as writer:
            writer.write("train", first)
            del first
            for name in ("val", "test"):
                idx = plan[name]
                for start in range(0, len(idx), _WRITE_ROWS):
                    writer.append(name, _load_frames(f, idx[start:start + _WRITE_ROWS], lut, hw, labeled, progress, f"nyudv2 {name}"))
