"""What the diagnosis costs against one distill stage ("well under one distill run").

    CMKD_SEED_WORKERS=1 python benchmarks/diagnosis_cost.py synthetic [digits ...]

Per dataset, in this process with one intra-op thread (as the stages run): the diagnose stage's
work (`measure_dataset` + the predictor, every reporting seed) and distill@<dataset>-kdv1's work
(`train_run` of kdv1 with its tuned configuration, every seed, into a temporary folder: the
pipeline's own outputs are untouched). Wall and CPU seconds (user + system, forked seed workers
included); needs data/prepared/<ds>.h5 and data/runs/<ds>/{teacher,student}. Writes
benchmarks/results/diagnosis_cost.json (merging with what is there) with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
OUT = Path("benchmarks/results/diagnosis_cost.json")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn):
    wall, cpu = time.perf_counter(), _cpu()
    fn()
    return {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_cpu() - cpu, 2)}


def main() -> None:
    from cmkd.utils.determinism import pin_cpu_kernels

    pin_cpu_kernels()
    import torch

    from cmkd.config import load_params
    from cmkd.diagnosis.report import apply_predictor, check_config, load_predictor, measure_dataset
    from cmkd.pipeline.train import train_run
    from cmkd.pipeline.tuning import TUNED_FILE, load_tuned, tuned_run_config
    from cmkd.training.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("datasets", nargs="+")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    params = load_params("params.yaml")
    cfg = check_config(params["diagnosis"])
    predictor = load_predictor(Path("diagnosis_predictor.json"))
    workers = int(os.environ.get("CMKD_SEED_WORKERS", "1"))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for ds in args.datasets:
        runs, prepared = Path("data/runs") / ds, Path("data/prepared") / f"{ds}.h5"
        load = os.getloadavg()[0]
        diag = timed(lambda: apply_predictor(measure_dataset(prepared, runs / "teacher", runs / "student",
                                                             params["models"][ds],
                                                             params["seeds"], ds, cfg), predictor, cfg))
        run_cfg, selected = tuned_run_config(params["runs"]["kdv1"], load_tuned(Path(TUNED_FILE)), ds, "kdv1")
        with tempfile.TemporaryDirectory() as tmp:
            distill = timed(lambda: train_run(
                dataset=ds, prepared=prepared, run_name="kdv1", run_cfg=run_cfg, models=params["models"][ds],
                train_cfg=TrainConfig.from_params(params["train"][ds]["student"], f"train.{ds}.student"),
                                              seeds=params["seeds"],
                out_dir=Path(tmp), checkpoint_root=None, teacher_dir=runs / "teacher",
                teacher_train_cfg=TrainConfig.from_params(params["train"][ds]["teacher"], f"train.{ds}.teacher"),
                progress=False, seed_workers=workers, selected_on=selected))
        results[ds] = {"diagnose": diag, "distill_kdv1": distill, "seeds": len(params["seeds"]),
                       "seed_workers": workers,
                       "cpu_ratio": round(diag["cpu_s"] / max(distill["cpu_s"], 1e-9), 4),
                       "wall_ratio": round(diag["wall_s"] / max(distill["wall_s"], 1e-9), 4),
                       "load_average": round(load, 2)}
        print(ds, json.dumps(results[ds]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
