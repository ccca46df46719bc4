"""SUN RGB-D, Kinect v2 scene classification: RGB -> depth (DisCoM-KD Tables 1 and 2).

The subset is the Kinect v2 domain of Ferreri, Bucci, Tommasi (ICCVW 2021): frames of sensor
`kv2` whose scene is one of ten classes, 2105 RGB/depth pairs in the paper. The layout read is
SUN RGB-D's own (SUNRGBD.zip from rgbd.cs.princeton.edu)::

    SUNRGBD/kv2/<kinect2data|align_kv2>/<frame>/image/<name>.jpg
                                               /depth/<name>.png      uint16, 16-bit rotated mm
                                               /depth_bfx/<name>.png  hole-filled depth (option)
                                               /intrinsics.txt        3 x 3 K, 9 numbers, row-major
                                               /scene.txt             scene label, one word

`prepare` turns it into one HDF5 file (cmkd.data.h5) with one root group per split seed::

    /split_<k>/<train|val|test>/<modality>     [N, C, S, S] float32, standardised with the
                                               training rows' per-channel mean/std of split k
    /split_<k>/<train|val|test>/labels         [N] int64 (index into class_names)
    /split_<k>/<train|val|test>/frame_index    [N] int64 row of /meta/frames/relpath
    /meta/frames/relpath                       [F] bytes, the selected frames (sorted paths)

Split k is the stratified 70/10/20 split drawn with seed `split_seeds[k]` (DisCoM-KD repeats
every experiment on five splits); training seed k uses root `split_<k>` (attrs `seed_roots`, read by cmkd.data.h5.seed_root).

Modalities: `rgb` (3), `depth` (1: metres / depth_max_m), `hha` (3: an HHA-like encoding, see
`hha_encode`), and fused ones named by joining base names with "_" (e.g. `rgb_depth`, 4
channels: the multi-modal teacher's input, split given by attrs `channel_splits`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from cmkd.data.registry import register_dataset
from cmkd.utils.atomic import write_json
from cmkd.data.h5 import PreparedWriter
from cmkd.data.splits import stratified_split
from cmkd.errors import ChecksumError, ConfigError, DataFormatError

log = logging.getLogger("cmkd.data.sunrgbd")  # the public module name (cmkd/data/sunrgbd.py)

SCENE_CLASSES: tuple[str, ...] = (
    "bathroom", "bedroom", "classroom", "computer_room", "conference_room",
    "dining_area", "discussion_area", "kitchen", "office", "rest_space",
)
#: Frames per class in Ferreri et al. 2021 (2105 in all), the counts DisCoM-KD uses.
PAPER_COUNTS: dict[str, int] = dict(zip(SCENE_CLASSES, (150, 121, 535, 65, 69, 192, 62, 86, 418, 407)))
KV2_DIRS: tuple[str, ...] = ("kinect2data", "align_kv2")
DEPTH_DIRS: tuple[str, ...] = ("depth", "depth_bfx")
DEPTH_MAX_M = 8.0
BASE_CHANNELS: dict[str, int] = {"rgb": 3, "depth": 1, "hha": 3}
MANIFEST = "sunrgbd_manifest.json"
SOURCE = "sunrgbd_source.json"

_SCENE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- file formats

def decode_depth(raw: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Metres (float32) from a SUN RGB-D depth PNG array.

    SUN RGB-D stores millimetres rotated left by 3 bits in 16 bits, so decoding rotates right
    by 3: d = (raw >> 3) | (raw << 13), kept to 16 bits; metres = d / 1000, clipped at 8 m.
    0 stays 0 (no measurement).
    """
    raw = np.asarray(raw)
    where = path if path is not None else "<depth array>"
    if raw.dtype != np.uint16:
        raise DataFormatError(where, f"depth must be 16-bit unsigned (uint16), got {raw.dtype}")
    if raw.ndim != 2:
        raise DataFormatError(where, f"depth must be a single-channel image, got shape {raw.shape}")
    wide = raw.astype(np.uint32)
    mm = ((wide >> 3) | (wide << 13)) & 0xFFFF
    return np.minimum(mm.astype(np.float32) / 1000.0, np.float32(DEPTH_MAX_M))


def encode_depth(metres: np.ndarray) -> np.ndarray:
    """The inverse of `decode_depth` below 65.535 m: millimetres rotated left by 3 bits (uint16)."""
    mm = np.clip(np.rint(np.asarray(metres, dtype=np.float64) * 1000.0), 0, 0xFFFF).astype(np.uint32)
    return (((mm << 3) | (mm >> 13)) & 0xFFFF).astype(np.uint16)


def read_intrinsics(path: str | Path) -> np.ndarray:
    """The 3 x 3 camera matrix of a SUN RGB-D `intrinsics.txt` (9 numbers, row-major)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise DataFormatError(path, "intrinsics file is missing") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataFormatError(path, f"unreadable intrinsics file ({err})") from err
    return parse_intrinsics(text, path)


def parse_intrinsics(text: str, path: str | Path) -> np.ndarray:
    try:
        values = [float(token) for token in text.split()]
    except ValueError as err:
        raise DataFormatError(path, f"intrinsics must be 9 numbers ({err})") from err
    if len(values) != 9:
        raise DataFormatError(path, f"intrinsics must be 9 numbers (a 3 x 3 matrix), found {len(values)}")
    k = np.array(values, dtype=np.float64).reshape(3, 3)
    if not np.allclose(k[2], [0, 0, 1]) and np.allclose(k[:, 2], [0, 0, 1]):
        k = k.T  # written column-major: accept it, the matrix is unambiguous
    if not np.all(np.isfinite(k)) or not np.allclose(k[2], [0, 0, 1]) or k[1, 0] != 0:
        raise DataFormatError(path, f"not a camera matrix [[fx, s, cx], [0, fy, cy], [0, 0, 1]]: {values}")
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        raise DataFormatError(path, f"focal lengths must be positive, got fx={k[0, 0]}, fy={k[1, 1]}")
    return k


def parse_scene(text: str, path: str | Path) -> str:
    """A scene label: one lower-case word (letters, digits, underscores), as SUN RGB-D writes them."""
    label = text.strip()
    if not _SCENE_RE.match(label):
        raise DataFormatError(path, f"unknown scene label {label[:40]!r}: not a SUN RGB-D scene name")
    return label


def read_depth_png(data: bytes, path: str | Path) -> np.ndarray:
    """Decode depth PNG bytes to metres. Only 16-bit single-channel PNGs are depth maps."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise DataFormatError(path, "not a PNG file (corrupt or wrong format)")
    bit_depth, colour_type = data[24], data[25]
    if bit_depth != 16 or colour_type != 0:
        kind = {0: "gray", 2: "RGB", 3: "palette", 4: "gray+alpha", 6: "RGBA"}.get(colour_type, f"type {colour_type}")
        raise DataFormatError(path, f"depth PNG must be 16-bit single-channel (uint16), found {bit_depth}-bit {kind}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            raw = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataFormatError(path, f"corrupt depth PNG ({err})") from err
    if raw.dtype != np.uint16 and raw.ndim == 2 and raw.min(initial=0) >= 0 and raw.max(initial=0) <= 0xFFFF:
        raw = raw.astype(np.uint16)  # older Pillow opens 16-bit PNGs as 32-bit mode "I"
    return decode_depth(raw, path)


def read_rgb(data: bytes, path: str | Path) -> np.ndarray:
    """Decode a colour image to uint8 [H, W, 3]; a corrupt or truncated file is an error."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataFormatError(path, f"corrupt or unreadable image ({err})") from err


# ----------------------------------------------------------------------------- the subset

@dataclass(frozen=True)
class Frame:
    """One SUN RGB-D frame folder and the files `prepare` reads from it."""

    dir: Path
    image: Path
    depth: Path
    intrinsics: Path
    scene: str


def find_root(raw_dir: str | Path) -> Path:
    """The folder that holds `kv2/` (SUN RGB-D's `SUNRGBD/`), searched a few levels down."""
    raw_dir = Path(raw_dir)
    source = raw_dir / SOURCE
    if source.exists():
        root = json.loads(source.read_text()).get("root")
        if root:
            root_path = Path(root) if Path(root).is_absolute() else raw_dir / root
            if (root_path / "kv2").is_dir():
                return root_path
    for pattern in ("kv2", "*/kv2", "*/*/kv2", "*/*/*/kv2"):
        hits = sorted(p.parent for p in raw_dir.glob(pattern) if p.is_dir())
        if hits:
            return hits[0]
    raise DataFormatError(raw_dir, "no SUN RGB-D tree found (expected SUNRGBD/kv2/ inside; run the download stage)")


def _first_root(candidates: Sequence[Path]) -> Path:
    for candidate in candidates:
        try:
            return find_root(candidate)
        except DataFormatError:
            continue
    raise DataFormatError(candidates[0], "no SUN RGB-D tree found in the fetched sources (expected SUNRGBD/kv2/)")


def frame_dirs(root: Path, kv2_dirs: Sequence[str] = KV2_DIRS) -> list[Path]:
    """Every frame folder of the Kinect v2 sensor, in sorted order."""
    dirs: list[Path] = []
    for name in kv2_dirs:
        base = root / "kv2" / name
        if base.is_dir():
            dirs.extend(sorted(p for p in base.iterdir() if p.is_dir()))
        else:
            log.warning("%s: missing, no frames read from it", base)
    return dirs


def _one_image(frame_dir: Path) -> Path:
    images = sorted((frame_dir / "image").glob("*.jpg")) if (frame_dir / "image").is_dir() else []
    if len(images) != 1:
        raise DataFormatError(frame_dir / "image", f"expected exactly one .jpg colour image, found {len(images)}")
    return images[0]


def _depth_for(image: Path, frame_dir: Path, depth_dir: str) -> Path:
    folder = frame_dir / depth_dir
    same_name = folder / f"{image.stem}.png"
    if same_name.is_file():
        return same_name
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if len(pngs) == 1:
        return pngs[0]
    raise DataFormatError(image, f"no depth image for this colour image (expected {same_name})")


def index_frames(
    root: Path,
    classes: Sequence[str] = SCENE_CLASSES,
    kv2_dirs: Sequence[str] = KV2_DIRS,
    depth_dir: str = "depth",
    other_scenes: str = "skip",
    reader: "VerifiedReader | None" = None,
) -> tuple[list[Frame], Counter]:
    """The frames whose scene is one of `classes`, and a count of the other scenes met.

    SUN RGB-D has ~45 scene types, so a well-formed label outside `classes` is another scene
    and is skipped (`other_scenes="skip"`; a frame without scene.txt is skipped too and counted
    as "<no scene.txt>"), or an error (`"error"`, for trees that hold only the classes, like
    the offline sample). An empty or malformed scene.txt is always an error. `reader`, when
    given, reads the labels (verified against the download manifest, counted in the checksum).
    """
    wanted = set(classes)
    frames: list[Frame] = []
    skipped: Counter = Counter()
    for frame_dir in frame_dirs(root, kv2_dirs):
        scene_path = frame_dir / "scene.txt"
        if not scene_path.is_file():
            if other_scenes == "error":
                raise DataFormatError(scene_path, "scene label file is missing")
            skipped["<no scene.txt>"] += 1
            continue
        data = reader.read(scene_path) if reader is not None else _read_bytes(scene_path)
        try:
            text = data.decode()
        except UnicodeDecodeError as err:
            raise DataFormatError(scene_path, f"unknown scene label: not text ({err})") from err
        scene = parse_scene(text, scene_path)
        if scene not in wanted:
            if other_scenes == "error":
                raise DataFormatError(scene_path, f"unknown scene label {scene!r}; expected one of {sorted(wanted)}")
            skipped[scene] += 1
            continue
        image = _one_image(frame_dir)
        frames.append(Frame(frame_dir, image, _depth_for(image, frame_dir, depth_dir), frame_dir / "intrinsics.txt", scene))
    if skipped.get("<no scene.txt>"):
        log.warning("%d kv2 frame folders have no scene.txt and were skipped", skipped["<no scene.txt>"])
    return frames, skipped


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataFormatError(path, f"unreadable ({err})") from err


def report_counts(
    frames: Iterable[Frame], expected: Mapping[str, int] | None, classes: Sequence[str] = SCENE_CLASSES
) -> dict[str, int]:
    """Frames found per class; logs them, and warns per class whose count differs from `expected`."""
    found = Counter(f.scene for f in frames)
    counts = {c: int(found.get(c, 0)) for c in classes}
    log.info("SUN RGB-D kv2 subset: %d frames; per class %s", sum(counts.values()), counts)
    if expected:
        diffs = {c: (counts[c], int(expected[c])) for c in classes if c in expected and counts[c] != int(expected[c])}
        if diffs:
            detail = ", ".join(f"{c}: found {f}, expected {e}" for c, (f, e) in diffs.items())
            log.warning(
                "SUN RGB-D kv2 subset differs from the expected counts (%d found, %d expected): %s",
                sum(counts.values()), sum(int(v) for v in expected.values()), detail,
            )
    return counts


# ----------------------------------------------------------------------------- integrity

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(raw_dir: Path, root: Path, frames: Sequence[Frame], kv2_dirs: Sequence[str] = KV2_DIRS) -> None:
    """Record the sha256 of every file `prepare` may read (scene labels of all kv2 frames; image,
    both depth maps and intrinsics of the selected frames), so later corruption is caught."""
    files: list[Path] = [d / "scene.txt" for d in frame_dirs(root, kv2_dirs) if (d / "scene.txt").is_file()]
    for f in frames:
        files += [f.image, f.intrinsics]
        files += [p for sub in DEPTH_DIRS if (f.dir / sub).is_dir() for p in sorted((f.dir / sub).glob("*.png"))]
    digests = {p.relative_to(root).as_posix(): sha256_bytes(p.read_bytes()) for p in sorted(set(files))}
    write_json(raw_dir / MANIFEST, digests)


class VerifiedReader:
    """Reads files under `root`, checks them against the download manifest when there is one,
    and accumulates a checksum of everything read (the prepared file's `source_checksum`)."""

    def __init__(self, root: Path, manifest: Mapping[str, str] | None):
        self.root = root
        self.manifest = manifest
        self._digests: list[str] = []

    def read(self, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise DataFormatError(path, "file is missing") from err
        except OSError as err:
            raise DataFormatError(path, f"unreadable ({err})") from err
        rel = path.relative_to(self.root).as_posix()
        digest = sha256_bytes(data)
        if self.manifest is not None and rel in self.manifest and self.manifest[rel] != digest:
            raise ChecksumError(path, f"sha256 {digest} differs from the download manifest's {self.manifest[rel]}")
        self._digests.append(f"{rel} {digest}")
        return data

    def checksum(self) -> str:
        return "sha256:" + sha256_bytes("\n".join(self._digests).encode())


def load_manifest(raw_dir: Path) -> dict[str, str] | None:
    path = raw_dir / MANIFEST
    if not path.exists():
        log.warning("%s: no download manifest; files are read without verification", path)
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataFormatError(path, f"unreadable manifest ({err})") from err


# ----------------------------------------------------------------------------- geometry

def backproject(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Camera-frame points [H, W, 3] (x right, y down, z forward) of a depth map in metres.

    Pixel (u, v) (column, row, 0-based) sees X = (u - cx) z / fx, Y = (v - cy) z / fy, Z = z,
    Open3D's convention (`create_from_depth_image`). Pixels without depth give (0, 0, 0).
    """
    h, w = depth.shape
    z = depth.astype(np.float64)
    u = np.arange(w, dtype=np.float64)[None, :]
    v = np.arange(h, dtype=np.float64)[:, None]
    x = (u - k[0, 2] - k[0, 1] * (v - k[1, 2]) / k[1, 1]) * z / k[0, 0]
    y = (v - k[1, 2]) * z / k[1, 1]
    return np.stack([x, y, z], axis=-1)


def scale_intrinsics(k: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """The camera matrix of an image resized from `src_hw` to `dst_hw` (pixel centres kept)."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    out = k.astype(np.float64).copy()
    out[0, 0] *= sx
    out[0, 1] *= sx
    out[1, 1] *= sy
    out[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
    out[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return out


def resize_nearest(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes (depth: no mixing of holes with values)."""
    h, w = image.shape[:2]
    rows = np.minimum(((np.arange(hw[0]) + 0.5) * h / hw[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(hw[1]) + 0.5) * w / hw[1]).astype(np.int64), w - 1)
    return image[rows[:, None], cols[None, :]]


def hha_encode(depth: np.ndarray, k: np.ndarray, knn: int = 16) -> np.ndarray:
    """An HHA-like encoding [3, H, W] float32 of a depth map (after Gupta et al., ECCV 2014).

    Channels: horizontal disparity 1/z (1/m); height above the lowest observed point (m);
    angle between the surface normal and "up" (degrees: 0 floor, 90 wall, 180 ceiling).
    Normals come from Open3D (k-nearest-neighbour plane fit on the back-projected point cloud,
    oriented towards the camera). Approximation: gravity is taken as the camera's up axis
    (-y), i.e. the camera is assumed level; Gupta et al. estimate gravity from the scene
    instead, so pitched views tilt heights and angles. Pixels without depth are 0.
    """
    import open3d as o3d  # heavy import, only when the encoding is asked for

    h, w = depth.shape
    out = np.zeros((3, h, w), np.float32)
    valid = depth > 0
    if valid.sum() < 3:
        return out
    points = backproject(depth, k)[valid]
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=min(knn, len(points))))
    cloud.orient_normals_towards_camera_location(np.zeros(3))
    normals = np.asarray(cloud.normals)
    up = np.array([0.0, -1.0, 0.0])
    angle = np.degrees(np.arccos(np.clip(normals @ up, -1.0, 1.0)))
    height = points[:, 1].max() - points[:, 1]
    out[:, valid] = np.stack([1.0 / points[:, 2], height, angle]).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- settings

def modality_parts(name: str) -> list[str]:
    """Base modalities of a (possibly fused) modality name: "rgb_depth" -> ["rgb", "depth"]."""
    return name.split("_")


def _check_modality(name: Any, key: str) -> None:
    parts = modality_parts(str(name))
    if not parts or any(p not in BASE_CHANNELS for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(key, f"unknown modality {name!r}; use {sorted(BASE_CHANNELS)} or several joined by '_' (e.g. rgb_depth)")


def validate(cfg: Mapping[str, Any], key: str) -> None:
    """Check `data.<sunrgbd dataset>`; errors name the offending key."""
    validate_prepare(cfg, key)
    if "sample" in cfg:
        raise ConfigError(f"{key}.sample", "the offline sample is generated by the datasets sunrgbd-sample, "
                                           "sunrgbd-sample-mm and sunrgbd-sample-mm-rgb (cmkd/data/samples/sunrgbd.py)")
    sources = cfg.get("sources") or []
    if not sources or not all(isinstance(s, Mapping) and ("url" in s or "path" in s) for s in sources):
        raise ConfigError(
            f"{key}.sources",
            "give SUN RGB-D as a list of {url: ..., sha256: ...} or {path: <SUNRGBD.zip or extracted folder>} "
            "(http://rgbd.cs.princeton.edu/data/SUNRGBD.zip); see docs/sunrgbd.md",
        )


def validate_prepare(cfg: Mapping[str, Any], key: str) -> None:
    """The settings `prepare` reads (everything but where the data comes from)."""
    for field in ("teacher_modality", "student_modality"):
        if field not in cfg:
            raise ConfigError(f"{key}.{field}", "is required (e.g. rgb, depth, hha or rgb_depth)")
        _check_modality(cfg[field], f"{key}.{field}")
    for i, name in enumerate(cfg.get("extra_modalities", []) or []):
        _check_modality(name, f"{key}.extra_modalities[{i}]")
    if int(cfg.get("image_size", 224)) < 8:
        raise ConfigError(f"{key}.image_size", f"must be >= 8, got {cfg.get('image_size')}")
    split = cfg.get("split", [0.7, 0.1, 0.2])
    if len(split) != 3 or any(float(f) <= 0 for f in split) or abs(sum(float(f) for f in split) - 1) > 1e-6:
        raise ConfigError(f"{key}.split", f"must be three positive fractions summing to 1, got {split}")
    seeds = cfg.get("split_seeds", [0, 1, 2, 3, 4])
    if not seeds or len(set(int(s) for s in seeds)) != len(seeds):
        raise ConfigError(f"{key}.split_seeds", f"must be a non-empty list of distinct integers, got {seeds}")
    if cfg.get("other_scenes", "skip") not in ("skip", "error"):
        raise ConfigError(f"{key}.other_scenes", f"must be 'skip' or 'error', got {cfg.get('other_scenes')!r}")
    if cfg.get("depth_dir", "depth") not in DEPTH_DIRS:
        raise ConfigError(f"{key}.depth_dir", f"must be one of {list(DEPTH_DIRS)}, got {cfg.get('depth_dir')!r}")
    bad_dirs = [d for d in cfg.get("kv2_dirs", KV2_DIRS) if d not in KV2_DIRS]
    if bad_dirs or not cfg.get("kv2_dirs", KV2_DIRS):
        raise ConfigError(f"{key}.kv2_dirs", f"must be a non-empty subset of {list(KV2_DIRS)}, got {cfg.get('kv2_dirs')}")
    expected = cfg.get("expected_counts")
    if expected is not None and (not isinstance(expected, Mapping) or set(expected) - set(SCENE_CLASSES)):
        raise ConfigError(f"{key}.expected_counts", f"must map scene classes {list(SCENE_CLASSES)} to counts")


def written_modalities(cfg: Mapping[str, Any]) -> list[str]:
    """Teacher, student and extra modalities, in that order, without repeats."""
    names = [cfg["teacher_modality"], cfg["student_modality"], *(cfg.get("extra_modalities") or [])]
    return list(dict.fromkeys(str(n) for n in names))


def expected_counts(cfg: Mapping[str, Any]) -> dict[str, int] | None:
    if cfg.get("expected_counts") is not None:
        return {c: int(n) for c, n in cfg["expected_counts"].items()}
    if "sample" in cfg:
        n = int(cfg["sample"].get("frames_per_class", 15))
        return {c: n for c in SCENE_CLASSES}
    return dict(PAPER_COUNTS)


# ----------------------------------------------------------------------------- download

def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True) -> None:
    """Fill `raw_dir`: fetch SUN RGB-D (URL or local archive/folder, verified), then write the
    manifest of the kv2 subset (`record_download`). The offline sample: samples/sunrgbd.py."""
    from cmkd.data.download import fetch

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    validate(cfg, "data.<sunrgbd dataset>")
    sources = [dict(s) for s in cfg["sources"]]
    fetched = Path(fetch(sources, raw_dir, progress=progress, key="data.<sunrgbd dataset>.sources",
                         max_extract_bytes=cfg.get("max_extract_bytes")))
    # An already-extracted folder is used where it lies (fetch records it, copies nothing).
    folders = [Path(s["path"]).expanduser() for s in sources if "path" in s and Path(s["path"]).expanduser().is_dir()]
    record_download(raw_dir, _first_root([fetched, *folders]), cfg, {"sources": sources})


def record_download(raw_dir: Path, root: Path, cfg: Mapping[str, Any], source: dict[str, Any]) -> None:
    """The manifest of the kv2 frames under `root` and where they came from (`source`)."""
    frames, _ = index_frames(
        root, SCENE_CLASSES, cfg.get("kv2_dirs", KV2_DIRS), cfg.get("depth_dir", "depth"), cfg.get("other_scenes", "skip")
    )
    write_manifest(raw_dir, root, frames, cfg.get("kv2_dirs", KV2_DIRS))
    try:
        source["root"] = root.relative_to(raw_dir).as_posix()
    except ValueError:
        source["root"] = str(root.resolve())
    write_json(raw_dir / SOURCE, source)


# ----------------------------------------------------------------------------- prepare

def load_frame(frame: Frame, reader: VerifiedReader, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """One frame resized to size x size: (rgb uint8 [3,S,S], depth m [S,S], K of the resized
    frame, whether the depth had to be registered to the image size)."""
    rgb = read_rgb(reader.read(frame.image), frame.image)
    depth = read_depth_png(reader.read(frame.depth), frame.depth)
    k = parse_intrinsics(_text(reader.read(frame.intrinsics), frame.intrinsics), frame.intrinsics)
    registered = depth.shape != rgb.shape[:2]
    if registered:
        # K belongs to the colour frame; depth maps of another size are brought onto it.
        depth = resize_nearest(depth, rgb.shape[:2])
    k = scale_intrinsics(k, rgb.shape[:2], (size, size))
    rgb_small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
    return rgb_small.transpose(2, 0, 1), resize_nearest(depth, (size, size)), k, registered


def _text(data: bytes, path: Path) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise DataFormatError(path, f"not a text file ({err})") from err


def load_subset(frames: Sequence[Frame], reader: VerifiedReader, size: int, hha: bool, progress: bool) -> dict[str, np.ndarray]:
    """Every frame as arrays: rgb uint8 [N,3,S,S], depth float32 [N,1,S,S] (metres), hha [N,3,S,S]."""
    from tqdm.auto import tqdm

    n = len(frames)
    out = {"rgb": np.empty((n, 3, size, size), np.uint8), "depth": np.empty((n, 1, size, size), np.float32)}
    if hha:
        out["hha"] = np.empty((n, 3, size, size), np.float32)
    n_registered = 0
    for i, frame in enumerate(tqdm(frames, desc="sunrgbd frames", disable=not progress)):
        rgb, depth, k, registered = load_frame(frame, reader, size)
        out["rgb"][i], out["depth"][i, 0] = rgb, depth
        if hha:
            out["hha"][i] = hha_encode(depth, k)
        n_registered += registered
    if n_registered:
        log.info("%d of %d depth maps differed in size from their image; resized to it (nearest)", n_registered, n)
    return out


def base_arrays(subset: Mapping[str, np.ndarray], depth_max_m: float) -> dict[str, np.ndarray]:
    """Float32 base modalities before standardisation: rgb in [0,1], depth in [0,1] (m / max)."""
    out = {"rgb": subset["rgb"].astype(np.float32) / 255.0, "depth": subset["depth"] / np.float32(depth_max_m)}
    if "hha" in subset:
        out["hha"] = subset["hha"]
    return out


def channel_stats(
    base: Mapping[str, np.ndarray], names: Iterable[str], train_idx: np.ndarray
) -> dict[str, dict[str, list[float]]]:
    """Per-channel mean and std of each modality over the training rows (std 0 -> 1)."""
    stats = {}
    for name in names:
        train = base[name][train_idx].astype(np.float64)
        std = train.std(axis=(0, 2, 3))
        stats[name] = {"mean": train.mean(axis=(0, 2, 3)).tolist(), "std": np.where(std > 1e-8, std, 1.0).tolist()}
    return stats


def standardise(x: np.ndarray, stats: Mapping[str, Sequence[float]]) -> np.ndarray:
    """(x - mean) / std per channel of [N, C, H, W]."""
    mean = np.asarray(stats["mean"], np.float64)[None, :, None, None]
    std = np.asarray(stats["std"], np.float64)[None, :, None, None]
    return ((x - mean) / std).astype(np.float32)


def is_smoke_test(cfg: Mapping[str, Any]) -> bool:
    """The rendered offline sample (`sample:` settings) is a smoke test; the real data is not."""
    return "sample" in cfg


@register_dataset("sunrgbd", "sunrgbd-mm", "sunrgbd-mm-rgb")
def prepare(cfg: Mapping[str, Any], raw_dir: Path, out_path: Path, progress: bool = True) -> None:
    raw_dir, out_path = Path(raw_dir), Path(out_path)
    validate_prepare(cfg, "data.<sunrgbd dataset>")
    size = int(cfg.get("image_size", 224))
    depth_max = float(cfg.get("depth_max_m", DEPTH_MAX_M))
    fractions = [float(f) for f in cfg.get("split", [0.7, 0.1, 0.2])]
    split_seeds = [int(s) for s in cfg.get("split_seeds", [0, 1, 2, 3, 4])]
    modalities = written_modalities(cfg)
    parts = list(dict.fromkeys(p for m in modalities for p in modality_parts(m)))

    root = find_root(raw_dir)
    reader = VerifiedReader(root, load_manifest(raw_dir))
    frames, skipped = index_frames(
        root, SCENE_CLASSES, cfg.get("kv2_dirs", KV2_DIRS), cfg.get("depth_dir", "depth"),
        cfg.get("other_scenes", "skip"), reader,
    )
    if skipped:
        log.info("skipped %d kv2 frames of other scenes: %s", sum(skipped.values()), dict(sorted(skipped.items())))
    counts = report_counts(frames, expected_counts(cfg))
    missing = [c for c, n in counts.items() if n < 2]
    if missing:
        raise DataFormatError(root, f"too few kv2 frames (< 2) of class(es) {missing} to split")

    subset = load_subset(frames, reader, size, "hha" in parts, progress)
    base = base_arrays(subset, depth_max)
    labels = np.array([SCENE_CLASSES.index(f.scene) for f in frames], np.int64)

    attrs = {
        "task": "classification",
        "class_names": list(SCENE_CLASSES),
        "modalities": modalities,
        "teacher_modality": str(cfg["teacher_modality"]),
        "student_modality": str(cfg["student_modality"]),
        "ignore_index": None,
        "source_checksum": reader.checksum(),
        "seed_roots": [f"split_{k}" for k in range(len(split_seeds))],
        "split_seeds": split_seeds,
        "split_fractions": fractions,
        "channel_splits": {m: [BASE_CHANNELS[p] for p in modality_parts(m)] for m in modalities},
        "class_counts": counts,
        "expected_counts": expected_counts(cfg),
        "image_size": size,
        "depth_max_m": depth_max,
        "depth_dir": cfg.get("depth_dir", "depth"),
    }
    relpaths = np.array([f.dir.relative_to(root).as_posix().encode() for f in frames])
    plans = [stratified_split(labels, fractions, seed) for seed in split_seeds]
    # The attrs are written when the file opens, so every split's statistics come first.
    stats = {f"split_{k}": channel_stats(base, parts, splits["train"]) for k, splits in enumerate(plans)}
    attrs["normalization"] = stats
    with PreparedWriter(out_path, attrs) as writer:
        writer.write("frames", {"relpath": relpaths}, root="meta")
        for k, splits in enumerate(plans):
            normed = {p: standardise(base[p], stats[f"split_{k}"][p]) for p in parts}
            for split, idx in splits.items():
                arrays = {m: np.concatenate([normed[p][idx] for p in modality_parts(m)], axis=1) for m in modalities}
                writer.write(split, {**arrays, "labels": labels[idx], "frame_index": idx.astype(np.int64)}, root=f"split_{k}")
