"""Run by test_engine.py under torchrun: trains a small MLP with DDP (gloo, CPU) and writes
each rank's final parameters. `train` is also called in-process for the reference run."""

import json
import sys

import torch

from cmkd.data.datasets.synthetic import ntdh_sklearn
from cmkd.methods import build_distiller
from cmkd.models import build_model
from cmkd.training.config import TrainConfig
from cmkd.training.data import SplitData
from cmkd.training.distributed import distributed_info, init_distributed_from_env, seed_everything
from cmkd.training.loop import fit


def train(batch_size: int) -> torch.Tensor:
    t, s, y = ntdh_sklearn(n_samples=400, n_features=8, n_classes=3, gamma=0.0, seed=0)
    train_data = SplitData.from_arrays(teacher_input=t[:300], student_input=s[:300], target=y[:300])
    val = SplitData.from_arrays(teacher_input=t[300:], student_input=s[300:], target=y[300:])
    seed_everything(0)
    model = build_model({"arch": "mlp", "hidden": [16]}, (8,), 3)  # no BatchNorm: DDP == big batch
    distiller = build_distiller({"method": "supervised"}, student=model, teacher=None, num_classes=3)
    fit(distiller, train_data, val, TrainConfig(epochs=3, batch_size=batch_size, lr=0.01, seed=0),
        task="classification", num_classes=3, progress=False)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


if __name__ == "__main__":
    init_distributed_from_env()
    rank, world = distributed_info()
    params = train(batch_size=32)
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": world, "params": params.tolist()}, f)
