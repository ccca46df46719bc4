"""One split of a prepared file as batches of named tensors: in memory, or streamed from HDF5
through cmkd.data.loader."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from cmkd.data.h5 import PreparedSplit
from cmkd.data.loader import (
    H5Batches,
    LoaderConfig,
    PlanSampler,
    batch_plan,
    finish_batch,
    make_loader,
    normalise_batch,
)
from cmkd.errors import DataFormatError
from cmkd.training.logit_cache import verify_logits

# Splits up to this size are read into memory; larger ones are streamed chunk by chunk.
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3


def input_affine(spec: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored input's normalisation (x / scale - mean) / std, per channel, as x * a - b with
    float32 a = 1 / (scale * std) and b = mean / std (the arithmetic of the values stored before).
    `spec` is an entry of a prepared file's `normalise` attribute: {scale, mean, std}."""
    scale = float(spec["scale"])
    a = torch.tensor([1.0 / (scale * float(sd)) for sd in spec["std"]], dtype=torch.float32)
    b = torch.tensor([float(m) / float(sd) for m, sd in zip(spec["mean"], spec["std"])], dtype=torch.float32)
    return a, b


class SplitData:
    """One split of a dataset, as batches of named tensors.

    In memory (`from_arrays`, or `load_split` on a small file) or streamed from HDF5 chunk by
    chunk (`load_split` on a large file). Batch keys: teacher_input, student_input, target
    (int64), index, and teacher_logits when cached logits are attached.

    `normalise` maps batch keys to (a, b) per channel (`input_affine`): those inputs are kept
    as stored (e.g. uint8 images, a quarter of float32) and every batch gets float32 x * a - b.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, stream: dict[str, Any] | None = None,
                 normalise: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        if (tensors is None) == (stream is None):
            raise ValueError("give exactly one of tensors / stream")
        self.tensors = dict(tensors) if tensors is not None else None
        self.stream = stream
        self.normalise = dict(normalise or {})
        if self.tensors is not None:
            lengths = {k: len(v) for k, v in self.tensors.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"tensors differ in length: {lengths}")
            self.length = next(iter(lengths.values()))
        else:
            self.length = len(stream["split"])

    @classmethod
    def from_arrays(cls, **arrays: Any) -> SplitData:
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items() if v is not None}
        return cls(tensors=tensors)

    def __len__(self) -> int:
        return self.length

    @property
    def keys(self) -> list[str]:
        if self.tensors is not None:
            return sorted(self.tensors)
        return sorted(self.stream["names"]) + (["teacher_logits"] if self.stream.get("logits") else [])

    def sample_shape(self, key: str) -> tuple[int, ...]:
        if self.tensors is not None:
            return tuple(self.tensors[key].shape[1:])
        return self.stream["split"].shapes[self.stream["names"][key]][1:]

    def with_teacher_logits(self, logits: torch.Tensor | str | Path) -> SplitData:
        """Attach cached teacher logits (a tensor, or an HDF5 file with dataset `logits`)."""
        if not isinstance(logits, torch.Tensor):
            rows = verify_logits(logits)  # a corrupt or altered cache is an error naming the file
            if rows != self.length:
                raise DataFormatError(logits, f"cached teacher logits have {rows} rows for a split of {self.length}")
        if self.tensors is not None:
            if not isinstance(logits, torch.Tensor):
                with h5py.File(logits, "r") as f:
                    logits = torch.from_numpy(f["logits"][()])
            if len(logits) != self.length:
                raise ValueError(f"teacher logits have {len(logits)} rows for a split of {self.length}")
            return SplitData(tensors={**self.tensors, "teacher_logits": logits}, normalise=self.normalise)
        return SplitData(stream={**self._stream_spec(), "logits": str(logits)}, normalise=self.normalise)

    def _stream_spec(self) -> dict[str, Any]:
        return {k: v for k, v in self.stream.items() if k != "loaders"}

    def without(self, key: str) -> SplitData:
        if self.tensors is not None:
            return SplitData(tensors={k: v for k, v in self.tensors.items() if k != key}, normalise=self.normalise)
        if key == "teacher_logits":
            return SplitData(stream={k: v for k, v in self._stream_spec().items() if k != "logits"},
                             normalise=self.normalise)
        return self

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1, *,
        even: bool = True, augment: str | None = None, aug_seed: int = 0, loader: LoaderConfig | None = None,
        device: torch.device | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches. With `world` > 1 each rank gets a disjoint share: equally long when
        `even` (training), covering every row once otherwise (evaluation). `augment` applies
        `augment_batch` with a generator seeded by `aug_seed`. Streamed splits go through
        the torch.utils.data pipeline of cmkd.data.loader (`loader`: its workers, prefetch...),
        and their batches are normalised on `device` when given (they arrive there)."""
        if self.stream is not None:
            for batch in self._stream_batches(batch_size, shuffle, seed, rank, world, even, augment, aug_seed,
                                              loader or LoaderConfig()):
                yield normalise_batch(batch, self.normalise, device)
            return
        generator = torch.Generator().manual_seed(aug_seed) if augment is not None else None
        for batch in self._memory_batches(batch_size, shuffle, seed, rank, world, even):
            yield finish_batch(batch, self.normalise, augment, generator)

    def steps_per_epoch(self, batch_size: int, rank: int = 0, world: int = 1) -> int:
        """Training batches of one epoch of this rank (batches of one row are skipped)."""
        if self.stream is not None:
            split: PreparedSplit = self.stream["split"]
            plan = batch_plan(split.length, split.chunk_rows, batch_size, shuffle=False, seed=0, rank=rank, world=world)
            return sum(len(b) >= 2 for b in plan)
        rows = self.length // world if world > 1 else self.length
        return rows // batch_size + (rows % batch_size >= 2)

    def _memory_batches(self, batch_size, shuffle, seed, rank, world, even=True):
        n = self.length
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        if world > 1:
            order = order[rank::world]
            if even:
                order = order[: n // world]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.index_select(0, idx) for k, v in self.tensors.items()}
            batch["index"] = idx
            yield batch

    def _stream_batches(self, batch_size, shuffle, seed, rank, world, even, augment, aug_seed, cfg: LoaderConfig):
        # One DataLoader per way of iterating, kept so persistent workers live across epochs.
        split: PreparedSplit = self.stream["split"]
        key = (batch_size, shuffle, rank, world, even, augment, cfg)
        loaders = self.stream.setdefault("loaders", {})
        if key not in loaders:
            sampler = PlanSampler(dict(n_rows=split.length, chunk_rows=split.chunk_rows, batch_size=batch_size,
                                       shuffle=shuffle, rank=rank, world=world,
                                       buffer_chunks=cfg.buffer_chunks, even=even))
            dataset = H5Batches(split.path, split.group_path, self.stream["names"], self.stream.get("logits"), augment)
            loaders[key] = (sampler, make_loader(dataset, sampler, cfg))
        sampler, data_loader = loaders[key]
        sampler.set_epoch(seed, aug_seed)
        yield from data_loader


def load_split(path: str | Path, split: str, attrs: Mapping[str, Any], root: str = "",
               in_memory: bool | None = None) -> SplitData:
    """A split of a prepared file with the batch keys the methods use."""
    prepared = PreparedSplit(path, split, root)
    names = {"teacher_input": attrs["teacher_modality"], "student_input": attrs["student_modality"], "target": "labels"}
    if in_memory is None:
        in_memory = prepared.nbytes(list(set(names.values()))) <= IN_MEMORY_LIMIT_BYTES
    # Inputs stored narrow (SemanticKITTI's uint8 RGB) are normalised batch by batch.
    stored = attrs.get("normalise") or {}
    normalise = {key: input_affine(stored[h5name]) for key, h5name in names.items() if h5name in stored}
    if not in_memory:
        return SplitData(stream={"split": prepared, "names": names}, normalise=normalise)
    arrays = prepared.load(list(set(names.values())))
    tensors = {key: torch.from_numpy(arrays[h5name]) for key, h5name in names.items()}
    return SplitData(tensors=tensors, normalise=normalise)
