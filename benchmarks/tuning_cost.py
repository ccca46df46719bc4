"""What the tuning protocol costs (README, "Tuning protocol").

    python benchmarks/tuning_cost.py                      # summarise reports/tuning/<ds>/*.json
    python benchmarks/tuning_cost.py --time synthetic kdv1_ntdh c2kd   # also time these runs' tuning now

The summary reads the wall seconds every run's evidence file records (`seconds`: its 8
configurations x 2 tuning seeds, seed workers as the stage had them) and adds them up per
dataset. `--time` tunes the given runs of one dataset again into a temporary folder (the
evidence is discarded; the committed selection is untouched) to measure runs that have no
evidence yet. Wall seconds depend on the machine's load: the load average is recorded with them.
Writes benchmarks/results/tuning_cost.json (merging with what is there).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPORTS = Path("reports/tuning")
OUT = Path("benchmarks/results/tuning_cost.json")


def summarise(params) -> dict:
    out = {}
    for ds in params["datasets"]:
        runs = {}
        for path in sorted((REPORTS / ds).glob("*.json")):
            ev = json.loads(path.read_text())
            if ev.get("skipped"):
                continue  # the method is not defined on this dataset: nothing was trained
            n = len(ev["configurations"]) * len(ev["seeds"])
            runs[ev["run"]] = {"seconds": ev["seconds"], "trainings": n,
                               "seconds_per_training": round(ev["seconds"] / n, 2)}
        if runs:
            out[ds] = {"runs": runs, "seconds_total": round(sum(r["seconds"] for r in runs.values()), 1),
                       "trainings_total": sum(r["trainings"] for r in runs.values()),
                       "epochs_per_training": params["train"][ds]["student"]["epochs"]}
    return out


def time_runs(params, ds: str, runs: list[str]) -> dict:
    import torch

    from cmkd.pipeline.tuning import grid_for, tune_run
    from cmkd.training.config import TrainConfig

    torch.set_num_threads(1)
    tuning = params["tuning"]
    teacher = Path("data/tuning") / ds / "teacher"
    if not (teacher / "metrics.json").exists():
        raise SystemExit(f"error: {teacher} missing: run `python -m stages tune --dataset {ds} --teacher` first")
    workers = int(os.environ.get("CMKD_SEED_WORKERS", "1"))
    timed = {}
    for run in runs:
        load = os.getloadavg()[0]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            tune_run(dataset=ds, prepared=Path("data/prepared") / f"{ds}.h5", run_name=run, run_cfg=params["runs"][run],
                     grid=grid_for(params, run), budget=int(tuning["budget"]),
                     subsample_seed=int(tuning.get("subsample_seed", 0)),
                     seeds=tuning["seeds"], models=params["models"][ds],
                     train_cfg=TrainConfig.from_params(params["train"][ds]["student"], f"train.{ds}.student"),
                     teacher_dir=teacher,
                     teacher_train_cfg=TrainConfig.from_params(params["train"][ds]["teacher"], "t"),
                     work_dir=Path(tmp), seed_workers=workers)
        timed[run] = {"seconds": round(time.perf_counter() - start, 1), "load_average_at_start": round(load, 1),
                      "seed_workers": workers}
        print(f"{ds}/{run}: {timed[run]['seconds']} s", flush=True)
    return timed


def main() -> None:
    from cmkd.config import load_params

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--time", nargs="+", metavar=("DATASET", "RUN"), help="a dataset, then the runs to time")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    params = load_params("params.yaml")
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["note"] = ("wall seconds on the project's shared 2-core machine; each run: tuning.budget configurations x "
                      "tuning.seeds, seed workers 2 (one per core), other users' jobs running alongside")
    result["datasets"] = summarise(params)
    if args.time:
        ds, runs = args.time[0], args.time[1:]
        result.setdefault("timed", {}).setdefault(ds, {}).update(time_runs(params, ds, runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for ds, d in result["datasets"].items():
        print(f"{ds}: {d['seconds_total']:.0f} s for {len(d['runs'])} runs ({d['trainings_total']} trainings)")


if __name__ == "__main__":
    main()
