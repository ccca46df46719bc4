"""The experiment and claims stages under DVC, in a temporary copy of the repo (tiny sizes)."""

import json

import pytest
import yaml

from tests.conftest import copy_pipeline, dvc, stages_run, tiny_params, tool_env

EXPERIMENT_STAGES = {"exp_mfh_gamma", "exp_mfh_alpha", "exp_mfh_alg1", "exp_ntdh_gap", "exp_digits_noise"}


@pytest.mark.slow
def test_check_target_runs_the_experiments_and_reruns_only_what_changed(tmp_path):
    repo = copy_pipeline(tmp_path / "repo")
    env = tool_env(tmp_path)
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(["init", "--no-scm", "-q"], repo, env)

    first = dvc(["repro", "check"], repo, env)
    # the main table is not needed; method_code writes the experiments' code file (sub-second)
    assert stages_run(first.stdout) == EXPERIMENT_STAGES | {"check", "method_code"}
    for name in ("mfh_gamma", "mfh_alpha", "mfh_alg1", "ntdh_gap", "digits_noise"):
        for ext in ("json", "csv", "png"):
            assert (repo / f"data/reports/experiments/{name}.{ext}").stat().st_size > 0
    report = json.loads((repo / "data/reports/claims.json").read_text())
    experiment_claims = [c for c in yaml.safe_load((repo / "claims.yaml").read_text())["claims"]
                         if c["source"]["file"].startswith("data/reports/experiments/")]
    # a claim restating another is reported but not counted again
    restating = [c["id"] for c in experiment_claims if c.get("restates")]
    assert report["summary"]["total"] == len(experiment_claims) - len(restating)
    assert sorted(report["summary"]["restating"]) == sorted(restating)
    assert "| claim |" in (repo / "data/reports/claims.md").read_text()

    assert stages_run(dvc(["repro", "check"], repo, env).stdout) == set()

    params["experiments"]["mfh_alpha"]["sweep"]["n_extra"] = [0, 20]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    ran = stages_run(dvc(["repro", "check"], repo, env).stdout)
    # method_code depends on params.yaml (it reads `experiments`: which methods they use); its
    # files stay the same, so no other experiment follows
    assert ran == {"method_code", "exp_mfh_alpha", "check"}
    plots = dvc(["plots", "show", "--json"], repo, env).stdout
    assert "mfh_gamma.csv" in plots
