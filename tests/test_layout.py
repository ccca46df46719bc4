"""dvc.yaml and tuning/dvc.yaml (DVC's map of the pipeline's files) name the paths that the stage
scripts take from cmkd/pipeline/layout.py: a path moved in one place and not the other fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cmkd.pipeline import layout
from tests.conftest import dvc, tool_env

ROOT = Path(__file__).resolve().parents[1]
DS, RUN = "synthetic", "kdv1"


def _paths(entries) -> set[str]:
    """The paths of a stage's deps / outs / metrics list (entries are str or {path: options})."""
    return {next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []}


def stage(file: str, name: str, **item: str) -> dict[str, set[str]]:
    """A stage of `file` with its ${item...} filled in: {"deps": paths, "outs": paths}."""
    spec = yaml.safe_load((ROOT / file).read_text())["stages"][name]
    spec = spec.get("do", spec)
    text = yaml.safe_dump(spec)
    for key, value in item.items():
        text = text.replace("${item}" if key == "item" else f"${{item.{key}}}", value)
    spec = yaml.safe_load(text)
    return {"deps": _paths(spec.get("deps")), "outs": _paths(spec.get("outs")) | _paths(spec.get("metrics"))}


@pytest.mark.parametrize("file, name, item, deps, outs", [
    ("dvc.yaml", "download", {"item": DS}, [], [layout.raw_dir(DS)]),
    ("dvc.yaml", "prepare", {"item": DS}, [layout.raw_dir(DS)], [layout.prepared_file(DS)]),
    ("dvc.yaml", "train_teacher", {"item": DS}, [layout.prepared_file(DS), layout.method_code_file("stages/teacher")],
     [layout.run_dir(DS, "teacher")]),
    ("dvc.yaml", "train_student", {"item": DS}, [layout.prepared_file(DS), layout.method_code_file("stages/student")],
     [layout.run_dir(DS, "student")]),
    ("dvc.yaml", "distill", {"dataset": DS, "run": RUN},
     [layout.prepared_file(DS), layout.run_dir(DS, "teacher"), layout.method_code_file(RUN)],
     [layout.run_dir(DS, RUN)]),
    ("dvc.yaml", "method_code", {}, [], [layout.METHOD_CODE]),
    ("dvc.yaml", "plots_page", {}, [], [layout.PLOTS_PAGE]),
    ("dvc.yaml", "evaluate", {"item": DS}, [layout.runs_dir(DS)],
     [layout.dataset_metrics(DS), layout.metrics_dir(DS), layout.report_dir(DS) / "table.md"]),
    ("dvc.yaml", "exp_mfh_gamma", {}, [layout.method_code_file("stages/experiments")],
     [layout.experiment_file("mfh_gamma"), layout.experiment_file("mfh_gamma", ".csv")]),
    ("dvc.yaml", "check", {}, [layout.experiment_file("ntdh_gap")], [layout.REPORTS / "claims.json"]),
    ("dvc.yaml", "check_tables", {"item": DS}, [layout.dataset_metrics(DS)], [layout.report_dir(DS) / "claims.json"]),
    ("dvc.yaml", "diagnose", {"item": DS},
     [layout.prepared_file(DS), layout.run_dir(DS, "teacher"), layout.run_dir(DS, "student"), layout.PREDICTOR_FILE],
     [layout.diagnosis_file(DS), layout.diagnosis_file(DS, ".md")]),
    ("dvc.yaml", "diagnosis_report", {"item": DS}, [layout.diagnosis_file(DS), layout.dataset_metrics(DS)],
     [layout.report_dir(DS) / "diagnosis.json", layout.measured_diagnosis_file(DS)]),
    ("dvc.yaml", "diagnosis_validation", {}, [layout.DIAGNOSIS, layout.PREDICTOR_FILE],
     [layout.DIAGNOSIS_VALIDATION / "validation.json"]),
    ("tuning/dvc.yaml", "tune_teacher", {"item": DS}, [layout.prepared_file(DS)], [layout.tuning_teacher_dir(DS)]),
    ("tuning/dvc.yaml", "tune", {"dataset": DS, "run": RUN},
     [layout.prepared_file(DS), layout.tuning_teacher_dir(DS)], [layout.tuning_evidence_file(DS, RUN)]),
    ("tuning/dvc.yaml", "tune_select", {"item": DS}, [layout.TUNING_REPORTS / DS], [layout.tuning_report(DS)]),
])
def test_dvc_yaml_names_the_layout_paths(file, name, item, deps, outs):
    declared = stage(file, name, **item)
    assert {str(p) for p in deps} <= declared["deps"], declared["deps"]
    assert {str(p) for p in outs} <= declared["outs"], declared["outs"]


def test_a_moved_path_is_caught():
    declared = stage("dvc.yaml", "prepare", item=DS)
    assert str(layout.prepared_file("digits")) not in declared["outs"]  # the check compares, not just parses


def test_bytecode_caches_are_not_stage_dependencies(tmp_path):
    """`make test` (or any import) writes __pycache__ into cmkd/ and stages/; DVC must not count
    them in a code folder's hash, or every stage would look changed after the tests ran."""
    env = tool_env(tmp_path)
    for path in ("cmkd/data/__pycache__/h5.cpython-311.pyc", "stages/__pycache__/train.cpython-311.pyc",
                 "cmkd/methods/kd.cpython-311.pyc"):
        assert dvc(["check-ignore", path], ROOT, env, check=False).returncode == 0, path
    assert dvc(["check-ignore", "cmkd/data/h5.py"], ROOT, env, check=False).returncode == 1
