"""The prepared-data format: one HDF5 file per dataset.

Layout (``root`` is "" for a plain dataset, or a variant group such as ``gamma_0.50``)::

    /attrs                       task, class_names, modalities, teacher_modality,
                                 student_modality, ignore_index, source_checksum,
                                 code_version, format_version (lists/dicts stored as JSON);
                                 optional normalise: {modality: {scale, mean, std}} for
                                 modalities stored raw (e.g. uint8 RGB), which loaders turn
                                 into (x / scale - mean) / std per channel
    /<root>/<split>/<modality>   [N, ...] one chunked dataset per modality
    /<root>/<split>/labels       [N] int64 (classification) or [N, H, W] int8 / int16 (segmentation, -1 = ignore)

Writers create the file under a temporary name and rename it when closed without error,
so an interrupted `prepare` leaves nothing half-written. Readers open the file read-only and
stream chunks; `load` reads a whole split and is meant for splits that fit in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from cmkd import __version__
from cmkd.utils.atomic import remove_stale
from cmkd.errors import DataFormatError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
_JSON_PREFIX = "json:"


def _encode_attr(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)) or value is None:
        return _JSON_PREFIX + json.dumps(value)
    return value


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith(_JSON_PREFIX):
        return json.loads(value[len(_JSON_PREFIX):])
    if isinstance(value, np.generic):
        return value.item()
    return value


def _group_path(root: str, split: str) -> str:
    return f"{root.strip('/')}/{split}".strip("/")


class PreparedWriter:
    """Write a prepared-data file atomically.

    >>> with PreparedWriter("data/prepared/x.h5", attrs) as w:
    ...     w.write("train", {"rgb": x, "labels": y})          # whole arrays
    ...     w.append("val", {"rgb": xb, "labels": yb})         # or growing, batch by batch
    """

    def __init__(self, path: str | Path, attrs: Mapping[str, Any], chunk_rows: int = 64):
        self.path = Path(path)
        self.attrs = dict(attrs)
        self.chunk_rows = chunk_rows
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file: h5py.File | None = None

    def __enter__(self) -> "PreparedWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.path.parent, prefix=f".{self.path.name}.")  # a killed run's temporary
        self._file = h5py.File(self._tmp, "w")
        attrs = {"code_version": __version__, "format_version": FORMAT_VERSION, **self.attrs}
        for key, value in attrs.items():
            self._file.attrs[key] = _encode_attr(value)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None
        self._file.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        elif self._tmp.exists():
            self._tmp.unlink()

    def _chunks(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (max(1, min(self.chunk_rows, shape[0])),) + tuple(shape[1:])

    def write(self, split: str, arrays: Mapping[str, np.ndarray], root: str = "") -> None:
        """Write whole arrays for one split (all with the same first dimension)."""
        assert self._file is not None
        group = self._file.require_group(_group_path(root, split))
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{self.path}: arrays of split {split!r} differ in length: {lengths}")
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            group.create_dataset(name, data=array, chunks=self._chunks(array.shape) if array.size else None)

    def append(self, split: str, arrays: Mapping[str, np.ndarray], root: str = "") -> None:
        """Append a batch of rows to growing datasets of one split."""
        assert self._file is not None
        group = self._file.require_group(_group_path(root, split))
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            if name not in group:
                group.create_dataset(
                    name, shape=(0,) + array.shape[1:], maxshape=(None,) + array.shape[1:],
                    dtype=array.dtype, chunks=self._chunks((self.chunk_rows,) + array.shape[1:]),
                )
            ds = group[name]
            start = ds.shape[0]
            ds.resize(start + len(array), axis=0)
            ds[start:] = array


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The file-level attributes of a prepared-data file, decoded."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, "prepared-data file does not exist (run the prepare stage)")
    try:
        with h5py.File(path, "r") as f:
            return {key: _decode_attr(value) for key, value in f.attrs.items()}
    except OSError as err:
        raise DataFormatError(path, f"not a readable HDF5 file ({err})") from err


def sample_shapes(path: str | Path, split: str = "train", root: str = "") -> dict[str, tuple[int, ...]]:
    """Per array of one split, the shape of one row (without reading the data)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            group = f[_group_path(root, split)]
            return {name: tuple(ds.shape[1:]) for name, ds in group.items() if isinstance(ds, h5py.Dataset)}
    except (OSError, KeyError) as err:
        raise DataFormatError(path, f"cannot read split {split!r} ({err})") from err


class PreparedSplit:
    """Read one split of a prepared-data file: whole (`load`) or chunk by chunk (`iter_chunks`)."""

    def __init__(self, path: str | Path, split: str, root: str = ""):
        self.path = Path(path)
        self.split = split
        self.group_path = _group_path(root, split)
        with h5py.File(self.path, "r") as f:
            if self.group_path not in f:
                raise DataFormatError(self.path, f"has no group {self.group_path!r}")
            group = f[self.group_path]
            self.shapes = {name: tuple(ds.shape) for name, ds in group.items()}
            self.dtypes = {name: ds.dtype for name, ds in group.items()}
            self.chunk_rows = min((ds.chunks or ds.shape)[0] for ds in group.values()) or 1
        lengths = {s[0] for s in self.shapes.values()}
        if len(lengths) != 1:
            raise DataFormatError(self.path, f"datasets of {self.group_path!r} differ in length")
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def nbytes(self, names: Sequence[str]) -> int:
        return sum(int(np.prod(self.shapes[n])) * self.dtypes[n].itemsize for n in names)

    def _check(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.shapes]
        if missing:
            raise DataFormatError(self.path, f"group {self.group_path!r} has no dataset(s) {missing}")

    def load(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Read whole datasets of this split into memory."""
        self._check(names)
        with h5py.File(self.path, "r") as f:
            return {n: f[self.group_path][n][()] for n in names}

    def iter_chunks(
        self, names: Sequence[str], rows: int | None = None, order: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield (row indices, arrays) for consecutive blocks of `rows` rows.

        `order` permutes the blocks (not the rows), so shuffled training still reads whole
        HDF5 chunks; the caller shuffles rows within a block.
        """
        self._check(names)
        rows = rows or self.chunk_rows
        starts = np.arange(0, self.length, rows)
        if order is not None:
            starts = starts[order]
        with h5py.File(self.path, "r") as f:
            group = f[self.group_path]
            for start in starts:
                stop = min(start + rows, self.length)
                yield np.arange(start, stop), {n: group[n][start:stop] for n in names}


def seed_root(attrs: Mapping[str, Any], seed: int) -> str:
    """Datasets with one split per seed (SUN RGB-D's five 70/10/20 splits) list their groups in
    the `seed_roots` attribute; seed k uses group k modulo their number."""
    roots = attrs.get("seed_roots") or [""]
    return roots[seed % len(roots)]
