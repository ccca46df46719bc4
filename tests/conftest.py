"""Shared fixtures. DVC and Prefect get their own throw-away homes, never the user's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

# The test process runs stage code in-process (e.g. `from stages import check`), and a stage
# process (`python -m stages <name>`) pins torch's CPU kernels before torch is imported: pin them
# here, before any test module imports torch, as every stage process does (subprocesses inherit it).
from cmkd.utils.determinism import pin_cpu_kernels

pin_cpu_kernels()

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ["cmkd", "stages", "dvc.yaml", "params.yaml", "tuned.yaml", "claims.yaml",
                  "diagnosis_predictor.json", "flows"]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: extra threads only spin, and on a loaded
    2-core machine that makes many small optimiser steps ten times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_synthetic_file(path: Path) -> Path:
    """A 300-row, 3-class NTDH sklearn dataset in the prepared HDF5 format (200/50/50 split)."""
    from cmkd.data.datasets.synthetic import ntdh_sklearn
    from cmkd.data.h5 import PreparedWriter

    t, s, y = ntdh_sklearn(n_samples=300, n_features=8, n_classes=3, gamma=0.5, seed=0)
    attrs = {"task": "classification", "class_names": ["a", "b", "c"], "modalities": ["teacher", "student"],
             "teacher_modality": "teacher", "student_modality": "student", "ignore_index": None, "source_checksum": "t"}
    with PreparedWriter(path, attrs) as w:
        for split, sl in (("train", slice(0, 200)), ("val", slice(200, 250)), ("test", slice(250, 300))):
            w.write(split, {"teacher": t[sl], "student": s[sl], "labels": y[sl]})
    return path


def tool_env(tmp: Path) -> dict[str, str]:
    """Environment for subprocesses: the running interpreter's bin first, private homes."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp / "home")
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_SITE_CACHE_DIR"] = str(tmp / "dvc-site-cache")
    env["PYTHONPATH"] = ""
    env["CMKD_LOG_LEVEL"] = "WARNING"
    # the private HOME has no git identity; `dvc exp run` commits
    for role in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{role}_NAME", "cmkd tests")
        env.setdefault(f"GIT_{role}_EMAIL", "tests@cmkd.invalid")
    (tmp / "home").mkdir(exist_ok=True)
    return env


def copy_pipeline(dest: Path) -> Path:
    """A fresh copy of the pipeline (code, dvc.yaml, params) with its own DVC repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def tiny_params(params: dict, datasets=("synthetic",), methods=("kdv1",), seeds=(0,), epochs=2) -> dict:
    params = yaml.safe_load(yaml.safe_dump(params))
    params["datasets"] = list(datasets)
    params["methods"] = list(methods)
    params["seeds"] = list(seeds)
    for ds in datasets:
        for role in ("teacher", "student"):
            params["train"][ds][role]["epochs"] = epochs
    if "synthetic" in datasets:
        params["data"]["synthetic"]["n_samples"] = 600
        params["data"]["synthetic"]["gammas"] = [0.0, 1.0]
    if "experiments" in params:
        # claims are about the full experiments; a tiny run only has to produce the report (the
        # check stage reports changed verdicts and succeeds: only `--strict` fails on them)
        shrink_experiments(params["experiments"], epochs)
    return params


def shrink_experiments(experiments: dict, epochs: int = 2) -> None:
    """The synthetic experiments (exp_* stages) at a size that runs in seconds."""
    for cfg in experiments.values():
        cfg["seeds"] = 1
        if "mask_seeds" in cfg:
            cfg["mask_seeds"] = 1
        for net in cfg["nets"].values():
            net["train"]["epochs"] = epochs
        if "split" in cfg:
            cfg["split"] = {"train": 60, "test": 60}
        if "algorithm1" in cfg:
            cfg["algorithm1"].update(pair_epochs=epochs, n_repeats=1)
        for mask in (cfg.get("masks") or {}).values():  # the NTDH feature mask's Algorithm 1
            if "pair_epochs" in mask:
                mask.update(pair_epochs=epochs, n_repeats=1)


def dvc(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# Stages DVC runs on every repro (`always_changed`): `resolve` fingerprints files outside the
# repository (stages/resolve.py). What matters is what they trigger, so stages_run leaves them out.
ALWAYS_CHANGED = {"resolve"}


def stages_run(output: str) -> set[str]:
    """Names of the stages `dvc repro` ran (it prints "Running stage 'name':"), but ALWAYS_CHANGED."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")} - ALWAYS_CHANGED


# --- Prefect ---------------------------------------------------------------------------------
# One temporary Prefect server for the whole session, started only when a test requests the
# `prefect_harness` fixture (runs without Prefect tests never start it). Prefect reads its
# home folder when first imported, so a private PREFECT_HOME and the analytics switch are set
# here, before any test module imports Prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="cmkd-test-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)  # never talk to a user's real server from tests


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server (and database) shared by every Prefect test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
