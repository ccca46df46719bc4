"""Pilot for the seed counts of the synthetic experiments (run once, before the real runs).

For every experiment it runs the params.yaml configuration on PILOT seeds (1000..1009, disjoint
from the seeds 0..n-1 the real runs use), takes the largest standard deviation over sweep
points of each metric a claim tests, and chooses

    n = ceil((1.25 * pilot_std / target_sem) ** 2)      (at least 5)

so that the standard error of every point's mean is at most `target_sem` even if the pilot
underestimated the spread by 25%. The target standard errors are fixed here, before any result:
0.005 (half an accuracy point) for accuracy differences, 0.02 for Algorithm 1's recovered
fraction. Only spreads are recorded, never means, so the pilot cannot steer a claim. The NTDH
masks run on their own seeds (`mask_seeds`), whose count comes from the masks' metrics.

    PYTHONPATH=. python benchmarks/pilot_seed_count.py [names...]   -> benchmarks/results/pilot_seed_count.json
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from cmkd.experiments.analysis import EXPERIMENTS, seeds_needed
from cmkd.utils.atomic import write_json

PILOT_SEEDS = list(range(1000, 1010))
SAFETY = 1.25
MINIMUM = 5
# metric -> target standard error of a point's mean
TARGETS = {
    "mfh_gamma": {"kd_gain": 0.005},
    "mfh_alpha": {"kd_gain": 0.005},
    "mfh_alg1": {"mgkd_minus_kd": 0.005, "recovered_fraction": 0.02},
    "ntdh_gap": {"kd_gain": 0.005, "masks.ntdh_sample_minus_kd": 0.005, "masks.ntdh_feature_minus_kd": 0.005},
    "digits_noise": {"kd_gain": 0.005},
}


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())["experiments"]
    torch.set_num_threads(1)  # as the stages run (stages/_common.py)
    out_path = root / "benchmarks" / "results" / "pilot_seed_count.json"
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    report.update({"pilot_seeds": PILOT_SEEDS, "safety_factor": SAFETY, "minimum": MINIMUM,
                   "rule": "n = max(minimum, ceil((safety * max_point_std / target_sem)^2))"})
    names = sys.argv[1:] or list(TARGETS)
    for name in names:
        cfg = copy.deepcopy(params[name])
        cfg["seeds"] = PILOT_SEEDS
        if "mask_seeds" in cfg:
            cfg["mask_seeds"] = PILOT_SEEDS
        start = time.perf_counter()
        result = EXPERIMENTS[name].run(cfg, key=f"experiments.{name}")
        seconds = time.perf_counter() - start
        entry = {"seconds_for_pilot": round(seconds, 1), "metrics": {}}
        for metric, target in TARGETS[name].items():
            points = result["masks"]["points"] if metric.startswith("masks.") else result["points"]
            key = metric.split(".", 1)[-1]
            if not points or key not in points[0]:
                entry["metrics"][metric] = {"skipped": "not in this run's results"}
                continue
            max_std = max(p[key]["std"] for p in points)
            entry["metrics"][metric] = {
                "max_point_std": round(max_std, 5), "target_sem": target,
                "seeds_needed": seeds_needed(SAFETY * max_std, target, MINIMUM),
            }
        # The masks run on their own seeds (`mask_seeds`), so their metrics set that count.
        for prefix, field in (("", "seeds_needed"), ("masks.", "mask_seeds_needed")):
            needed = [m["seeds_needed"] for k, m in entry["metrics"].items()
                      if "seeds_needed" in m and k.startswith("masks.") == (prefix == "masks.")]
            if needed:
                entry[field] = max(needed)
        report[name] = entry
        print(name, json.dumps(entry), flush=True)
        write_json(out_path, report)


if __name__ == "__main__":
    main()
