import json

import numpy as np

from cmkd.report import aggregate_run, collect, markdown_table, scores_csv


def _run(tmp_path, name, method, values, extra=None):
    seeds = {}
    for i, v in enumerate(values):
        test = {"student" if name not in ("teacher", "student") else "model": {"f1_weighted": v, "accuracy": v}}
        if extra:
            test["teacher_modality"] = {"f1_weighted": extra[i], "accuracy": extra[i]}
        seeds[str(i)] = {"best_epoch": 1, "val": {}, "test": test}
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"run": name, "method": method, "task": "classification", "seeds": seeds}))
    return d


def test_aggregate_uses_sample_std():
    agg = aggregate_run({"seeds": {"0": {"test": {"student": {"f1_weighted": 0.5}}},
                                   "1": {"test": {"student": {"f1_weighted": 0.7}}}}})
    stat = agg["student"]["f1_weighted"]
    assert stat["mean"] == 0.6 and abs(stat["std"] - np.std([0.5, 0.7], ddof=1)) < 1e-12 and stat["n"] == 2


def test_table_arrows_against_student_and_extra_deployables(tmp_path):
    dirs = [_run(tmp_path, "teacher", "teacher", [0.9, 0.92]), _run(tmp_path, "student", "supervised", [0.60, 0.62]),
            _run(tmp_path, "kdv1", "kd", [0.70, 0.72]), _run(tmp_path, "bad", "kd", [0.50, 0.52]),
            _run(tmp_path, "discom_kd", "discom_kd", [0.65, 0.61], extra=[0.95, 0.97])]
    report = collect(dirs)
    assert set(report["rows"]) == {"teacher", "student", "kdv1", "bad", "discom_kd", "discom_kd/teacher_modality"}
    table = markdown_table(report, "toy", ("rgb", "depth"))
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert "↑ +10.00" in lines["kdv1"] and "71.00 ± 1.41" in lines["kdv1"]
    assert "↓ -10.00" in lines["bad"]
    assert "↑ +2.00" in lines["discom_kd"]
    assert lines["TEACHER"].rstrip().endswith("|  |")  # baselines carry no arrow
    csv = scores_csv(report).splitlines()
    assert csv[0] == "run,mean,std" and "kdv1,0.710000," in "\n".join(csv)
