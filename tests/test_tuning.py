"""The tuning protocol (cmkd/pipeline/tuning.py, stages/tune.py): grids, equal budgets, selection on the
validation split only, tuning seeds apart from the reporting seeds, the selection merged into
the distill runs, and the run metadata (hyperparameters, selected_on) in metrics.json."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from cmkd.config import apply_overrides, budgeted_configs, expand_grid, load_params, validate_params, validate_tuning
from cmkd.errors import ConfigError
from cmkd.pipeline.tuning import load_tuned, render_tuned, select, tune_run, tuned_run_config, update_tuned
from tests.conftest import REPO, tool_env

PARAMS = load_params(REPO / "params.yaml")


# ---------------------------------------------------------------------------- grids and budget


def test_expand_grid_is_the_product_in_declared_order():
    grid = {"beta": [0.5, 1, 2, 8], "temperature": [1, 4]}
    configs = expand_grid(grid)
    assert len(configs) == 8
    assert configs[:3] == [{"beta": 0.5, "temperature": 1}, {"beta": 0.5, "temperature": 4},
                           {"beta": 1, "temperature": 1}]
    assert ({(c["beta"], c["temperature"]) for c in configs}
            == {(b, t) for b in grid["beta"] for t in grid["temperature"]})


def test_budget_subsamples_deterministically_and_rejects_small_grids():
    grid = {"a": [1, 2, 3, 4], "b": [10, 20, 30], "c": [True, False]}  # 24 configurations
    kept = budgeted_configs(grid, 8, subsample_seed=0)
    assert len(kept) == 8
    assert len({json.dumps(c, sort_keys=True) for c in kept}) == 8  # no repeats
    full = expand_grid(grid)
    assert all(c in full for c in kept)
    assert [full.index(c) for c in kept] == sorted(full.index(c) for c in kept)  # grid order kept
    assert budgeted_configs(grid, 8, subsample_seed=0) == kept  # deterministic
    assert budgeted_configs(grid, 8, subsample_seed=1) != kept  # the seed decides which
    assert budgeted_configs({"a": [1, 2]}, 2) == [{"a": 1}, {"a": 2}]
    with pytest.raises(ConfigError, match="tuning.grids.x.*fewer than tuning.budget"):
        budgeted_configs({"a": [1, 2, 3]}, 4, key="tuning.grids.x")


def test_every_method_of_params_yaml_gets_the_same_budget():
    tuning = PARAMS["tuning"]
    sizes = {run: len(budgeted_configs(tuning["grids"][run], tuning["budget"], tuning["subsample_seed"]))
             for run in PARAMS["methods"]}
    assert set(sizes.values()) == {tuning["budget"]}, sizes
    # ... with the same tuning seeds and the distill runs' epochs (tune_run takes them from there)
    assert len(tuning["seeds"]) >= 2


def test_grids_cover_the_issue_ranges():
    grids = PARAMS["tuning"]["grids"]
    assert set(grids["dkd"]["beta"]) >= {0.5, 1, 2, 8} and set(grids["dkd"]["temperature"]) >= {1, 4}
    assert set(grids["mlkd"]["class_norm"]) == {"none", "batch"}
    assert None in grids["ctkd"]["temperature_lr"] and max(v for v in grids["ctkd"]["temperature_lr"] if v) >= 0.05
    assert len(grids["kdv2_lskd"]) == 2 and "temperature" in grids["kdv2_lskd"]  # base temperature x KD weight


# ---------------------------------------------------------------------------- validation


def _params(**tuning_changes):
    params = copy.deepcopy(PARAMS)
    params["tuning"].update(tuning_changes)
    return params


def test_tuning_seeds_must_be_disjoint_from_reporting_seeds():
    params = _params(seeds=[100, PARAMS["seeds"][0]])
    with pytest.raises(ConfigError, match=r"tuning\.seeds.*disjoint.*\[" + str(PARAMS["seeds"][0]) + r"\]"):
        validate_tuning(params)
    with pytest.raises(ConfigError, match=r"tuning\.seeds"):
        validate_params(params)  # the whole-file check every stage runs
    validate_tuning(_params(seeds=[100, 101]))


@pytest.mark.parametrize("change, key", [
    (lambda p: p["tuning"]["grids"].pop("dkd"), "tuning.grids.dkd"),
    (lambda p: p["tuning"]["grids"].update(dkd={"beta": [1, 2]}), "tuning.grids.dkd"),
    (lambda p: p["tuning"]["grids"].update(dkd={"gamma": list(range(8))}), "tuning.grids.dkd"),
    (lambda p: p["tuning"]["grids"].update(dkd={"beta": [-1, 1, 2, 3, 4, 5, 6, 7]}), "tuning.grids.dkd"),
    (lambda p: p["tuning"]["grids"].update(nope={"a": [1]}), "tuning.grids.nope"),
    (lambda p: p["tuning"].update(budget=0), "tuning.budget"),
    (lambda p: p["tuning"].update(seeds=[]), "tuning.seeds"),
    (lambda p: p["tuning"].update(seeds=[100, 100]), "tuning.seeds"),
])
def test_bad_tuning_sections_name_the_key(change, key):
    params = copy.deepcopy(PARAMS)
    change(params)
    with pytest.raises(ConfigError) as err:
        validate_tuning(params)
    assert err.value.key.startswith(key), err.value


# ---------------------------------------------------------------------------- selection file


def test_apply_overrides_sets_nested_keys_without_touching_the_input():
    run = {"method": "ntdh_mask", "base": {"method": "kd", "temperature": 4.0}, "drop_ratio": 0.2}
    out = apply_overrides(run, {"base.temperature": 1.0, "drop_ratio": 0.1})
    assert out == {"method": "ntdh_mask", "base": {"method": "kd", "temperature": 1.0}, "drop_ratio": 0.1}
    assert run["base"]["temperature"] == 4.0 and run["drop_ratio"] == 0.2
    with pytest.raises(ConfigError, match="drop_ratio"):
        apply_overrides(run, {"drop_ratio.x": 1})


def test_selection_is_merged_into_the_run_config(tmp_path):
    tuned = update_tuned({}, ["dkd", "kdv1"], "digits", {"dkd": {"beta": 1, "temperature": 1}})
    tuned = update_tuned(tuned, ["dkd", "kdv1"], "synthetic", {"dkd": {"beta": 2, "temperature": 4}})
    path = tmp_path / "tuned.yaml"
    path.write_text(render_tuned(tuned))
    loaded = load_tuned(path)
    assert loaded == {"dkd": {"digits": {"beta": 1, "temperature": 1},
                              "synthetic": {"beta": 2, "temperature": 4}}, "kdv1": {}}
    cfg, where = tuned_run_config(PARAMS["runs"]["dkd"], loaded, "digits", "dkd")
    assert where == "val" and cfg["beta"] == 1 and cfg["temperature"] == 1
    assert cfg["alpha"] == PARAMS["runs"]["dkd"]["alpha"]  # the rest comes from params.yaml
    cfg, where = tuned_run_config(PARAMS["runs"]["kdv1"], loaded, "digits", "kdv1")
    assert where == "default" and cfg == PARAMS["runs"]["kdv1"]
    assert tuned_run_config(PARAMS["runs"]["dkd"], loaded, "semantickitti", "dkd")[1] == "default"
    # re-selecting a dataset replaces (or removes) only that dataset's entries
    again = update_tuned(loaded, ["dkd", "kdv1"], "digits", {"kdv1": {"temperature": 2}})
    assert again == {"dkd": {"synthetic": {"beta": 2, "temperature": 4}}, "kdv1": {"digits": {"temperature": 2}}}


def test_committed_tuned_yaml_is_valid_and_names_every_run():
    tuned = load_tuned(REPO / "tuned.yaml")
    assert set(tuned) == set(PARAMS["runs"])  # update_tuned writes one key per run of `runs`
    for run, by_dataset in tuned.items():
        for ds, selection in by_dataset.items():
            grid = PARAMS["tuning"]["grids"][run]
            assert set(selection) == set(grid), (run, ds)
            assert all(selection[k] in grid[k] for k in grid), (run, ds)


def test_select_takes_the_best_mean_and_the_first_of_ties():
    entries = [{"val_scores": {"100": 0.5, "101": 0.7}},   # mean 0.6
               {"val_scores": {"100": 0.9, "101": 0.4}},   # 0.65
               {"val_scores": {"100": 0.65, "101": 0.65}}]  # 0.65, later
    assert select(entries) == 1


# ---------------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small synthetic dataset and a TEACHER trained on the tuning seeds."""
    from cmkd.config import TEACHER_RUN
    from cmkd.data.datasets import synthetic
    from cmkd.pipeline.train import train_run
    from cmkd.training.config import TrainConfig

    tmp = tmp_path_factory.mktemp("tuning")
    cfg = dict(PARAMS["data"]["synthetic"], n_samples=400, gammas=[0.5])
    h5 = tmp / "synthetic.h5"
    synthetic.prepare(cfg, tmp, h5, progress=False)
    train_cfg = TrainConfig(epochs=2, batch_size=64, lr=0.003, device="cpu")
    train_run(dataset="synthetic", prepared=h5, run_name="teacher", run_cfg=TEACHER_RUN,
              models=PARAMS["models"]["synthetic"],
              train_cfg=train_cfg, seeds=[100, 101], out_dir=tmp / "teacher", checkpoint_root=None,
              cache_train_logits=True,
              progress=False)
    return tmp, h5, train_cfg


def _tune(tmp, h5, train_cfg, work):
    return tune_run(dataset="synthetic", prepared=Path(h5), run_name="kdv2", run_cfg=PARAMS["runs"]["kdv2"],
                    grid={"temperature": [1, 4], "kd_weight": [0.5, 2.0]}, budget=3, subsample_seed=0, seeds=[100, 101],
                    models=PARAMS["models"]["synthetic"], train_cfg=train_cfg, teacher_dir=tmp / "teacher",
                    teacher_train_cfg=train_cfg, work_dir=tmp / work)


def test_selection_reads_validation_only(tiny_data):
    """The same tuning after the test split is scrambled and then deleted: identical evidence."""
    tmp, shared_h5, train_cfg = tiny_data
    h5 = tmp / "scrambled.h5"
    shutil.copy(shared_h5, h5)
    first = _tune(tmp, h5, train_cfg, "a")
    assert len(first["configurations"]) == 3 and first["split"] == "val"
    assert all(set(c["val_scores"]) == {"100", "101"} for c in first["configurations"])
    assert first["selected"] == first["configurations"][select(first["configurations"])]["config"]
    with h5py.File(h5, "r+") as f:
        labels = f["test/labels"][...]
        f["test/labels"][...] = np.roll(labels, 1)
        for key in list(f["test"]):
            if key != "labels":
                f["test"][key][...] = 0
    scrambled = _tune(tmp, h5, train_cfg, "b")
    with h5py.File(h5, "r+") as f:
        del f["test"]
    no_test = _tune(tmp, h5, train_cfg, "c")
    for other in (scrambled, no_test):
        assert [c["val_scores"] for c in other["configurations"]] == [c["val_scores"] for c in first["configurations"]]
        assert other["selected"] == first["selected"]


def test_train_run_records_hyperparameters_and_selected_on(tiny_data):
    from cmkd.pipeline.train import train_run

    tmp, h5, train_cfg = tiny_data
    tuned = {"mlkd": {"synthetic": {"class_norm": "batch", "kd_weight": 2.0}}}
    cfg, where = tuned_run_config(PARAMS["runs"]["mlkd"], tuned, "synthetic", "mlkd")
    train_run(dataset="synthetic", prepared=h5, run_name="mlkd", run_cfg=cfg,
              models=PARAMS["models"]["synthetic"], train_cfg=train_cfg, seeds=[100], out_dir=tmp / "mlkd",
              checkpoint_root=None, teacher_dir=tmp / "teacher", progress=False, selected_on=where, evaluate_test=False)
    metrics = json.loads((tmp / "mlkd" / "metrics.json").read_text())
    assert metrics["selected_on"] == "val"
    hp = metrics["hyperparameters"]
    assert hp["method"] == "mlkd" and hp["class_norm"] == "batch" and hp["kd_weight"] == 2.0
    assert hp["confidence_threshold"] == PARAMS["runs"]["mlkd"]["confidence_threshold"]
    assert hp["strong_noise_std"] == 0.1  # a default the run does not set is recorded too


def test_ctkd_metrics_record_the_temperature_trajectory(tiny_data):
    from cmkd.pipeline.train import train_run

    tmp, h5, train_cfg = tiny_data
    cfg = dict(PARAMS["runs"]["ctkd"], temperature_lr=0.2, ramp_epochs=0)
    result = train_run(dataset="synthetic", prepared=h5, run_name="ctkd", run_cfg=cfg,
                       models=PARAMS["models"]["synthetic"],
                       train_cfg=train_cfg, seeds=[100], out_dir=tmp / "ctkd", checkpoint_root=None,
                       teacher_dir=tmp / "teacher", progress=False, evaluate_test=False)
    method = result["seeds"]["100"]["method"]
    assert len(method["temperature_trajectory"]) == train_cfg.epochs
    assert abs(method["temperature_final"] - cfg["init_temperature"]) > 0.5
    assert json.loads((tmp / "ctkd" / "metrics.json").read_text())["seeds"]["100"]["method"] == method
    live = (tmp / "ctkd" / "seed100" / "live" / "metrics.json")
    assert "temperature" in json.loads(live.read_text())["train"]  # DVCLive: train/temperature


# ---------------------------------------------------------------------------- the stage


def test_distill_stage_merges_tuned_yaml(tmp_path, tiny_data):
    """`python -m stages train --run` reads tuned.yaml beside params.yaml and records it."""
    tmp, h5, _ = tiny_data
    params = copy.deepcopy(PARAMS)
    params["seeds"] = [0]
    params["train"]["synthetic"]["student"]["epochs"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "tuned.yaml").write_text(render_tuned({"dkd": {"synthetic": {"beta": 0.5, "temperature": 1}}}))
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    shutil.copy(h5, tmp_path / "data" / "prepared" / "synthetic.h5")
    teacher = tmp_path / "data" / "runs" / "synthetic" / "teacher" / "seed0"
    teacher.mkdir(parents=True)
    (teacher / "model.pt").symlink_to((tmp / "teacher" / "seed100" / "model.pt").resolve())
    env = tool_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    for run in ("dkd", "kdv1"):
        proc = subprocess.run([sys.executable, "-m", "stages", "train", "--dataset", "synthetic", "--run", run,
                               "--no-progress"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        out = tmp_path / "data" / "runs" / "synthetic" / run / "metrics.json"
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics = json.loads(out.read_text())
        if run == "dkd":
            assert metrics["selected_on"] == "val" and metrics["hyperparameters"]["beta"] == 0.5
            assert metrics["hyperparameters"]["temperature"] == 1
        else:
            assert metrics["selected_on"] == "default"
            assert metrics["hyperparameters"]["temperature"] == PARAMS["runs"]["kdv1"]["temperature"]


# ---------------------------------------------------------------------------- the DVC pipelines


@pytest.mark.slow
def test_root_repro_never_runs_the_tuning_pipeline(tmp_path):
    """`dvc repro` runs no tuning stage; `dvc repro tuning/dvc.yaml` does and writes tuned.yaml;
    the next `dvc repro` reruns exactly the distill stage whose selection changed."""
    from tests.conftest import copy_pipeline, dvc, stages_run, tiny_params

    repo = copy_pipeline(tmp_path / "repo")
    shutil.copytree(REPO / "tuning", repo / "tuning", ignore=shutil.ignore_patterns("dvc.lock"))
    env = tool_env(tmp_path)
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), methods=("kdv1", "kdv2"), epochs=1)
    params["tuning"].update(seeds=[100], budget=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "tuned.yaml").write_text(render_tuned({run: {} for run in params["runs"]}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    dvc(["init", "-q"], repo, env)
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run([*git, "commit", "-qm", "pipeline"], cwd=repo, env=env, check=True)

    first = stages_run(dvc(["repro", "evaluate@synthetic"], repo, env).stdout)
    assert "distill@synthetic-kdv1" in first and not any("tune" in s for s in first)
    assert not any("tune" in s for s in stages_run(dvc(["repro"], repo, env).stdout))
    before = json.loads((repo / "data/runs/synthetic/kdv1/metrics.json").read_text())
    assert before["selected_on"] == "default"

    tuned_run = stages_run(dvc(["repro", "tuning/dvc.yaml:tune_select@synthetic"], repo, env).stdout)
    assert {"tuning/dvc.yaml:tune_teacher@synthetic", "tuning/dvc.yaml:tune@synthetic-kdv1",
            "tuning/dvc.yaml:tune@synthetic-kdv2", "tuning/dvc.yaml:tune_select@synthetic"} <= tuned_run
    assert not any(s.startswith("distill") or s.startswith("train_") for s in tuned_run)
    selection = load_tuned(repo / "tuned.yaml")
    assert set(selection["kdv1"]["synthetic"]) == {"temperature"}
    evidence = json.loads((repo / "reports/tuning/synthetic.json").read_text())
    assert len(evidence["runs"]["kdv1"]["configurations"]) == 2

    after = stages_run(dvc(["repro", "evaluate@synthetic"], repo, env).stdout)
    assert {"distill@synthetic-kdv1", "distill@synthetic-kdv2"} <= after
    assert not any(s.startswith("train_") or "tune" in s for s in after)
    metrics = json.loads((repo / "data/runs/synthetic/kdv1/metrics.json").read_text())
    assert metrics["selected_on"] == "val"
    assert metrics["hyperparameters"]["temperature"] == selection["kdv1"]["synthetic"]["temperature"]
