"""The input pipeline for streamed (large, HDF5) splits, on torch.utils.data.

An epoch is a *batch plan*: the row indices of every batch, fixed by (seed, rank, world size)
alone. Shuffling is chunk-aware: HDF5 chunks are shuffled, then rows are shuffled within a
buffer of `buffer_chunks` consecutive chunks of that order, so a batch reads from a few chunks
instead of seeking all over the file. The plan is made in the main process and each batch is
sent to a worker as (batch number, rows); the worker opens its own HDF5 handle, reads the
rows and augments them with a generator seeded by the batch number. Batches travel in their
stored dtypes (uint8 RGB, int8 labels: less than half the bytes of float32 / int64; moving a
batch into shared memory costs about 1.3 ms per MB) and are normalised after they arrive, on
the training device when one is given (`normalise_batch`).
So the batches are the same whatever the number of workers (0 = in the main process), and
pinned memory, prefetch and persistent workers only change when they arrive.

params.yaml (`train.<dataset>.<role>.loader`; used only for splits too large for memory):

    workers: 0          DataLoader worker processes (0: read in the training process)
    prefetch: 2         batches each worker prepares ahead
    pin_memory: auto    page-locked batches for asynchronous host-to-GPU copies (auto: on CUDA)
    persistent: true    keep the workers alive from one epoch to the next
    buffer_chunks: 4    chunks whose rows are shuffled together
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cmkd.data.augment import augment_batch  # the one augmentation, shared with the in-memory path
from cmkd.errors import ConfigError


@dataclass(frozen=True)
class LoaderConfig:
    workers: int = 0
    prefetch: int = 2
    pin_memory: Any = "auto"
    persistent: bool = True
    buffer_chunks: int = 4

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, key: str) -> "LoaderConfig":
        if params is None:
            return cls()
        if isinstance(params, LoaderConfig):
            return params
        if not isinstance(params, Mapping):
            raise ConfigError(key, f"must be a mapping such as {{workers: 2}}, got {params!r}")
        known = set(asdict(cls()))
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown loader parameter; known: {sorted(known)}")
        cfg = cls(**params)
        for name, low in (("workers", 0), ("prefetch", 1), ("buffer_chunks", 1)):
            v = getattr(cfg, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"{key}.{name}", f"must be an integer >= {low}, got {v!r}")
        if cfg.pin_memory not in (True, False, "auto"):
            raise ConfigError(f"{key}.pin_memory", f"must be true, false or auto, got {cfg.pin_memory!r}")
        if not isinstance(cfg.persistent, bool):
            raise ConfigError(f"{key}.persistent", f"must be true or false, got {cfg.persistent!r}")
        return cfg

    def pin(self) -> bool:
        return torch.cuda.is_available() if self.pin_memory == "auto" else bool(self.pin_memory)


def batch_plan(n_rows: int, chunk_rows: int, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0,
               world: int = 1, buffer_chunks: int = 4, even: bool = True) -> list[np.ndarray]:
    """Row indices of every batch of one epoch of this rank.

    With `world` > 1 and `even` (training) every rank gets the same number of whole chunks (a
    trailing partial chunk is left out, so all ranks take the same number of steps); with
    `even` false (evaluation) the ranks' shares cover every row exactly once."""
    chunk_rows = max(1, int(chunk_rows))
    n_chunks = math.ceil(n_rows / chunk_rows)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_chunks) if shuffle else np.arange(n_chunks)
    if world > 1:
        if even:
            full = n_rows // chunk_rows
            order = order[order < full]
            order = order[rank::world][: full // world]
        else:
            order = order[rank::world]
    groups = []
    for g in range(0, len(order), buffer_chunks):
        starts = order[g:g + buffer_chunks] * chunk_rows
        rows = np.concatenate([np.arange(s, min(s + chunk_rows, n_rows)) for s in starts]) if len(starts) else np.zeros(0, np.int64)
        groups.append(rows[rng.permutation(len(rows))] if shuffle else rows)
    rows = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


class PlanSampler(Sampler):
    """Yields (augmentation seed, batch number, rows) of the current epoch's plan; `set_epoch`
    switches the plan (the sampler runs in the main process, also with persistent workers)."""

    def __init__(self, plan_args: dict[str, Any]):
        self.plan_args = plan_args
        self.plan: list[np.ndarray] = []
        self.aug_seed = 0

    def set_epoch(self, seed: int, aug_seed: int) -> None:
        self.plan = batch_plan(**self.plan_args, seed=seed)
        self.aug_seed = aug_seed

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        for i, rows in enumerate(self.plan):
            yield self.aug_seed, i, rows


def _read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """ds[rows] for any order of `rows`, read as slices of consecutive rows (HDF5 reads whole
    runs; h5py's fancy indexing needs increasing indices and is slow)."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    parts = [ds[int(run[0]):int(run[-1]) + 1] for run in np.split(sorted_rows, breaks)]
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    out = np.empty_like(data)
    out[order] = data
    return out


class H5Batches(Dataset):
    """Reads one planned batch: {key: tensor} for the split's keys, `index`, optional
    `teacher_logits`, in their stored dtypes, augmented (`normalise_batch` finishes it)."""

    def __init__(self, path: str, group_path: str, names: Mapping[str, str], logits: str | None,
                 augment: str | None):
        self.path, self.group_path, self.names = str(path), group_path, dict(names)
        self.logits, self.augment = logits, augment
        self._files: tuple[int, h5py.File, h5py.File | None] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = None  # every process opens its own handles
        return state

    def _open(self):
        # A handle inherited through fork is the parent's: reopen in every process.
        if self._files is None or self._files[0] != os.getpid():
            logits = h5py.File(self.logits, "r") if self.logits else None
            self._files = (os.getpid(), h5py.File(self.path, "r"), logits)
        return self._files[1][self.group_path], self._files[2]

    def __getitem__(self, item: tuple[int, int, np.ndarray]) -> dict[str, torch.Tensor]:
        aug_seed, batch_no, rows = item
        rows = np.asarray(rows, dtype=np.int64)
        group, logits_file = self._open()
        cache: dict[str, np.ndarray] = {}
        batch = {}
        for key, h5name in self.names.items():
            if h5name not in cache:
                cache[h5name] = _read_rows(group[h5name], rows)
            batch[key] = torch.from_numpy(cache[h5name])
        batch["index"] = torch.from_numpy(rows)
        if logits_file is not None:
            batch["teacher_logits"] = torch.from_numpy(_read_rows(logits_file["logits"], rows))
        if self.augment is None:
            return batch
        # Flips and rotations commute with the per-channel normalisation that follows.
        return augment_batch(batch, self.augment, torch.Generator().manual_seed(int(aug_seed) * 1_000_003 + batch_no))


def normalise_batch(batch: dict[str, torch.Tensor], normalise: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Stored inputs -> float32 x * a - b per channel and int64 targets, on `device` if given
    (the narrow batch is copied there first, asynchronously from pinned memory)."""
    if device is not None and device.type != "cpu":
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    for key, (a, b) in normalise.items():
        shape = (1, -1) + (1,) * (batch[key].dim() - 2)
        a, b = a.to(batch[key].device).view(shape), b.to(batch[key].device).view(shape)
        batch[key] = batch[key].to(torch.float32, copy=True).mul_(a).sub_(b)
    if "target" in batch:
        batch["target"] = batch["target"].long()
    return batch


def finish_batch(batch: dict[str, torch.Tensor], normalise: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 augment: str | None, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The in-memory path: normalised, int64 targets, then the augmentation (as before)."""
    batch = normalise_batch(batch, normalise)
    if augment is not None:
        batch = augment_batch(batch, augment, generator)
    return batch


def make_loader(dataset: H5Batches, sampler: PlanSampler, cfg: LoaderConfig) -> DataLoader:
    workers = cfg.workers
    return DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=cfg.pin(),
        prefetch_factor=cfg.prefetch if workers else None, persistent_workers=cfg.persistent and workers > 0,
    )
