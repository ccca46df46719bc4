"""A user's own paired data, with no code: `data.<name>.kind: paired` in params.yaml.

    data:
      mine:
        kind: paired
        path: /somewhere/mine          # train, val and test as .npz, or .h5 with the same keys
        teacher_modality: rgb          # names of arrays inside each split file
        student_modality: depth
        task: classification           # or segmentation
        ignore_index: 255              # segmentation only: unlabelled pixels (default 255)
        class_names: [cat, dog]        # optional; otherwise 0..K-1

Each split file holds one array per modality, first axis the sample ((N, D) vectors or
(N, C, H, W) images, any numeric dtype), and `labels`: (N,) integers for classification,
(N, H, W) for segmentation. `prepare` checks every array (headers first, then the values, in
chunks: a .h5 split is never loaded whole), standardises each modality with the training
split's statistics only (vectors per feature, images per channel) and writes the prepared file
(cmkd.data.h5) with the source files' sha256. Every problem is one DataFormatError naming the
file and the array, raised before anything is written. docs/own-data.md.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from cmkd.utils.atomic import write_json
from cmkd.errors import ConfigError, DataFormatError

KIND = "paired"
SPLITS = ("train", "val", "test")
EXTENSIONS = (".npz", ".h5")
TASKS = ("classification", "segmentation")
LABELS = "labels"
DEFAULT_IGNORE_INDEX = 255
#: what prepared segmentation labels mark unlabelled pixels with (cmkd.pipeline trains with it)
STORED_IGNORE_INDEX = -1
KEYS = ("kind", "path", "teacher_modality", "student_modality", "task", "ignore_index", "class_names")
#: bytes of one modality read at a time from a split file (a .h5 split is never loaded whole)
READ_BYTES = 32 * 2**20


def is_paired(cfg: Any) -> bool:
    return isinstance(cfg, Mapping) and cfg.get("kind") == KIND


def validate(cfg: Mapping[str, Any], key: str) -> None:
    """The params block alone (no file is read: every stage runs this)."""
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown key for kind paired; known: {list(KEYS)}")
    for name in ("path", "teacher_modality", "student_modality"):
        if not isinstance(cfg.get(name), str) or not cfg[name]:
            raise ConfigError(f"{key}.{name}", "missing: a non-empty string is required")
    for name in ("teacher_modality", "student_modality"):
        if cfg[name] == LABELS:
            raise ConfigError(f"{key}.{name}", f"{LABELS!r} is the labels' array, not a modality")
    if cfg["teacher_modality"] == cfg["student_modality"]:
        raise ConfigError(f"{key}.student_modality", "must differ from teacher_modality")
    if cfg.get("task") not in TASKS:
        raise ConfigError(f"{key}.task", f"must be one of {list(TASKS)}, got {cfg.get('task')!r}")
    if "ignore_index" in cfg:
        if cfg["task"] != "segmentation":
            raise ConfigError(f"{key}.ignore_index", "applies to task segmentation only")
        if not isinstance(cfg["ignore_index"], int) or isinstance(cfg["ignore_index"], bool):
            raise ConfigError(f"{key}.ignore_index", f"must be an integer, got {cfg['ignore_index']!r}")
    names = cfg.get("class_names")
    if names is not None:
        if (not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names)
                or len(set(names)) != len(names)):
            raise ConfigError(f"{key}.class_names", "must be a list of at least two distinct non-empty strings")


def ignore_index(cfg: Mapping[str, Any]) -> int | None:
    return int(cfg.get("ignore_index", DEFAULT_IGNORE_INDEX)) if cfg["task"] == "segmentation" else None


# --------------------------------------------------------------------------- the split files


class SplitFile:
    """One split file: array shapes and dtypes from the headers, rows read in blocks."""

    def __init__(self, path: Path):
        self.path = path
        self.headers = _npz_headers(path) if path.suffix == ".npz" else _h5_headers(path)
        self._loaded: dict[str, np.ndarray] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.headers[name][0]

    def dtype(self, name: str) -> np.dtype:
        return self.headers[name][1]

    def blocks(self, names: list[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(first row, {name: rows}) for consecutive blocks of at most READ_BYTES per array."""
        n = self.shape(names[0])[0]
        row_bytes = max(int(np.prod(self.shape(m)[1:], dtype=np.int64)) * self.dtype(m).itemsize for m in names)
        rows = max(1, READ_BYTES // max(row_bytes, 1))
        if self.path.suffix == ".npz":
            # an .npz member cannot be read in parts: one array at a time, for small data
            with np.load(self.path, allow_pickle=False) as npz:
                arrays = {m: npz[m] for m in names}
            for start in range(0, n, rows):
                yield start, {m: a[start:start + rows] for m, a in arrays.items()}
            return
        import h5py

        with h5py.File(self.path, "r") as f:
            for start in range(0, n, rows):
                yield start, {m: f[m][start:start + rows] for m in names}


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array: (shape, dtype)} of an .npz file from the .npy headers, without reading the data."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as fh:
                    version = np.lib.format.read_magic(fh)
                    fmt = np.lib.format
                    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read(fh)
                headers[member[:-4]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise DataFormatError(path, f"not a readable .npz file ({err})") from err
    return headers


def _h5_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {name: (tuple(ds.shape), ds.dtype) for name, ds in f.items() if isinstance(ds, h5py.Dataset)}
    except OSError as err:
        raise DataFormatError(path, f"not a readable HDF5 file ({err})") from err


def split_paths(cfg: Mapping[str, Any], key: str) -> dict[str, Path]:
    """The train, val and test files under `path` (each .npz or .h5, not both)."""
    folder = Path(cfg["path"]).expanduser()
    if not folder.is_dir():
        raise DataFormatError(folder, f"{key}.path: no such folder")
    paths = {}
    for split in SPLITS:
        found = [folder / f"{split}{ext}" for ext in EXTENSIONS if (folder / f"{split}{ext}").is_file()]
        if not found:
            raise DataFormatError(folder / f"{split}.npz", f"missing split file ({split}.npz or {split}.h5)")
        if len(found) > 1:
            raise DataFormatError(found[0], f"and {found[1].name} both exist: keep one file per split")
        paths[split] = found[0]
    return paths


@dataclass
class Sources:
    """The checked headers of a paired dataset's three split files."""

    files: dict[str, SplitFile]
    teacher: str
    student: str
    task: str

    @property
    def names(self) -> list[str]:
        return [self.teacher, self.student, LABELS]

    def sample_shape(self, name: str) -> tuple[int, ...]:
        return self.files["train"].shape(name)[1:]


def open_sources(cfg: Mapping[str, Any], key: str) -> Sources:
    """Open the split files and check what their headers tell: every array there, numeric,
    vectors (N, D) or images (N, C, H, W), labels (N,) or (N, H, W) matching the images, one
    length per file, the same sample shapes in every split. Reads no data."""
    validate(cfg, key)
    teacher, student, task = cfg["teacher_modality"], cfg["student_modality"], cfg["task"]
    files = {split: SplitFile(path) for split, path in split_paths(cfg, key).items()}
    for split, sf in files.items():
        for name in (teacher, student, LABELS):
            if name not in sf.headers:
                raise DataFormatError(sf.path, f"array {name!r}: missing (the file holds {sorted(sf.headers)})")
            dtype = sf.dtype(name)
            if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
                raise DataFormatError(sf.path, f"array {name!r}: dtype {dtype} is not numeric")
        for name in (teacher, student):
            ndim = len(sf.shape(name))
            if ndim not in (2, 4):
                raise DataFormatError(sf.path, f"array {name!r}: shape {sf.shape(name)}: an image array must be "
                                      "4-dimensional (N, C, H, W), a vector array 2-dimensional (N, D)")
        labels = sf.shape(LABELS)
        if task == "classification" and len(labels) != 1:
            raise DataFormatError(sf.path, f"array {LABELS!r}: shape {labels}: classification labels are (N,)")
        if task == "segmentation":
            if len(labels) != 3:
                raise DataFormatError(sf.path, f"array {LABELS!r}: shape {labels}: segmentation labels are (N, H, W)")
            for name in (teacher, student):
                if sf.shape(name)[2:] != labels[1:]:
                    raise DataFormatError(sf.path, f"array {name!r}: shape {sf.shape(name)} does not match "
                                          f"{LABELS!r} {labels}: segmentation needs (N, C, H, W) images "
                                          "of the labels' H, W")
        lengths = {name: sf.shape(name)[0] for name in (teacher, student, LABELS)}
        if len(set(lengths.values())) != 1:
            name = next(n for n in (student, LABELS) if lengths[n] != lengths[teacher])
            raise DataFormatError(sf.path, f"array {name!r}: {lengths[name]} rows, but {teacher!r} has "
                                  f"{lengths[teacher]}: modalities and labels must have one row per sample")
        if lengths[LABELS] < (2 if split == "train" else 1):
            raise DataFormatError(sf.path, f"array {LABELS!r}: {lengths[LABELS]} rows; the split needs samples")
        for name in (teacher, student, LABELS):
            if sf.shape(name)[1:] != files["train"].shape(name)[1:]:
                raise DataFormatError(sf.path, f"array {name!r}: samples of shape {sf.shape(name)[1:]}, but "
                                      f"{files['train'].path.name} has {files['train'].shape(name)[1:]}")
    return Sources(files, teacher, student, task)


# --------------------------------------------------------------------------- the values


class _Moments:
    """Mean and std per feature (vectors) or per channel (images), merged block by block
    (Chan et al.'s pairwise update, float64)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        axes = (0,) + tuple(range(2, x.ndim))
        n_b = x.size // x.shape[1]
        mean_b = x.mean(axis=axes)
        m2_b = ((x - mean_b.reshape((1, -1) + (1,) * (x.ndim - 2))) ** 2).sum(axis=axes)
        total = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / total)
        self.n = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        std = np.sqrt(self.m2 / self.n)
        return self.mean, np.where(std > 0, std, 1.0)  # a constant feature is only centred


def _first_row(mask: np.ndarray) -> int:
    return int(np.argmax(mask.reshape(len(mask), -1).any(axis=1)))


def check_values(sources: Sources, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Read every split once, in blocks: finite modalities, integer labels >= 0 (or the
    ignore_index), below len(class_names) when given. Returns the number of classes and the
    training split's per-feature / per-channel mean and std of each modality."""
    ignore = ignore_index(cfg)
    class_names = cfg.get("class_names")
    largest = -1
    moments = {m: _Moments() for m in (sources.teacher, sources.student)}
    for split, sf in sources.files.items():
        for start, block in sf.blocks(sources.names):
            for name in (sources.teacher, sources.student):
                x = block[name]
                if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                    row = start + _first_row(~np.isfinite(x))
                    raise DataFormatError(sf.path, f"array {name!r}: NaN or infinite value in row {row}")
                if split == "train":
                    moments[name].add(x)
            y = block[LABELS]
            labelled = np.ones(y.shape, bool) if ignore is None else y != ignore
            if np.issubdtype(y.dtype, np.floating):
                bad = labelled & ~(np.isfinite(y) & (y == np.round(y)))
                if bad.any():
                    row = start + _first_row(bad)
                    raise DataFormatError(sf.path, f"array {LABELS!r}: non-integer label {y[bad][0].item()!r} "
                                          f"in row {row}")
            values = y[labelled]
            if values.size and values.min() < 0:
                row = start + _first_row(labelled & (y < 0))
                allowed = f" (only ignore_index {ignore} marks unlabelled pixels)" if ignore is not None else ""
                raise DataFormatError(sf.path, f"array {LABELS!r}: negative label {values.min().item()!r} "
                                      f"in row {row}{allowed}")
            if values.size:
                top = int(values.max())
                if class_names is not None and top >= len(class_names):
                    row = start + _first_row(labelled & (y >= len(class_names)))
                    raise DataFormatError(sf.path, f"array {LABELS!r}: label {top} in row {row}, but class_names "
                                          f"names {len(class_names)} classes (0..{len(class_names) - 1})")
                largest = max(largest, top)
    n_classes = len(class_names) if class_names is not None else largest + 1
    if n_classes < 2:
        raise DataFormatError(sources.files["train"].path, f"array {LABELS!r}: fewer than two classes in the data")
    return {"n_classes": n_classes, "stats": {m: mom.result() for m, mom in moments.items()}}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_checksums(cfg: Mapping[str, Any], key: str) -> dict[str, str]:
    """{file name: sha256} of the three split files."""
    return {path.name: sha256(path) for path in split_paths(cfg, key).values()}


def check_sources(cfg: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Every check `prepare` makes, writing nothing (`python -m stages validate`)."""
    return check_values(open_sources(cfg, key), cfg)


def input_shapes(cfg: Mapping[str, Any], key: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(task, teacher sample shape, student sample shape) from the headers alone."""
    sources = open_sources(cfg, key)
    return sources.task, sources.sample_shape(sources.teacher), sources.sample_shape(sources.student)


# --------------------------------------------------------------------------- the stages


def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True) -> None:
    """Nothing to fetch: `prepare` reads the user's files in place. The stage `resolve`
    records their checksums (data/resolved/<name>/sources.json), so a changed file reruns
    `prepare`."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_json(raw_dir / "SOURCE.json", {"kind": KIND, "path": str(Path(cfg["path"]).expanduser()),
                                         "read_by": "prepare, in place"})


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return ((x.astype(np.float64) - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)


def prepare(cfg: Mapping[str, Any], raw_dir: Path, out_path: Path, progress: bool = True) -> None:
    from cmkd.data.h5 import PreparedWriter

    sources = open_sources(cfg, f"data.{Path(raw_dir).name}")  # raw_dir is data/raw/<name>
    checked = check_values(sources, cfg)  # every check before anything is written
    n_classes, stats = checked["n_classes"], checked["stats"]
    ignore = ignore_index(cfg)
    label_dtype = np.int64 if ignore is None else (np.int16 if n_classes <= np.iinfo(np.int16).max else np.int32)
    files = {split: {"file": sf.path.name, "sha256": sha256(sf.path)} for split, sf in sources.files.items()}
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    attrs = {
        "task": sources.task,
        "class_names": list(cfg.get("class_names") or [str(i) for i in range(n_classes)]),
        "modalities": [sources.teacher, sources.student],
        "teacher_modality": sources.teacher,
        "student_modality": sources.student,
        "ignore_index": None if ignore is None else STORED_IGNORE_INDEX,
        "source_ignore_index": ignore,
        "source_checksum": f"sha256:{combined}",
        "source_files": files,
        "source_path": str(Path(cfg["path"]).expanduser()),
        "standardised": {m: {"split": "train", "per": "feature" if len(sources.sample_shape(m)) == 1 else "channel",
                             "mean": stats[m][0].tolist(), "std": stats[m][1].tolist()} for m in stats},
    }
    with PreparedWriter(out_path, attrs) as writer:
        for split, sf in sources.files.items():
            for _, block in sf.blocks(sources.names):
                y = block[LABELS].astype(np.int64)
                if ignore is not None:
                    y[block[LABELS] == ignore] = STORED_IGNORE_INDEX
                writer.append(split, {m: _standardise(block[m], *stats[m]) for m in (sources.teacher, sources.student)}
                              | {LABELS: y.astype(label_dtype)})
