"""Reports: per-seed aggregation, the paired comparison with STUDENT, the table, the small
metrics files DVC and git keep, the bar chart, and that a pairing by seed really pairs."""

import json

import numpy as np
import pytest
from scipy import stats

from cmkd.reporting.tables import (
    aggregate_run,
    bar_figure,
    collect,
    compact_hyperparameters,
    markdown_table,
    metrics_file_name,
    metrics_summary,
    scores_csv,
    vs_student,
)
from cmkd.utils.stats import paired, t_interval, verdict


def _run(tmp_path, name, method, values, extra=None, seeds=None, **top):
    out = {}
    for i, v in enumerate(values):
        test = {"student" if name not in ("teacher", "student") else "model": {"f1_weighted": v, "accuracy": v}}
        if extra:
            test["teacher_modality"] = {"f1_weighted": extra[i], "accuracy": extra[i]}
        out[str(seeds[i] if seeds else i)] = {"best_epoch": 1, "val": {}, "test": test}
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"run": name, "method": method, "task": "classification",
                                                "seeds": out, **top}))
    return d


def test_aggregate_uses_sample_std_and_keeps_seeds():
    agg = aggregate_run({"seeds": {"3": {"test": {"student": {"f1_weighted": 0.5}}},
                                   "7": {"test": {"student": {"f1_weighted": 0.7}}}}})
    stat = agg["student"]["f1_weighted"]
    assert stat["mean"] == 0.6 and abs(stat["std"] - np.std([0.5, 0.7], ddof=1)) < 1e-12 and stat["n"] == 2
    assert stat["seeds"] == ["3", "7"]


def test_t_interval_and_paired_against_scipy():
    x = [0.1, 0.4, 0.35, 0.2, 0.3]
    ci = t_interval(x)
    lo, hi = stats.t.interval(0.95, 4, loc=np.mean(x), scale=stats.sem(x))
    assert ci["ci95"] == pytest.approx([lo, hi]) and ci["n"] == 5
    d = paired([0.7, 0.8, 0.75], [0.6, 0.7, 0.66])
    assert d["values"] == pytest.approx([0.1, 0.1, 0.09]) and d["verdict"] == "better"
    assert verdict([-0.1, 0.2]) == "indistinguishable" and verdict([-0.3, -0.1]) == "worse"
    assert t_interval([0.5])["ci95"] is None


def test_vs_student_pairs_by_seed_not_by_position():
    student = {"values": [0.60, 0.70, 0.80], "seeds": ["0", "1", "2"], "n": 3}
    # the same run listed in another seed order: pairing by position would mix seeds up
    row = {"values": [0.82, 0.62, 0.72], "seeds": ["2", "0", "1"], "n": 3}
    out = vs_student(row, student)
    assert out["mean"] == pytest.approx(0.02) and out["n"] == 3
    assert out["ci95"][1] - out["ci95"][0] == pytest.approx(0.0, abs=1e-12)  # +0.02 at every seed
    assert vs_student({"values": [0.9], "seeds": ["9"], "n": 1}, student)["n"] == 0


def _report(tmp_path):
    dirs = [_run(tmp_path, "teacher", "teacher", [0.9, 0.92, 0.91]),
            _run(tmp_path, "student", "supervised", [0.60, 0.62, 0.64]),
            _run(tmp_path, "kdv1", "kd", [0.70, 0.72, 0.75],
                 hyperparameters={"temperature": 2.0, "kd_weight": 1.0}, selected_on="val"),
            _run(tmp_path, "bad", "kd", [0.50, 0.52, 0.53]),
            _run(tmp_path, "noisy", "kd", [0.70, 0.55, 0.66]),   # +0.017 on average, but the spread straddles 0
            _run(tmp_path, "discom_kd", "discom_kd", [0.65, 0.61, 0.66], extra=[0.95, 0.97, 0.96])]
    configs = {"bad": {"method": "kd", "temperature": 4.0, "lskd": True}, "noisy": {"method": "kd"}}
    return collect(dirs, configs)


def test_collect_rows_vs_student_hyperparameters_and_provenance(tmp_path):
    report = _report(tmp_path)
    rows = report["rows"]
    assert set(rows) == {"teacher", "student", "kdv1", "bad", "noisy", "discom_kd", "discom_kd/teacher_modality"}
    assert "vs_student" not in rows["teacher"] and "vs_student" not in rows["student"]
    assert rows["kdv1"]["vs_student"]["verdict"] == "better" and rows["kdv1"]["vs_student"]["n"] == 3
    assert rows["kdv1"]["vs_student"]["mean"] == pytest.approx(0.1033333, abs=1e-6)
    assert rows["bad"]["vs_student"]["verdict"] == "worse"
    assert rows["noisy"]["vs_student"]["verdict"] == "indistinguishable"
    assert set(rows["noisy"]["vs_student"]) == {"mean", "ci95", "n", "verdict"}
    # the run's own record wins; else params.yaml's entry, marked as such
    assert rows["kdv1"]["hyperparameters"] == {"temperature": 2.0,
                                               "kd_weight": 1.0} and rows["kdv1"]["selected_on"] == "val"
    assert (rows["bad"]["hyperparameters"] == {"temperature": 4.0, "lskd": True}
            and rows["bad"]["selected_on"] == "params")
    assert report["provenance"] is None  # none of these runs recorded one (evaluate then adds its own)


def test_provenance_is_copied_and_differences_named(tmp_path):
    prov = {"torch": "2.x", "cpu_capability": "avx2", "threads": 1}
    dirs = [_run(tmp_path, "student", "supervised", [0.6, 0.7], provenance=prov),
            _run(tmp_path, "kdv1", "kd", [0.7, 0.8], provenance={**prov, "threads": 2})]
    report = collect(dirs)
    assert report["provenance"]["cpu_capability"] == "avx2" and report["provenance"]["threads"] == 1
    assert report["provenance"]["runs_that_differ"] == {"kdv1": {**prov, "threads": 2}}


def test_table_arrow_only_when_the_interval_excludes_zero(tmp_path):
    report = _report(tmp_path)
    table = markdown_table(report, "toy", ("rgb", "depth"))
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()
             if line.startswith("| ") and "---" not in line}
    assert "↑ +10.33 [" in lines["kdv1"] and "72.33 ± 2.52" in lines["kdv1"]
    assert "T=2, kd=1" in lines["kdv1"] and "(params)" not in lines["kdv1"]
    assert "↓ -10.33 [" in lines["bad"] and "T=4, LSKD (params)" in lines["bad"]
    assert "≈ +1.67 [" in lines["noisy"] and "↑" not in lines["noisy"]
    assert lines["TEACHER"].split("|")[4].strip() == ""  # baselines carry no comparison
    csv = scores_csv(report).splitlines()
    assert csv[0].startswith("run,mean,std,vs_student")
    assert any(line.startswith("noisy,") and line.endswith(",indistinguishable") for line in csv)


def test_metrics_summary_is_small_and_rounded(tmp_path):
    report = _report(tmp_path)
    small = metrics_summary(report)
    assert set(small["kdv1"]) == {"f1_weighted", "ci95_lo", "ci95_hi", "n", "vs_student", "verdict"}
    assert set(small["student"]) == {"f1_weighted", "ci95_lo", "ci95_hi", "n"}
    assert small["kdv1"]["f1_weighted"] == 0.7233 and small["kdv1"]["verdict"] == "better"
    assert small["kdv1"]["ci95_lo"] < 0.7233 < small["kdv1"]["ci95_hi"]
    one = metrics_summary({"metric": "f1_weighted",
                           "rows": {"student": {"f1_weighted": {"mean": 0.5, "values": [0.5], "n": 1}}}})
    assert one == {"student": {"f1_weighted": 0.5, "n": 1}}
    assert metrics_file_name("discom_kd/teacher_modality") == "discom_kd.teacher_modality.json"
    assert max(len(json.dumps(v)) for v in small.values()) < 200


def test_compact_hyperparameters():
    assert compact_hyperparameters({"method": "dkd", "beta": 8.0, "temperature": 4.0, "lskd": False}) == "β=8, T=4"
    assert compact_hyperparameters({"base": {"method": "kd", "temperature": 4.0},
                                    "mode": "sample"}) == "base(method=kd, T=4), mode=sample"


def test_bar_figure_colours_by_verdict(tmp_path, monkeypatch):
    import matplotlib.axes

    report = _report(tmp_path)
    seen = {}
    original_barh, original_errorbar = matplotlib.axes.Axes.barh, matplotlib.axes.Axes.errorbar

    def barh(self, names, widths, color=None, **kw):
        seen["colours"] = dict(zip(names, color))
        return original_barh(self, names, widths, color=color, **kw)

    def errorbar(self, x, y, xerr=None, **kw):
        seen["whiskers"] = {n: (c - lo, c + hi) for n, c, lo, hi in zip(y, x, xerr[0], xerr[1])}
        return original_errorbar(self, x, y, xerr=xerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "barh", barh)
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    bar_figure(report, "toy", tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000
    colours = seen["colours"]
    assert colours["kdv1"] != colours["noisy"] != colours["bad"] and colours["kdv1"] != colours["bad"]
    student = 100 * report["rows"]["student"]["f1_weighted"]["mean"]
    lo, hi = seen["whiskers"]["noisy"]
    assert lo < student < hi  # indistinguishable: the whisker crosses STUDENT's line
    lo, hi = seen["whiskers"]["kdv1"]
    assert lo > student


def test_same_seed_kd_without_kd_term_trains_bit_identically_to_student(tmp_path):
    """The pairing behind vs_student: a run and STUDENT of the same seed start from the same
    weights and see the same batches, so KD with kd_weight 0 and ce_weight 1 is STUDENT."""
    import torch

    from cmkd.config import STUDENT_RUN, TEACHER_RUN
    from cmkd.pipeline.train import train_run
    from cmkd.training.config import TrainConfig
    from tests.conftest import tiny_synthetic_file

    tiny_synthetic_file(tmp_path / "d.h5")
    models = {"teacher": {"arch": "mlp", "hidden": [16]}, "student": {"arch": "mlp", "hidden": [16]}}
    common = dict(dataset="synthetic", prepared=tmp_path / "d.h5", models=models,
                  train_cfg=TrainConfig(epochs=2, batch_size=32),
                  seeds=[0, 1], checkpoint_root=None, progress=False)
    train_run(run_name="teacher", run_cfg=TEACHER_RUN, out_dir=tmp_path / "teacher", cache_train_logits=True, **common)
    student = train_run(run_name="student", run_cfg=STUDENT_RUN, out_dir=tmp_path / "student", **common)
    kd = train_run(run_name="kd0", run_cfg={"method": "kd", "ce_weight": 1.0, "kd_weight": 0.0, "temperature": 4.0},
                   out_dir=tmp_path / "kd0", teacher_dir=tmp_path / "teacher", **common)
    for seed in ("0", "1"):
        assert kd["seeds"][seed]["test"]["student"] == student["seeds"][seed]["test"]["model"]
        a = torch.load(tmp_path / "student" / f"seed{seed}" / "model.pt", weights_only=True)
        b = torch.load(tmp_path / "kd0" / f"seed{seed}" / "student.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and different seeds really differ (the pairing is by seed, not a constant)
    a0 = torch.load(tmp_path / "student" / "seed0" / "model.pt", weights_only=True)
    a1 = torch.load(tmp_path / "student" / "seed1" / "model.pt", weights_only=True)
    assert not all(torch.equal(a0[k], a1[k]) for k in a0)
    report = collect([tmp_path / "student", tmp_path / "kd0"])
    assert report["rows"]["kd0"]["vs_student"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 2,
                                                   "verdict": "indistinguishable"}
