"""`dvc repro` with the offline SemanticKITTI sample: download (generation) -> prepare ->
TEACHER (camera) / STUDENT (LiDAR) -> KD -> the mIoU table. Slow: it trains networks."""

import json

import pytest
import yaml

from tests.conftest import copy_pipeline, dvc, stages_run, tiny_params, tool_env


@pytest.mark.slow
def test_dvc_repro_semantickitti_sample(tmp_path):
    repo = copy_pipeline(tmp_path / "repo")
    env = tool_env(tmp_path)
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), datasets=("semantickitti-sample",),
                         methods=("kdv1",), epochs=2)
    sample = params["data"]["semantickitti-sample"]
    sample["sequences"] = [{"sequence": 0, "frames": 6, "image_size": [1241, 376]},
                           {"sequence": 10, "frames": 2, "image_size": [1226, 370]},
                           {"sequence": 8, "frames": 2, "image_size": [1226, 370]}]
    sample["lidar_width"] = 512
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(["init", "--no-scm", "-q"], repo, env)
    out = dvc(["repro"], repo, env)
    ds = "semantickitti-sample"
    assert {f"download@{ds}", f"prepare@{ds}", f"train_teacher@{ds}", f"train_student@{ds}",
            f"distill@{ds}-kdv1", f"evaluate@{ds}"} <= stages_run(out.stdout)
    report = json.loads((repo / f"data/reports/{ds}/metrics.json").read_text())
    assert report["metric"] == "miou"
    assert {"teacher", "student", "kdv1"} <= set(report["rows"])
    for row in ("teacher", "student", "kdv1"):
        stat = report["rows"][row]["miou"]
        assert stat["n"] == 1 and 0.0 <= stat["mean"] <= 1.0
    table = (repo / f"data/reports/{ds}/table.md").read_text()
    assert "| TEACHER |" in table and "| kdv1 |" in table
    # The raw data is the real SemanticKITTI layout, prepared by the real reader.
    assert (repo / f"data/raw/{ds}/dataset/sequences/08/calib.txt").exists()
    assert stages_run(dvc(["repro"], repo, env).stdout) == set()
