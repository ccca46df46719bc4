"""The teacher's training-split logits, cached once by the teacher stage with a checksum, and
verified before a distillation run reads them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch
from torch import nn

from cmkd.errors import DataFormatError
from cmkd.utils.atomic import atomic_path

if TYPE_CHECKING:
    from cmkd.training.data import SplitData


@torch.no_grad()
def cache_logits(model: nn.Module, data: SplitData, input_key: str, out_path: str | Path,
                 batch_size: int = 512) -> None:
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

    Read in blocks, so a cache larger than memory is checked too.
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
