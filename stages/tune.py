"""Stages of the tuning pipeline (tuning/dvc.yaml; README, "Tuning protocol").

    python -m stages tune --dataset digits                  # everything below, for every run of `methods`
    python -m stages tune --dataset digits --teacher        # TEACHER on the tuning seeds -> data/tuning/digits/teacher
    python -m stages tune --dataset digits --run student    # STUDENT's lr -> reports/tuning/digits/student.json
    python -m stages tune --dataset digits --run dkd [--run ctkd ...]   # -> reports/tuning/digits/<run>.json
    python -m stages tune --dataset digits --select         # -> reports/tuning/digits.{json,md} and tuned.yaml

`--run` tunes only the named runs (their evidence files are replaced, the others kept); the
selection then reads every run's evidence file. STUDENT (`--run student`) comes first: its
selected training is the recipe every distill run is tuned (and trained) with. tuned.yaml is
deliberately not a DVC output: the main pipeline reads it as a params file, so a plain
`dvc repro` never runs the tuning.
"""

import json
import tempfile
from pathlib import Path

from cmkd.config import STUDENT_RUN, STUDENT_TUNING, TEACHER_RUN
from cmkd.errors import ConfigError
from cmkd.pipeline.layout import TUNED_FILE, prepared_file, tuning_evidence_file, tuning_report
from cmkd.pipeline.layout import tuning_teacher_dir as teacher_dir
from cmkd.pipeline.train import train_run
from cmkd.pipeline.tuning import (
    grid_for,
    load_tuned,
    render_tuned,
    report_markdown,
    run_bounds,
    tune_run,
    update_tuned,
)
from cmkd.training.config import TrainConfig
from cmkd.training.resolve import models_of, roles_for_prepared
from cmkd.utils.atomic import atomic_dir, write_json, write_text
from cmkd.utils.determinism import provenance
from stages._common import main, parser, seed_workers, start


def dataset_roles(params, ds: str) -> dict:
    """Each role's model and training (params.yaml's blocks, or a paired dataset's defaults)."""
    return roles_for_prepared(params, ds, prepared_file(ds))


def train_teacher(params, ds: str, progress: bool) -> None:
    """The TEACHER on the tuning seeds (the reporting seeds' teachers are never used here)."""
    roles = dataset_roles(params, ds)
    cfg = TrainConfig.from_params(roles["teacher"]["train"], f"train.{ds}.teacher")
    with atomic_dir(teacher_dir(ds)) as out:
        train_run(dataset=ds, prepared=prepared_file(ds), run_name="teacher", run_cfg=TEACHER_RUN,
                  models=models_of(roles), train_cfg=cfg, seeds=params["tuning"]["seeds"], out_dir=Path(out),
                  checkpoint_root=None, cache_train_logits=True, progress=progress, seed_workers=seed_workers(),
                  evaluate_test=False)


def student_selection(ds: str) -> dict:
    """STUDENT's selected training values on `ds` (its evidence file): the recipe the KD runs are
    tuned with, as they are then trained with it (tuned_train_params)."""
    path = tuning_evidence_file(ds, STUDENT_TUNING)
    if not path.exists():
        raise ConfigError(f"tuning.grids.{STUDENT_TUNING}", f"{path} is missing: tune STUDENT first "
                          f"(python -m stages tune --dataset {ds} --run {STUDENT_TUNING})")
    return dict(json.loads(path.read_text())["selected"])


def run_config(params, run: str) -> dict:
    if run == STUDENT_TUNING:
        return dict(STUDENT_RUN)
    if run not in params["runs"]:
        raise ConfigError(f"runs.{run}", f"missing: --run must name a key of `runs` or {STUDENT_TUNING!r}")
    return params["runs"][run]


def tune(params, ds: str, run: str, progress: bool) -> None:
    run_cfg = run_config(params, run)
    tuning = params["tuning"]
    roles = dataset_roles(params, ds)
    student = run == STUDENT_TUNING
    train_overrides = {} if student else student_selection(ds)
    if not student and not (teacher_dir(ds) / "metrics.json").exists():
        train_teacher(params, ds, progress)
    with tempfile.TemporaryDirectory(prefix=f"tune-{ds}-{run}-") as work:
        evidence = tune_run(
            dataset=ds, prepared=prepared_file(ds), run_name=run, run_cfg=run_cfg,
            grid=grid_for(params, run), budget=int(tuning["budget"]),
            subsample_seed=int(tuning.get("subsample_seed", 0)),
            seeds=tuning["seeds"], models=models_of(roles),
            train_cfg=TrainConfig.from_params({**roles["student"]["train"], **train_overrides}, f"train.{ds}.student"),
            teacher_dir=None if student else teacher_dir(ds),
            teacher_train_cfg=TrainConfig.from_params(roles["teacher"]["train"], f"train.{ds}.teacher"),
            work_dir=Path(work), tuning=tuning, seed_workers=seed_workers(), progress=progress)
    evidence["run_config"] = run_cfg
    evidence["train_overrides"] = train_overrides
    evidence["provenance"] = provenance()
    write_json(tuning_evidence_file(ds, run), evidence)
    if evidence.get("skipped"):
        print(f"{ds}/{run}: n/a ({evidence['skipped']})")
        return
    print(f"{ds}/{run}: selected {evidence['selected']} (val {100 * evidence['selected_val_mean']:.2f}) "
          f"in {evidence['seconds']:.0f} s")


def select(params, ds: str) -> None:
    """Gather every run's evidence into the dataset's report and its section of tuned.yaml."""
    tuning = params["tuning"]
    epochs = int(dataset_roles(params, ds)["student"]["train"]["epochs"])
    runs, untuned = {}, []
    student = {}
    for run in [STUDENT_TUNING, *params["methods"]]:
        path = tuning_evidence_file(ds, run)
        if not path.exists():
            untuned.append(run)
            continue
        evidence = json.loads(path.read_text())
        grid = grid_for(params, run)
        current = {"grid": {k: list(v) for k, v in grid.items()}, "seeds": list(tuning["seeds"]),
                   "budget": int(tuning["budget"]), "run_config": run_config(params, run),
                   "epochs": epochs, "bounds": run_bounds(tuning, run, grid),
                   "extension": {"max_rounds": int(tuning["extension"]["max_rounds"]),
                                 "max_extra_configs": int(tuning["extension"]["max_extra_configs"])},
                   "train_overrides": {} if run == STUDENT_TUNING else student}
        recorded = {**evidence, "extension": {k: (evidence.get("extension") or {}).get(k)
                                              for k in ("max_rounds", "max_extra_configs")}}
        stale = [k for k, v in current.items() if json.loads(json.dumps(v)) != recorded.get(k)]
        if stale:
            raise ConfigError(f"tuning.grids.{run}", f"{path} was made with other {', '.join(stale)}: re-tune it "
                              f"(python -m stages tune --dataset {ds} --run {run})")
        runs[run] = evidence
        if run == STUDENT_TUNING:
            student = dict(evidence["selected"])
    seconds = sum(r["seconds"] for r in runs.values())
    summary = {"dataset": ds, "split": "val", "seeds": list(tuning["seeds"]), "budget": int(tuning["budget"]),
               "extension": dict(tuning["extension"]),
               "selected": {r: e["selected"] for r, e in runs.items()}, "untuned": untuned,
               "on_edge": sorted(r for r, e in runs.items() if e.get("on_edge")),
               "within_noise": sorted(r for r, e in runs.items() if e.get("within_noise")),
               "seconds_total": round(seconds, 1), "runs": runs}
    write_json(tuning_report(ds), summary)
    ext = tuning["extension"]
    extra = {"tuning seeds": list(tuning["seeds"]), "budget": f"{tuning['budget']} configurations x "
             f"{len(tuning['seeds'])} seeds x {epochs} epochs per run (STUDENT included), plus at most "
             f"{ext['max_extra_configs']} configurations in {ext['max_rounds']} rounds where an optimum sits on an "
             "edge",
             "STUDENT's selection": f"{student or 'not tuned'} (the training of STUDENT and of every distill run)",
             "training seconds (all runs)": f"{seconds:.0f}"}
    if untuned:
        extra["not tuned (params.yaml values)"] = ", ".join(untuned)
    write_text(tuning_report(ds, ".md"), report_markdown(ds, runs, extra))
    tuned = update_tuned(load_tuned(TUNED_FILE), [STUDENT_TUNING, *params["runs"]], ds,
                         {r: e["selected"] for r, e in runs.items()})
    write_text(TUNED_FILE, render_tuned(tuned))
    print(f"{ds}: selection of {len(runs)} runs written to {TUNED_FILE} ({len(untuned)} not tuned)")


def run() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--run", action="append", help="tune only this run (repeatable)")
    p.add_argument("--teacher", action="store_true", help="only train the TEACHER on the tuning seeds")
    p.add_argument("--select", action="store_true", help="only gather the evidence into the report and tuned.yaml")
    args = p.parse_args()
    params = start(args)
    if "tuning" not in params:
        raise ConfigError("tuning", "missing: the tuning protocol needs seeds, budget and grids")
    ds, progress = args.dataset, not args.no_progress
    if args.teacher:
        train_teacher(params, ds, progress)
    for name in args.run or []:
        tune(params, ds, name, progress)
    if not (args.teacher or args.run or args.select):
        for name in [STUDENT_TUNING, *params["methods"]]:  # STUDENT first: the runs train with its recipe
            tune(params, ds, name, progress)
    if args.select or not (args.teacher or args.run):
        select(params, ds)


if __name__ == "__main__":
    main(run)
