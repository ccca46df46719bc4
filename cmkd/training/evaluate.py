"""A network's metrics on a split (every rank its share under torch.distributed), and its logits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cmkd.data.loader import LoaderConfig
from cmkd.training.distributed import distributed_info
from cmkd.training.metrics import MetricAccumulator
from cmkd.training.precision import Precision

if TYPE_CHECKING:
    from cmkd.training.data import SplitData


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
