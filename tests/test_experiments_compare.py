"""The researcher's loop under DVC, in a temporary git + DVC copy of the repo (tiny sizes):
the small metrics files git keeps make `dvc metrics show/diff` and `dvc exp show` work; a
changed verdict never stops `dvc repro` (it is reported, `changed: true`), `check --strict`
fails on it under the claim's own configuration only, and `dvc exp run -S <a run's param>`
saves an experiment with the claim marked not enforced."""

import json
import subprocess
import sys

import pytest
import yaml

from cmkd.reporting.claims import record_configuration
from tests.conftest import REPO, copy_pipeline, dvc, tiny_params, tool_env


def test_metrics_are_declared_small_and_kept_by_git():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    metrics = stages["evaluate"]["do"]["metrics"]
    assert metrics == [{"metrics/${item}": {"cache": False}}]
    # per-seed detail stays a plain (cached) output, not a metric
    outs = stages["evaluate"]["do"]["outs"]
    assert "data/reports/${item}/metrics.json" in outs
    ignored = subprocess.run(["git", "check-ignore", "-q", "metrics/synthetic/kdv1.json"], cwd=REPO)
    assert ignored.returncode == 1  # not git-ignored


@pytest.mark.slow
def test_exp_run_with_another_run_param_saves_an_experiment(tmp_path):
    repo = copy_pipeline(tmp_path / "repo")
    env = tool_env(tmp_path)
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), methods=("kdv1",), seeds=(0, 1))
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    # one claim on kdv1 whose expected verdict cannot hold (results exist, so it is not "not_run")
    claims = ("configuration:\n  runs.kdv1: x\n  seeds: x\nclaims:\n"
              "  - id: kd-beats-student\n    paper: KD\n    statement: KDv1 beats STUDENT.\n"
              "    source: {file: data/reports/synthetic/metrics.json, path: rows.kdv1.f1_weighted}\n"
              "    against: {file: data/reports/synthetic/metrics.json, path: rows.student.f1_weighted}\n"
              "    comparison: '>'\n    expected_verdict: not_run\n    reason: recorded wrongly on purpose\n"
              "    depends_on: [runs.kdv1, seeds]\n    command: dvc repro check_tables@synthetic\n")
    # the tables judge rows with the claims file's declared table margins (evaluate's params)
    margins = {"margins": yaml.safe_load((repo / "claims.yaml").read_text())["margins"]}
    claims += yaml.safe_dump(margins, sort_keys=False)
    (repo / "claims.yaml").write_text(record_configuration(claims, params))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    dvc(["init", "-q"], repo, env)
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run([*git, "commit", "-qm", "pipeline"], cwd=repo, env=env, check=True)
    dvc(["repro", "evaluate@synthetic"], repo, env)
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run([*git, "commit", "-qm", "first run"], cwd=repo, env=env, check=True)
    tracked = subprocess.run(["git", "ls-files", "metrics"], cwd=repo, env=env,
                             capture_output=True, text=True).stdout.split()
    assert "metrics/synthetic/kdv1.json" in tracked

    shown = dvc(["metrics", "show"], repo, env).stdout
    # a few numbers per row: the score, its interval, and the paired comparison the verdict comes from
    assert "metrics/synthetic/kdv1.json" in shown and max(len(line) for line in shown.splitlines()) < 200
    kdv1 = json.loads((repo / "metrics/synthetic/kdv1.json").read_text())
    assert set(kdv1) == {"f1_weighted", "n", "mean_ci95_lo", "mean_ci95_hi", "vs_student", "vs_student_ci95_lo",
                         "vs_student_ci95_hi", "p_holm", "verdict"}
    assert kdv1["vs_student_ci95_lo"] <= kdv1["vs_student"] <= kdv1["vs_student_ci95_hi"]

    # under the claim's own configuration the changed verdict is reported, not a failed stage ...
    enforced = dvc(["repro", "check_tables@synthetic"], repo, env, check=False)
    assert enforced.returncode == 0, enforced.stdout + enforced.stderr
    assert "CHANGED kd-beats-student" in enforced.stdout + enforced.stderr
    report = json.loads((repo / "data/reports/synthetic/claims.json").read_text())
    assert (report["claims"][0]["changed"], report["claims"][0]["enforced"]) == (True, True)
    assert "## CHANGED" in (repo / "data/reports/synthetic/claims.md").read_text()
    # ... and the strict form (regression tests) fails on it
    strict = [sys.executable, "-m", "stages", "check", "--strict", "--sources", "data/reports/synthetic/",
              "--out-dir", "data/reports/synthetic"]
    assert subprocess.run(strict, cwd=repo, env=env, capture_output=True).returncode == 1
    # ... under another value of a param it depends on, it is reported and the experiment saved
    exp = dvc(["exp", "run", "-n", "t2", "-S", "runs.kdv1.ce_weight=0.5", "check_tables@synthetic"], repo,
              env, check=False)
    assert exp.returncode == 0, exp.stdout + exp.stderr
    report = json.loads((repo / "data/reports/synthetic/claims.json").read_text())
    assert report["claims"][0]["enforced"] is False and "runs.kdv1" in report["claims"][0]["note"]
    assert subprocess.run(strict, cwd=repo, env=env, capture_output=True).returncode == 0  # not enforced

    diff = json.loads(dvc(["metrics", "diff", "--json"], repo, env).stdout)  # HEAD vs the workspace
    assert "metrics/synthetic/kdv1.json" in diff
    table = json.loads(dvc(["exp", "show", "--json"], repo, env).stdout)
    text = json.dumps(table)
    assert '"t2"' in text and text.count("metrics/synthetic/kdv1.json") >= 2  # the baseline and the experiment
    # the README's filter: only what differs between experiments, without the interval columns
    narrow = dvc(["exp", "show", "--no-pager", "--only-changed", "--drop", ".*(ci95_.*|:n)|Created"], repo,
                 {**env, "COLUMNS": "200"}).stdout
    assert "kdv1.json:f1_weighted" in narrow and "runs.kdv1.ce_weight" in narrow and "ci95" not in narrow
    baseline = next(r for r in table if r.get("rev") != "workspace")
    assert baseline["data"]["metrics"]["metrics/synthetic/kdv1.json"]["data"]["n"] == 2


@pytest.mark.parametrize("override", ["runs.kdv1.temperature=2", "seeds=[0,1,2]", "datasets=[semantickitti-sample]",
                                      "data.nyudv2.labeled.url=http://example.org/a.mat",
                                      "train.digits.student.lr=0.01"])
def test_dvc_exp_run_set_param_leaves_the_real_params_file_readable_by_dvc(tmp_path, override):
    """`dvc exp run -S` rewrites params.yaml with ruamel's round trip, which wraps long flow-style
    lines; a wrapped URL in a flow mapping could not be read back ("YAML file structure is
    corrupted"), so every `dvc exp run -S` failed on the committed params.yaml. The URLs are in
    block style now; this applies DVC's own override code to the real file and reads it as DVC."""
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    apply_overrides(str(path), [override])
    data = load_yaml(str(path))  # DVC's reader (ruamel); raises on a corrupted file
    original = yaml.safe_load((REPO / "params.yaml").read_text())
    key, value = override.split("=", 1)
    assert _get(data, key) == yaml.safe_load(value)
    # nothing else changed
    changed = yaml.safe_load(path.read_text())
    parent, last = key.rpartition(".")[::2]
    (_get(changed, parent) if parent else changed)[last] = _get(original, key)
    assert changed == original


def _get(data, dotted):
    for part in dotted.split("."):
        data = data[part]
    return data


def test_dvc_exp_run_set_param_on_tuned_yaml_stays_readable(tmp_path):
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml

    path = tmp_path / "tuned.yaml"
    path.write_text((REPO / "tuned.yaml").read_text())
    apply_overrides(str(path), ["kdv1.synthetic.temperature=2"])
    assert load_yaml(str(path))["kdv1"]["synthetic"]["temperature"] == 2
