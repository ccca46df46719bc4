"""Algorithm 1 (cmkd.methods.mfh.algorithm1): does the joint pair train enough to find the
modality-general channels, and what does it cost?

A. Recovered fraction with known ground truth: the pipeline's `synthetic` data (NTDH's sklearn
   generator, 32 features, gamma 0.5: teacher input channels 0-15 are the student's too), the
   `synthetic` MLP pair of params.yaml, the top 16 channels, for MFH's distance (mse, MG-KD) and
   NTDH's (ntdh, the NTDH feature mask), with the joint pair trained 20 full-batch epochs (MG-KD's
   old setting), 200 full-batch epochs, or minibatch epochs.
B. Cost per seed of the feature-level Algorithm 1 on the `digits` CNN pair (small_cnn, as
   params.yaml `models.digits`), with the pair budget of params.yaml `runs.kdv1_ntdh_feat`,
   NTDH's distance.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_algorithm1.py [--seeds 3] [--only synthetic|digits]
        -> benchmarks/results/algorithm1.json (a part run alone replaces only its own entry)

Costs are the process's CPU seconds (one thread: what the step costs an idle core, whatever the
machine's load) and wall-clock seconds at the current load (recorded: os.getloadavg()).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from cmkd.experiments.analysis import digits_arrays
from cmkd.utils.atomic import write_json
from cmkd.data.datasets.synthetic import GENERATORS, n_shared
from cmkd.methods.mfh import algorithm1
from cmkd.models import build_model

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"20 full-batch epochs": (20, None), "200 full-batch epochs": (200, None), "20 epochs of 64-row minibatches": (20, 64),
         "5 epochs of 32-row minibatches": (5, 32)}


def recovered(params: dict, seeds: list[int]) -> dict:
    data = params["data"]["synthetic"]
    models = params["models"]["synthetic"]
    n_train = int(data["n_samples"] * data["split"][0])
    shared = n_shared(int(data["n_features"]), float(data["gamma"]))
    out = {"shared_channels": shared, "train_rows": n_train, "results": []}
    for distance in ("mse", "ntdh"):
        for label, (epochs, batch) in PAIRS.items():
            fractions, seconds, cpu = [], [], []
            for seed in seeds:
                x_t, x_s, y = GENERATORS["ntdh"](n_samples=int(data["n_samples"]), n_features=int(data["n_features"]),
                                                 n_classes=int(data["n_classes"]), gamma=float(data["gamma"]), seed=seed)
                x_t, x_s, y = (torch.from_numpy(a[:n_train]) for a in (x_t, x_s, y))
                torch.manual_seed(seed)
                t = build_model(models["teacher"], (x_t.shape[1],), int(data["n_classes"]))
                s = build_model(models["student"], (x_s.shape[1],), int(data["n_classes"]))
                start, start_cpu = time.perf_counter(), time.process_time()
                channels, _ = algorithm1(t, s, x_t, x_s, y, shared, distance=distance, pair_epochs=epochs, pair_lr=0.01,
                                         pair_batch_size=batch, generator=torch.Generator().manual_seed(seed))
                seconds.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
                fractions.append(len(set(channels.tolist()) & set(range(shared))) / shared)
            row = {"distance": distance, "pair": label, "recovered_fraction": fractions,
                   "recovered_mean": float(np.mean(fractions)), "wall_s_per_seed": float(np.mean(seconds)),
                   "cpu_s_per_seed": float(np.mean(cpu))}
            print(row, flush=True)
            out["results"].append(row)
    return out


def digits_cost(params: dict, seeds: list[int]) -> dict:
    models = params["models"]["digits"]
    run = params["runs"]["kdv1_ntdh_feat"]  # the pair budget the pipeline's NTDH feature mask uses
    rows, cpu = [], []
    for seed in seeds:
        gray, colour, labels, split = digits_arrays(params["data"]["digits"], 0.0, seed)
        tr = split["train"]
        x_t, x_s, y = torch.from_numpy(gray[tr]), torch.from_numpy(colour[tr]), torch.from_numpy(labels[tr]).long()
        torch.manual_seed(seed)
        t = build_model(models["teacher"], tuple(x_t.shape[1:]), 10)
        s = build_model(models["student"], tuple(x_s.shape[1:]), 10)
        start, start_cpu = time.perf_counter(), time.process_time()
        channels, _ = algorithm1(t, s, x_t, x_s, y, t.feature_dim // 2, level="feature", distance="ntdh", pair_epochs=int(run["pair_epochs"]),
                                 pair_lr=float(run["pair_lr"]), pair_batch_size=run["pair_batch_size"],
                                 generator=torch.Generator().manual_seed(seed))
        rows.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        print({"digits seed": seed, "wall_s": rows[-1], "cpu_s": cpu[-1]}, flush=True)
    return {"train_rows": int(len(tr)), "feature_channels": int(t.feature_dim),
            "pair": f"{run['pair_epochs']} epochs of {run['pair_batch_size']}-row minibatches, lr {run['pair_lr']}",
            "distance": "ntdh", "wall_s_per_seed": rows, "cpu_s_per_seed": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", choices=["synthetic", "digits"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "algorithm1.json"))
    args = p.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = list(range(args.seeds))
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.only and out.exists() else {}
    parts = {"synthetic_recovery": recovered, "digits_feature_level": digits_cost}
    for name, fn in parts.items():
        if args.only in (None, name.split("_")[0]):
            load_before = os.getloadavg()
            result[name] = {**fn(params, seeds), "seeds": seeds, "torch_threads": torch.get_num_threads(),
                            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    write_json(out, result)


if __name__ == "__main__":
    main()
