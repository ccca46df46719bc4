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
from cmkd.pipeline.tuning import (
    axis_spacing,
    load_tuned,
    next_value,
    noise,
    render_tuned,
    search,
    select,
    tune_run,
    tuned_run_config,
    tuned_train_params,
    update_tuned,
    val_se,
)
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
             for run in ["student", *PARAMS["methods"]]}
    assert set(sizes.values()) == {tuning["budget"]}, sizes
    # ... with the same tuning seeds and the distill runs' epochs (tune_run takes them from there), and
    # one extension ceiling for all (tuning.extension has no per-run rounds or configurations)
    assert len(tuning["seeds"]) >= 3
    assert set(tuning["extension"]) <= {"max_rounds", "max_extra_configs", "bounds", "run_bounds"}
    assert tuning["extension"]["max_rounds"] >= 1 and tuning["extension"]["max_extra_configs"] >= 1
    assert set(tuning["grids"]["student"]) <= {"lr", "weight_decay"}


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
    (lambda p: p["tuning"]["grids"].pop("student"), "tuning.grids.student"),
    (lambda p: p["tuning"]["grids"].update(student={"epochs": list(range(1, 9))}), "tuning.grids.student.epochs"),
    (lambda p: p["tuning"]["grids"].update(student={"lr": [0, 1, 2, 3, 4, 5, 6, 7]}), "tuning.grids.student.lr"),
    (lambda p: p["tuning"].pop("extension"), "tuning.extension"),
    (lambda p: p["tuning"]["extension"].update(max_rounds=-1), "tuning.extension.max_rounds"),
    (lambda p: p["tuning"]["extension"]["bounds"].update(beta={"gt": 0}), "tuning.extension.bounds.beta.reason"),
    (lambda p: p["tuning"]["extension"]["bounds"].update(beta={"gt": 0, "ge": 0, "reason": "x"}),
     "tuning.extension.bounds.beta"),
    # a declared value outside its bound (Hinton: T >= 1 for plain KD)
    (lambda p: p["tuning"]["grids"]["kdv1"].update(temperature=[0.5, 1, 1.5, 2, 3, 4, 6, 8]),
     "tuning.grids.kdv1.temperature"),
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
    from cmkd.config import bound_for, within_bound

    tuned = load_tuned(REPO / "tuned.yaml")
    # update_tuned writes one key per run of `runs`, and STUDENT's (absent before STUDENT was tuned)
    assert set(PARAMS["runs"]) <= set(tuned) <= set(PARAMS["runs"]) | {"student"}
    for run, by_dataset in tuned.items():
        for ds, selection in by_dataset.items():
            grid = PARAMS["tuning"]["grids"][run]
            assert set(selection) == set(grid), (run, ds)
            for k in grid:  # a declared value, or one the edge extension reached inside its bound
                value = selection[k]
                assert value in grid[k] or (axis_spacing(grid[k]) and within_bound(
                    value, bound_for(PARAMS["tuning"], run, k))), (run, ds, k)


def test_select_takes_the_best_mean_and_the_first_of_ties():
    entries = [{"val_scores": {"100": 0.5, "101": 0.7}},   # mean 0.6
               {"val_scores": {"100": 0.9, "101": 0.4}},   # 0.65
               {"val_scores": {"100": 0.65, "101": 0.65}}]  # 0.65, later
    assert select(entries) == 1


# ---------------------------------------------------------------------------- edge extension and noise


def _scores(table):
    """A fake training: config -> val scores per tuning seed from `table(config)` (a mean) with a
    fixed per-seed offset, so every configuration's SE is the same and the order is the table's."""
    def train(config, stage):
        mean = table(config)
        return {"config": dict(config), "stage": stage,
                "val_scores": {"100": mean - 0.01, "101": mean, "102": mean + 0.01}}
    return train


HINTON = {"temperature": {"ge": 1, "le": 20, "reason": "Hinton"}}


def test_spacing_is_decided_from_the_declared_values():
    assert axis_spacing([1, 2, 4, 8]) == "log" and axis_spacing([0.25, 0.5, 0.75, 1.0]) == "linear"
    assert axis_spacing([0.0, 0.5]) == "linear"  # a zero: no ratio
    assert axis_spacing([None, 0.01, 0.05, 0.2]) == "log"  # CTKD's null is categorical
    assert axis_spacing(["none", "batch"]) is None and axis_spacing([3]) is None
    assert next_value([1, 2, 4, 8], "high", "log", {}) == (16, None)
    assert next_value([1, 2, 4, 8], "low", "log", {}) == (0.5, None)
    assert next_value([0.25, 0.5, 0.75], "high", "linear", {}) == (1.0, None)
    assert next_value([1, 2, 4, 16], "high", "log", HINTON["temperature"]) == (20, None)  # clipped to le 20
    assert next_value([1, 2, 4], "low", "log", HINTON["temperature"]) == (None, ">= 1: Hinton")
    assert next_value([0.25, 0.5], "low", "linear", {"gt": 0, "reason": "share"}) == (None, "> 0: share")


def test_an_edge_optimum_is_extended_until_interior():
    # true optimum at T = 12: the grid's best is its edge 8; 16 beats 8, then 20 (32 clipped to the
    # bound) loses to 16, which is interior: stop
    train = _scores(lambda c: -abs(np.log(c["temperature"]) - np.log(12)))
    out = search({"temperature": [1, 2, 4, 8]}, [{"temperature": t} for t in (1, 2, 4, 8)], train,
                 bounds=HINTON, max_rounds=4, max_extra_configs=4)
    assert [c["config"]["temperature"] for c in out["configurations"]] == [1, 2, 4, 8, 16, 20]
    assert [c["stage"] for c in out["configurations"]][4:] == ["extension 1", "extension 2"]
    assert out["selected"] == {"temperature": 16} and out["on_edge"] is False and out["bound"] is None
    assert out["extension"]["stopped"] == "interior" and out["trainings"] == 6


def test_an_interior_optimum_is_not_extended():
    train = _scores(lambda c: -abs(c["temperature"] - 3))
    out = search({"temperature": [1, 2, 4, 8]}, [{"temperature": t} for t in (1, 2, 4, 8)], train,
                 bounds=HINTON, max_rounds=4, max_extra_configs=4)
    assert out["trainings"] == 4 and out["extension"]["rounds"] == [] and out["on_edge"] is False
    assert out["selected"] == {"temperature": 2}  # 2 and 4 tie at 1 from 3: the first in grid order


def test_an_optimum_at_the_bound_stops_with_its_reason():
    train = _scores(lambda c: -c["temperature"])  # the less distillation the better
    out = search({"temperature": [1, 2, 4, 8]}, [{"temperature": t} for t in (1, 2, 4, 8)], train,
                 bounds=HINTON, max_rounds=4, max_extra_configs=4)
    assert out["trainings"] == 4 and out["selected"] == {"temperature": 1}
    assert out["on_edge"] is True and out["bound"] == {"temperature": ">= 1: Hinton"}
    assert out["extension"]["stopped"] == "bound"


def test_the_extra_budget_caps_the_extension_and_says_so():
    train = _scores(lambda c: c["w"])  # better without end: an open bound never stops it
    out = search({"w": [0.1, 1, 10]}, [{"w": w} for w in (0.1, 1, 10)], train,
                 bounds={"w": {"gt": 0, "reason": "a weight"}}, max_rounds=5, max_extra_configs=2)
    assert [c["config"]["w"] for c in out["configurations"]] == [0.1, 1, 10, 100, 1000]
    assert out["on_edge"] is True and out["extension"]["stopped"] == "max_extra_configs"
    assert "max_extra_configs = 2" in out["bound"]["w"]
    out = search({"w": [0.1, 1, 10]}, [{"w": w} for w in (0.1, 1, 10)], train,
                 bounds={}, max_rounds=1, max_extra_configs=4)
    assert out["trainings"] == 4 and "max_rounds = 1" in out["bound"]["w"]


def test_extension_moves_one_axis_at_the_best_values_of_the_others():
    # beta best at its high edge, temperature interior; the categorical axis is never extended
    def table(c):
        return c["beta"] / 100 - abs(c["temperature"] - 2) + (c["norm"] == "batch")
    grid = {"beta": [0.5, 1, 2, 8], "temperature": [1, 2, 4], "norm": ["none", "batch"]}
    from cmkd.config import expand_grid as grid_configs

    out = search(grid, grid_configs(grid), _scores(table), bounds={"beta": {"gt": 0, "reason": "weight"}},
                 max_rounds=1, max_extra_configs=4)
    extra = [c["config"] for c in out["configurations"] if c["stage"] != "grid"]
    assert extra == [{"beta": 32, "temperature": 2, "norm": "batch"}]


def test_val_se_and_within_noise_on_hand_computed_numbers():
    best = {"config": {"t": 1}, "val_scores": {"100": 0.80, "101": 0.84, "102": 0.82}}    # mean .82
    second = {"config": {"t": 2}, "val_scores": {"100": 0.81, "101": 0.80, "102": 0.81}}  # mean .80667
    third = {"config": {"t": 4}, "val_scores": {"100": 0.70, "101": 0.70, "102": 0.70}}
    assert val_se([0.80, 0.84, 0.82]) == pytest.approx(0.02 / np.sqrt(3))  # sd 0.02 over 3 seeds
    assert val_se([0.5]) is None
    out = noise([third, best, second], best=1)
    # paired differences -0.01, 0.04, 0.01: mean 0.01333, sd 0.025166, se 0.014530 > the margin
    assert out["second_index"] == 2 and out["margin"] == pytest.approx(0.0133333, abs=1e-6)
    assert out["margin_se"] == pytest.approx(0.0145297, abs=1e-6) and out["within_noise"] is True
    clear = {"config": {"t": 8}, "val_scores": {"100": 0.75, "101": 0.78, "102": 0.76}}
    out = noise([best, clear], best=0)  # differences .05 .06 .06: margin .05667, se .00333
    assert out["margin_se"] == pytest.approx(0.0033333, abs=1e-6) and out["within_noise"] is False
    assert noise([best], best=0)["within_noise"] is None


def test_student_selection_is_the_training_of_student_and_every_distill_run():
    tuned = update_tuned({}, ["student", "kdv1"], "digits", {"student": {"lr": 0.004}, "kdv1": {"temperature": 2}})
    assert tuned == {"student": {"digits": {"lr": 0.004}}, "kdv1": {"digits": {"temperature": 2}}}
    base = PARAMS["train"]["digits"]["student"]
    train, where = tuned_train_params(base, tuned, "digits")
    assert where == "val" and train == {**base, "lr": 0.004}
    assert tuned_train_params(base, tuned, "synthetic") == (base, "default")
    assert base["lr"] != 0.004  # the input is not modified


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


def test_student_is_tuned_over_its_training_with_the_edge_record(tiny_data):
    """STUDENT through the engine: the grid sets train_cfg's lr; the evidence carries val_se,
    on_edge/bound and within_noise; an edge best is extended inside the declared ceiling."""
    from cmkd.config import STUDENT_RUN

    tmp, h5, train_cfg = tiny_data
    tuning = {"extension": {"max_rounds": 1, "max_extra_configs": 1,
                            "bounds": {"lr": {"gt": 0, "le": 0.01, "reason": "test"}}}}
    out = tune_run(dataset="synthetic", prepared=Path(h5), run_name="student", run_cfg=STUDENT_RUN,
                   grid={"lr": [0.001, 0.01]}, budget=2, subsample_seed=0, seeds=[100, 101],
                   models=PARAMS["models"]["synthetic"], train_cfg=train_cfg, teacher_dir=None,
                   teacher_train_cfg=train_cfg, work_dir=tmp / "student", tuning=tuning)
    scores = [c["val_scores"] for c in out["configurations"]]
    assert scores[0] != scores[1]  # the lr reached the training
    assert all(c["val_se"] is not None for c in out["configurations"]) and out["within_noise"] in (True, False)
    if out["selected"] == {"lr": 0.01}:  # at the declared bound: no extension, the reason recorded
        assert out["trainings"] == 2 and out["on_edge"] and out["bound"] == {"lr": "<= 0.01: test"}
    else:  # at the low edge: one step (0.0001) beyond, then the ceiling of one configuration
        assert out["configurations"][2]["config"] == {"lr": 0.0001} and out["trainings"] == 3


def test_a_run_not_applicable_here_records_the_extension_select_checks(tiny_data):
    """AT on vector data is skipped; its evidence still records the extension ceiling, so the
    selection's staleness check (stages/tune.py) accepts it instead of asking for a re-tune."""
    tmp, h5, train_cfg = tiny_data
    tuning = {"extension": {"max_rounds": 4, "max_extra_configs": 4, "bounds": {}}}
    out = tune_run(dataset="synthetic", prepared=Path(h5), run_name="at", run_cfg=PARAMS["runs"]["at"],
                   grid={"at_weight": [10, 100]}, budget=2, subsample_seed=0, seeds=[100, 101],
                   models=PARAMS["models"]["synthetic"], train_cfg=train_cfg, teacher_dir=tmp / "teacher",
                   teacher_train_cfg=train_cfg, work_dir=tmp / "at", tuning=tuning)
    assert out["skipped"] and out["trainings"] == 0 and out["selected"] == {}
    assert {k: out["extension"][k] for k in ("max_rounds", "max_extra_configs")} == \
        {"max_rounds": 4, "max_extra_configs": 4}


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
    """`python -m stages train --run` / `--role student` read tuned.yaml beside params.yaml and record it."""
    tmp, h5, _ = tiny_data
    params = copy.deepcopy(PARAMS)
    params["seeds"] = [0]
    params["train"]["synthetic"]["student"]["epochs"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "tuned.yaml").write_text(render_tuned({"dkd": {"synthetic": {"beta": 0.5, "temperature": 1}},
                                                       "student": {"synthetic": {"lr": 0.004}}}))
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    shutil.copy(h5, tmp_path / "data" / "prepared" / "synthetic.h5")
    teacher = tmp_path / "data" / "runs" / "synthetic" / "teacher" / "seed0"
    teacher.mkdir(parents=True)
    (teacher / "model.pt").symlink_to((tmp / "teacher" / "seed100" / "model.pt").resolve())
    env = tool_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    for run in ("dkd", "kdv1", "student"):
        which = ["--role", "student"] if run == "student" else ["--run", run]
        proc = subprocess.run([sys.executable, "-m", "stages", "train", "--dataset", "synthetic", *which,
                               "--no-progress"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        out = tmp_path / "data" / "runs" / "synthetic" / run / "metrics.json"
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics = json.loads(out.read_text())
        # STUDENT's selected lr is the training of STUDENT and of every distill run, tuned or not
        assert metrics["training"]["lr"] == 0.004, run
        if run == "student":
            assert metrics["selected_on"] == "val"
        elif run == "dkd":
            assert metrics["selected_on"] == "val" and metrics["hyperparameters"]["beta"] == 0.5
            assert metrics["hyperparameters"]["temperature"] == 1
        else:
            assert metrics["selected_on"] == "default"
            assert metrics["hyperparameters"]["temperature"] == PARAMS["runs"]["kdv1"]["temperature"]


# ---------------------------------------------------------------------------- the DVC pipelines


@pytest.mark.slow
def test_root_repro_never_runs_the_tuning_pipeline(tmp_path):
    """`dvc repro` runs no tuning stage; `dvc repro tuning/dvc.yaml` does and writes tuned.yaml;
    the next `dvc repro` reruns exactly the stages whose selection changed (STUDENT's lr: STUDENT
    and every distill run, never the TEACHER)."""
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
    assert {"tuning/dvc.yaml:tune_teacher@synthetic", "tuning/dvc.yaml:tune_student@synthetic",
            "tuning/dvc.yaml:tune@synthetic-kdv1", "tuning/dvc.yaml:tune@synthetic-kdv2",
            "tuning/dvc.yaml:tune_select@synthetic"} <= tuned_run
    assert not any(s.startswith("distill") or s.startswith("train_") for s in tuned_run)
    selection = load_tuned(repo / "tuned.yaml")
    assert set(selection["kdv1"]["synthetic"]) == {"temperature"}
    evidence = json.loads((repo / "reports/tuning/synthetic.json").read_text())
    assert 2 <= evidence["runs"]["kdv1"]["trainings"] <= 2 + params["tuning"]["extension"]["max_extra_configs"]
    assert evidence["runs"]["student"]["selected"] == selection["student"]["synthetic"]

    after = stages_run(dvc(["repro", "evaluate@synthetic"], repo, env).stdout)
    assert {"distill@synthetic-kdv1", "distill@synthetic-kdv2", "train_student@synthetic"} <= after
    assert not any(s.startswith("train_teacher") or "tune" in s for s in after)
    metrics = json.loads((repo / "data/runs/synthetic/kdv1/metrics.json").read_text())
    assert metrics["selected_on"] == "val"
    assert metrics["hyperparameters"]["temperature"] == selection["kdv1"]["synthetic"]["temperature"]
