"""The training engine: seeded, deterministic on CPU, checkpointed every epoch, resumable,
data-parallel with torch.distributed when launched by torchrun.

Determinism: model initialisation is seeded by the caller (`seed_everything`); every epoch
re-seeds torch from (seed, epoch) and shuffles with its own generator, so a run resumed from
the checkpoint of epoch k is bit-identical to one that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cmkd.atomic import atomic_path
from cmkd.data.h5 import PreparedSplit
from cmkd.data.loader import H5Batches, LoaderConfig, PlanSampler, batch_plan, finish_batch, make_loader, normalise_batch
from cmkd.errors import ConfigError, DataFormatError
from cmkd.metrics import MetricAccumulator, primary_metric
from cmkd.training import (
    Precision, backward_and_step, build_scheduler, maybe_compile, to_channels_last, validate_amp, validate_schedule,
)

log = logging.getLogger(__name__)

AUGMENTS = (None, "flip", "flip_rot90")
OPTIMIZERS = ("adam", "adamw", "sgd")
_REAL_SCALE_KEYS = ("nesterov", "schedule", "amp", "channels_last", "grad_clip", "compile")
# Splits up to this size are read into memory; larger ones are streamed chunk by chunk.
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    augment: str | None = None
    eval_batch_size: int = 512
    # Real-scale options (cmkd/training.py, cmkd/data/loader.py); the defaults change nothing.
    nesterov: bool = False
    schedule: Any = None
    amp: Any = False
    channels_last: bool = False
    grad_clip: float = 0.0
    compile: Any = False
    loader: Any = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any], key: str, **overrides: Any) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown training parameter; known: {sorted(names)}")
        merged = {**params, **overrides}
        # YAML 1.1 (PyYAML) reads DVC-written numbers such as 1e-05 as strings.
        for name in ("lr", "weight_decay", "momentum", "grad_clip"):
            if isinstance(merged.get(name), str):
                try:
                    merged[name] = float(merged[name])
                except ValueError:
                    raise ConfigError(f"{key}.{name}", f"must be a number, got {merged[name]!r}") from None
        cfg = cls(**merged)
        cfg.validate(key)
        return cfg

    def validate(self, key: str) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"{key}.epochs", f"must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"{key}.batch_size", f"must be a positive integer, got {self.batch_size!r}")
        if not float(self.lr) > 0:
            raise ConfigError(f"{key}.lr", f"must be > 0, got {self.lr!r}")
        if float(self.weight_decay) < 0:
            raise ConfigError(f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{key}.optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"{key}.augment", f"must be one of {AUGMENTS}, got {self.augment!r}")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"{key}.nesterov", f"must be true or false, got {self.nesterov!r}")
        if self.nesterov and self.optimizer != "sgd":
            raise ConfigError(f"{key}.nesterov", f"applies to optimizer sgd only, not {self.optimizer!r}")
        validate_schedule(self.schedule, f"{key}.schedule")
        validate_amp(self.amp, f"{key}.amp")
        if self.channels_last not in (True, False, "auto") or not isinstance(self.channels_last, (bool, str)):
            raise ConfigError(f"{key}.channels_last", f"must be true, false or auto (on CUDA only), got {self.channels_last!r}")
        if not isinstance(self.grad_clip, (int, float)) or isinstance(self.grad_clip, bool) or self.grad_clip < 0:
            raise ConfigError(f"{key}.grad_clip", f"must be a number >= 0 (0 = off), got {self.grad_clip!r}")
        if not (isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile)):
            raise ConfigError(f"{key}.compile", f"must be true, false or a torch.compile backend name, got {self.compile!r}")
        LoaderConfig.from_params(self.loader, f"{key}.loader")

    @property
    def schedule_spec(self) -> dict[str, Any] | None:
        return validate_schedule(self.schedule, "schedule")

    @property
    def loader_config(self) -> LoaderConfig:
        return LoaderConfig.from_params(self.loader, "loader")

    def fingerprint(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("device")
        d.pop("eval_batch_size")
        d.pop("loader")  # how batches arrive, not which: the same with any number of workers
        for f in dataclasses.fields(self):  # options left at their defaults keep the old hash
            if f.name in _REAL_SCALE_KEYS and d.get(f.name) == f.default:
                d.pop(f.name)
        return d


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def distributed_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Join the process group torchrun describes in the environment (gloo on CPU)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


# ----------------------------------------------------------------------------------- data


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
    def from_arrays(cls, **arrays: Any) -> "SplitData":
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

    def with_teacher_logits(self, logits: torch.Tensor | str | Path) -> "SplitData":
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

    def without(self, key: str) -> "SplitData":
        if self.tensors is not None:
            return SplitData(tensors={k: v for k, v in self.tensors.items() if k != key}, normalise=self.normalise)
        if key == "teacher_logits":
            return SplitData(stream={k: v for k, v in self._stream_spec().items() if k != "logits"}, normalise=self.normalise)
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
                                       shuffle=shuffle, rank=rank, world=world, buffer_chunks=cfg.buffer_chunks, even=even))
            dataset = H5Batches(split.path, split.group_path, self.stream["names"], self.stream.get("logits"), augment)
            loaders[key] = (sampler, make_loader(dataset, sampler, cfg))
        sampler, data_loader = loaders[key]
        sampler.set_epoch(seed, aug_seed)
        yield from data_loader


def load_split(path: str | Path, split: str, attrs: Mapping[str, Any], root: str = "", in_memory: bool | None = None) -> SplitData:
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


# --------------------------------------------------------------------------- augmentation


def augment_batch(batch: dict[str, torch.Tensor], mode: str | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The same random flip / 90-degree rotation for every image-shaped tensor of a sample
    (both modalities and a segmentation target stay aligned). Vectorised per batch."""
    if mode is None:
        return batch
    keys = [k for k in ("teacher_input", "student_input", "target") if k in batch and batch[k].dim() >= 3]
    if not keys:
        return batch
    n = batch[keys[0]].shape[0]
    out = dict(batch)
    flip = torch.rand(n, generator=generator) < 0.5
    for k in keys:
        x = out[k]
        f = flip.view(-1, *([1] * (x.dim() - 1)))
        out[k] = torch.where(f, x.flip(-1), x)
    if mode == "flip_rot90":
        turns = torch.randint(0, 4, (n,), generator=generator)
        for k in keys:
            x = out[k]
            if x.shape[-1] != x.shape[-2]:
                raise ValueError("flip_rot90 needs square images")
            rotated = x.clone()
            for t in (1, 2, 3):  # four groups, each rotated with one call
                sel = (turns == t).nonzero().flatten()
                if len(sel):
                    rotated[sel] = torch.rot90(x[sel], t, dims=(-2, -1))
            out[k] = rotated
    return out


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, data: SplitData, input_key: str, *, task: str, num_classes: int,
    ignore_index: int | None = -1, batch_size: int = 512, device: torch.device | None = None,
    precision: Precision | None = None, channels_last: bool = False, loader: LoaderConfig | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on `data`. Under torch.distributed every rank evaluates its own share
    of the rows (together: every row once) and torchmetrics sums the states across ranks in
    `compute`, so all ranks return the metrics of the whole split; call it on every rank."""
    device = device or next(model.parameters()).device
    rank, world = distributed_info()
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(task, num_classes, ignore_index if ignore_index is not None else -1, device)
    for batch in data.batches(batch_size, rank=rank, world=world, even=False, loader=loader, device=device):
        x = batch[input_key].to(device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with (precision or Precision(False, device)).autocast():
            logits = model(x)
        acc.update(logits, batch["target"].to(device))
    model.train(was_training)
    return acc.compute()


@torch.no_grad()
def predict_logits(model: nn.Module, data: SplitData, input_key: str, batch_size: int = 512) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.cat([model(b[input_key].to(device)).cpu() for b in data.batches(batch_size)])
    model.train(was_training)
    return out


@torch.no_grad()
def cache_logits(model: nn.Module, data: SplitData, input_key: str, out_path: str | Path, batch_size: int = 512) -> None:
    """Write the model's logits for every row of `data`, in order, to HDF5 dataset `logits`
    (streamed batch by batch, so it also works for splits that do not fit in memory)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    digest = hashlib.sha256()
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
        ds = None
        for batch in data.batches(batch_size):
            logits = np.ascontiguousarray(model(batch[input_key].to(device)).float().cpu().numpy(), dtype="<f4")
            if ds is None:
                ds = f.create_dataset("logits", shape=(0,) + logits.shape[1:], maxshape=(None,) + logits.shape[1:],
                                      dtype="<f4", chunks=(min(256, len(logits)),) + logits.shape[1:])
            start = ds.shape[0]
            ds.resize(start + len(logits), axis=0)
            ds[start:] = logits
            digest.update(logits.tobytes())
        if ds is not None:
            ds.attrs[LOGITS_CHECKSUM_ATTR] = digest.hexdigest()
    model.train(was_training)


LOGITS_CHECKSUM_ATTR = "sha256"  # of the `logits` array's little-endian float32 bytes, row order


def verify_logits(path: str | Path, rows_per_read: int = 256) -> int:
    """Check a teacher-logits cache against the checksum `cache_logits` stored; its row count.

    Read in blocks, so a cache larger than memory is checked too (sha256 runs at ~1 GB/s).
    Raises DataFormatError naming the file when it is unreadable, has no checksum or does not
    match it (a truncated copy, a disk fault, values edited in place)."""
    try:
        with h5py.File(path, "r") as f:
            if "logits" not in f:
                raise DataFormatError(path, "no dataset 'logits': not a teacher-logits cache")
            ds = f["logits"]
            expected = ds.attrs.get(LOGITS_CHECKSUM_ATTR)
            if expected is None:
                raise DataFormatError(path, "cached teacher logits carry no checksum (written by older code): "
                                            "rerun the teacher stage")
            digest = hashlib.sha256()
            for start in range(0, ds.shape[0], rows_per_read):
                digest.update(np.ascontiguousarray(ds[start:start + rows_per_read], dtype="<f4").tobytes())
            rows = int(ds.shape[0])
    except DataFormatError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise DataFormatError(path, f"cached teacher logits are unreadable ({err})") from err
    if digest.hexdigest() != (expected.decode() if isinstance(expected, bytes) else str(expected)):
        raise DataFormatError(path, "cached teacher logits do not match their checksum (corrupt or altered): "
                                    "rerun the teacher stage")
    return rows


# ------------------------------------------------------------------------------ training


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int | None = None


def _optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Adam's fused kernel takes its square root with the exact instruction; the unfused update
    # calls torch.sqrt, which MKL's vector math serves with a kernel chosen by the machine
    # (cmkd/exactmath.py), so its weights would differ between AVX-512 and AVX2-only machines.
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.nesterov:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def code_fingerprint() -> str:
    """Hash of the library's source, so a checkpoint made by other code is never resumed."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.relative_to(Path(__file__).parent).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(*parts: Any) -> str:
    """A hash of everything that defines a run (and of the code); a checkpoint is resumed only
    when it matches."""
    return hashlib.sha256(json.dumps([code_fingerprint(), *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------- checkpoints, DVCLive

_CHECKPOINT_KEYS = ("fingerprint", "epoch", "distiller", "optimizer", "best_val", "best_epoch", "best_state", "history")


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a resumable checkpoint atomically (a kill mid-write leaves the previous one)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: Path, fingerprint: str, distiller: nn.Module, optimizer: torch.optim.Optimizer,
                    desc: str = "") -> dict[str, Any] | None:
    """The checkpoint at `path` loaded into `distiller` and `optimizer`, or None to start afresh:
    when there is none, when it is for another configuration, or when it is unreadable (a disk
    fault, a truncated copy). An unreadable one is moved aside (`<name>.corrupt-<pid>`) with a
    warning naming it, so this run and every retry restart instead of failing on it again."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise KeyError(f"missing {missing}")
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside, whatever broke
        _set_aside(path, err, desc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("%s: checkpoint %s is for another configuration; starting afresh", desc, path)
        return None
    model_before = _cpu_state(distiller)
    try:
        distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:  # noqa: BLE001 - shapes or keys that do not fit: same as unreadable
        distiller.load_state_dict(model_before)
        _set_aside(path, err, desc)
        return None
    return state


def _set_aside(path: Path, err: BaseException, desc: str) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{os.getpid()}")
    os.replace(path, aside)
    log.warning("%s: checkpoint %s is unreadable (%s: %s); moved to %s, training restarts from epoch 0",
                desc, path, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "", aside)


# DVCLive ties each Live to the DVC repository around it, for one logger per experiment; a
# stage runs one logger per seed, several at once (train_run's seed workers), and must write
# only their own folders. dvclive.live looks these names up at each call, and no option or
# environment variable turns them off (`dvcyaml=None`, `save_dvc_exp=False` do not reach them;
# DVCLIVE_TEST moves `dir` and rejects `dvcyaml=None`), hence this patch, scoped to cmkd's calls:
#   mark_dvclive_step_completed / cleanup_dvclive_step_completed: every next_step() writes
#     <$DVC_ROOT or the cwd's repo>/.dvc/tmp/exps/run/DVCLIVE_STEP_COMPLETED (a hint for VS
#     Code) and end() removes it after an exists() check: two seeds ending together raise
#     FileNotFoundError (issue 24);
#   get_dvc_repo: each Live() opens a dvc Repo (its state databases in DVC's site cache dir are
#     written), and under `dvc exp run` end() `git add`s untracked files of `dir` with it;
#   get_dvc_studio_config: live-metric posts to Studio, where parallel seeds would interleave.
# What a logger writes in its `dir` (metrics.json, plots/metrics/**.tsv) depends on none of them.
_LIVE_DETACHED = {
    "get_dvc_repo": lambda: None,
    "get_dvc_studio_config": lambda live: {},
    "mark_dvclive_step_completed": lambda step: None,
    "cleanup_dvclive_step_completed": lambda: None,
}
_LIVE_LOCK = threading.Lock()  # one thread patches and restores at a time


@contextlib.contextmanager
def _detached_dvclive() -> Iterator[None]:
    from unittest import mock

    import dvclive.live

    with _LIVE_LOCK, mock.patch.multiple(dvclive.live, **_LIVE_DETACHED):
        yield


class LiveLog:
    """A run's DVCLive logger that writes only in its `log_dir`: never in the DVC repository
    around it (see _LIVE_DETACHED), so the seed workers of a stage cannot race on shared files."""

    def __init__(self, log_dir: str | Path):
        from dvclive import Live

        with _detached_dvclive():
            self._live = Live(dir=str(log_dir), resume=False, save_dvc_exp=False, dvcyaml=None)

    def record(self, record: Mapping[str, Any]) -> None:
        """Log one epoch's values (all but "epoch") and close the step."""
        with _detached_dvclive():
            for k, v in record.items():
                if k != "epoch":
                    self._live.log_metric(k, v)
            self._live.next_step()

    def end(self) -> None:
        with _detached_dvclive():
            self._live.end()


def open_live(log_dir: str | Path, history: list[dict[str, Any]]) -> LiveLog:
    """A DVCLive logger in `log_dir` holding the epochs of `history` already, at their steps.

    A resumed run writes its outputs into a new temporary folder, so the curves of the epochs
    before the kill are logged again from the checkpoint's history: the files are the same as an
    uninterrupted run's (DVCLive writes no timestamps)."""
    live = LiveLog(log_dir)
    for record in history:
        live.record(record)
    return live


def _run_state(scheduler, precision: Precision) -> dict[str, Any]:
    """What a checkpoint needs besides weights and optimiser to resume the exact run."""
    state = {}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if precision.scaler is not None:
        state["scaler"] = precision.scaler.state_dict()
    return state


def _load_run_state(state: Mapping[str, Any], scheduler, precision: Precision) -> None:
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if precision.scaler is not None:
        precision.scaler.load_state_dict(state["scaler"])


def fit(
    distiller: nn.Module,
    train: SplitData,
    val: SplitData,
    cfg: TrainConfig,
    *,
    task: str,
    num_classes: int,
    ignore_index: int | None = -1,
    checkpoint_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "",
    fingerprint: str = "",
) -> FitResult:
    """Train `distiller` (a cmkd.methods Distiller) and load its best state on `val`.

    The network selected on validation is the first deployable (`deployables()`); its
    primary metric (weighted F1 or mIoU) picks the best epoch. Test data is never seen here.
    """
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    rank, world = distributed_info()
    distiller.to(device)
    channels_last = cfg.channels_last is True or (cfg.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
    # A distiller may give some parameters their own learning rate (CTKD's temperature).
    if hasattr(distiller, "param_groups"):
        params = distiller.param_groups(cfg.lr)
    else:
        params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)
    precision = Precision(cfg.amp, device)
    scheduler = build_scheduler(optimizer, cfg.schedule_spec, cfg.epochs, train.steps_per_epoch(cfg.batch_size, rank, world))
    loader_cfg = cfg.loader_config
    select = primary_metric(task)
    main_name, (main_net, main_key) = next(iter(distiller.deployables().items()))
    if cfg.augment is not None and "teacher_logits" in train.keys:
        train = train.without("teacher_logits")  # cached logits are those of un-augmented inputs

    fingerprint = fingerprint or run_fingerprint(cfg.fingerprint(), type(distiller).__name__)
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    start_epoch, best_val, best_epoch, best_state, history = 0, None, -1, None, []
    resumed = None
    state = load_checkpoint(ckpt_path, fingerprint, distiller, optimizer, desc) if ckpt_path is not None else None
    if state is not None:
        start_epoch = int(state["epoch"]) + 1
        best_val = json.loads(state["best_val"])
        best_epoch = int(state["best_epoch"])
        best_state = state["best_state"]
        history = json.loads(state["history"])
        _load_run_state(state, scheduler, precision)
        resumed = start_epoch
        log.info("%s: resumed after epoch %d from %s", desc, start_epoch - 1, ckpt_path)

    if hasattr(distiller, "on_train_start"):
        distiller.on_train_start(train)  # e.g. NTDH's feature mask, estimated once on train rows

    step_module: nn.Module = distiller
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(distiller, find_unused_parameters=True)
    step_module = maybe_compile(step_module, cfg.compile)

    live = open_live(log_dir, history) if log_dir is not None and rank == 0 else None

    bar = tqdm(range(start_epoch, cfg.epochs), desc=desc or "train", disable=not progress or rank != 0,
               initial=start_epoch, total=cfg.epochs, leave=False, dynamic_ncols=True)
    for epoch in bar:
        epoch_seed = cfg.seed * 1_000_003 + epoch
        torch.manual_seed(epoch_seed)
        distiller.on_epoch_start(epoch, cfg.epochs)
        distiller.train()
        sums: dict[str, float] = {}
        n_steps = 0
        # Augmented as the batches are made (in the loader's workers for streamed splits).
        for batch in train.batches(cfg.batch_size, shuffle=True, seed=epoch_seed, rank=rank, world=world,
                                   augment=cfg.augment, aug_seed=epoch_seed + 1, loader=loader_cfg, device=device):
            if len(batch["index"]) < 2:
                continue  # a trailing batch of one row breaks BatchNorm's batch statistics
            batch = _to_device(batch, device)
            if channels_last:
                batch = to_channels_last(batch)
            with precision.autocast():
                losses = step_module(batch)
                loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss at epoch {epoch}: { {k: float(v) for k, v in losses.items()} }")
            backward_and_step(loss, optimizer, params, precision, cfg.grad_clip)
            if scheduler is not None:
                scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            n_steps += 1
        val_metrics = evaluate(main_net, val, main_key, task=task, num_classes=num_classes,
                               ignore_index=ignore_index, batch_size=cfg.eval_batch_size, device=device,
                               precision=precision, channels_last=channels_last, loader=loader_cfg)
        record = {"epoch": epoch, **{f"train/{k}": v / max(n_steps, 1) for k, v in sums.items()},
                  **{f"val/{k}": v for k, v in val_metrics.items() if isinstance(v, float)}}
        if hasattr(distiller, "epoch_log"):  # a method's own per-epoch values (CTKD's tau)
            record.update({f"train/{k}": float(v) for k, v in distiller.epoch_log().items()})
        if scheduler is not None:
            record["train/lr"] = optimizer.param_groups[0]["lr"]  # for the next epoch's first step
        history.append(record)
        if best_val is None or val_metrics[select] > best_val[select]:
            best_val, best_epoch, best_state = val_metrics, epoch, _cpu_state(distiller)
        bar.set_postfix(loss=f"{record['train/loss']:.3f}", **{select: f"{val_metrics[select]:.3f}"})
        if live is not None:
            live.record(record)
        if ckpt_path is not None and rank == 0:
            save_checkpoint(ckpt_path, {
                "fingerprint": fingerprint, "epoch": epoch, "distiller": _cpu_state(distiller),
                "optimizer": optimizer.state_dict(), "best_val": json.dumps(best_val),
                "best_epoch": best_epoch, "best_state": best_state, "history": json.dumps(history),
                **_run_state(scheduler, precision),
            })
    bar.close()
    if live is not None:
        live.end()
    assert best_state is not None
    distiller.load_state_dict(best_state)
    log.info("%s: best %s %.4f at epoch %d (%s)", desc, select, best_val[select], best_epoch, main_name)
    return FitResult(best_epoch=best_epoch, best_val=best_val, history=history, resumed_from_epoch=resumed)
