"""Run by test_engine.py under torchrun: every rank evaluates its share of a split (in memory
and streamed) and trains one epoch on a streamed split with a loader worker; writes what each
rank saw and the metrics it got. `reference` computes the same in one process."""

import json
import sys
from pathlib import Path

import numpy as np
from torch import nn

from cmkd.data.h5 import PreparedWriter
from cmkd.data.loader import LoaderConfig
from cmkd.methods import build_distiller
from cmkd.models import build_model
from cmkd.training.config import TrainConfig
from cmkd.training.data import load_split
from cmkd.training.distributed import distributed_info, init_distributed_from_env, seed_everything
from cmkd.training.evaluate import evaluate
from cmkd.training.loop import fit

ATTRS = {"task": "segmentation", "class_names": ["a", "b", "c"], "modalities": ["x"], "teacher_modality": "x",
         "student_modality": "x", "ignore_index": -1, "source_checksum": "t"}


def write_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 2, 4, 6)).astype(np.float32)
    y = np.where(x[:, 0] > 0.8, -1, (x[:, 1] > 0).astype(np.int8) + (x[:, 0] > 0))
    with PreparedWriter(path, ATTRS, chunk_rows=4) as w:
        w.write("train", {"x": x, "labels": y.astype(np.int8)})


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x):
        self.rows += len(x)
        return self.net(x)


def model():
    seed_everything(0)
    return build_model({"arch": "seg_resnet", "width": 4}, (2, 4, 6), 3)


def evaluate_all(path: Path) -> dict:
    out = {}
    for in_memory in (True, False):
        data = load_split(path, "train", ATTRS, in_memory=in_memory)
        net = Counting(model())
        metrics = evaluate(net, data, "student_input", task="segmentation", num_classes=3, batch_size=5,
                           loader=LoaderConfig(workers=1, persistent=False))
        out["memory" if in_memory else "stream"] = {"rows": net.rows, "miou": metrics["miou"],
                                                    "accuracy": metrics["accuracy"]}
    return out


def train_streamed(path: Path) -> dict:
    data = load_split(path, "train", ATTRS, in_memory=False)
    net = model()
    distiller = build_distiller({"method": "supervised"}, student=net, teacher=None, num_classes=3)
    result = fit(distiller, data, data, TrainConfig(epochs=2, batch_size=4, lr=0.01, seed=0, augment="flip",
                                                    loader={"workers": 1},
                                                    schedule={"name": "cosine", "warmup_epochs": 1}),
                 task="segmentation", num_classes=3, progress=False)
    return {"best_val": result.best_val["miou"], "params": float(sum(p.double().sum() for p in net.parameters()))}


if __name__ == "__main__":
    init_distributed_from_env()
    rank, world = distributed_info()
    out_dir = Path(sys.argv[1])
    result = {"rank": rank, "world": world, "eval": evaluate_all(out_dir / "d.h5"),
              "train": train_streamed(out_dir / "d.h5")}
    (out_dir / f"eval_rank{rank}.json").write_text(json.dumps(result))
