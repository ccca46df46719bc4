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
    assert set(rows["noisy"]["vs_student"]) == {"mean", "ci95", "n", "p", "p_margin", "p_holm", "verdict"}
    # no margin given: the table says so, and p_margin is the plain test against 0
    assert report["margin"]["kind"] == "none" and report["margin"]["value"] == 0.0
    assert rows["noisy"]["vs_student"]["p_margin"] == rows["noisy"]["vs_student"]["p"]
    # the Holm family: every row compared with STUDENT, DisCoM-KD's teacher-modality branch included
    assert sorted(report["multiplicity"]["family"]) == ["bad", "discom_kd", "discom_kd/teacher_modality", "kdv1",
                                                        "noisy"]
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
    assert csv[0].endswith(",verdict,p_holm")
    assert any(line.startswith("noisy,") and ",indistinguishable," in line for line in csv)


def test_metrics_summary_is_small_and_rounded(tmp_path):
    report = _report(tmp_path)
    small = metrics_summary(report)
    assert set(small["kdv1"]) == {"f1_weighted", "mean_ci95_lo", "mean_ci95_hi", "n", "vs_student",
                                  "vs_student_ci95_lo", "vs_student_ci95_hi", "p_holm", "verdict"}
    assert set(small["student"]) == {"f1_weighted", "mean_ci95_lo", "mean_ci95_hi", "n"}
    assert small["kdv1"]["f1_weighted"] == 0.7233 and small["kdv1"]["verdict"] == "better"
    # the row mean's interval and the paired one (what the verdict reads) are named apart
    assert small["kdv1"]["mean_ci95_lo"] < 0.7233 < small["kdv1"]["mean_ci95_hi"]
    vs = report["rows"]["kdv1"]["vs_student"]
    assert [small["kdv1"]["vs_student_ci95_lo"], small["kdv1"]["vs_student_ci95_hi"]] == [
        round(vs["ci95"][0], 4), round(vs["ci95"][1], 4)]
    assert small["kdv1"]["vs_student_ci95_lo"] < small["kdv1"]["vs_student"] < small["kdv1"]["vs_student_ci95_hi"]
    assert small["kdv1"]["p_holm"] == round(vs["p_holm"], 4) and small["kdv1"]["p_holm"] < 0.05
    assert small["noisy"]["vs_student_ci95_lo"] < 0 < small["noisy"]["vs_student_ci95_hi"]
    one = metrics_summary({"metric": "f1_weighted",
                           "rows": {"student": {"f1_weighted": {"mean": 0.5, "values": [0.5], "n": 1}}}})
    assert one == {"student": {"f1_weighted": 0.5, "n": 1}}
    assert metrics_file_name("discom_kd/teacher_modality") == "discom_kd.teacher_modality.json"
    assert max(len(json.dumps(v)) for v in small.values()) < 300


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
    assert report["rows"]["kd0"]["vs_student"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 2, "p": 1.0,
                                                   "p_margin": 1.0, "p_holm": 1.0, "verdict": "indistinguishable"}


# --------------------------------------------------------------------------- margin, multiplicity, power

MARGIN = {"f1_weighted": {"kind": "table_f1", "value": 0.005, "reason": "half a point"}}
STUDENT5 = [0.60, 0.62, 0.64, 0.61, 0.63]


def _plus(diffs):
    return [s + d for s, d in zip(STUDENT5, diffs)]


def _verdict_report(tmp_path):
    dirs = [_run(tmp_path, "student", "supervised", STUDENT5),
            _run(tmp_path, "up", "kd", _plus([0.030, 0.032, 0.028, 0.031, 0.029])),         # beyond the margin
            _run(tmp_path, "down", "kd", _plus([-0.030, -0.032, -0.028, -0.031, -0.029])),  # below -margin
            # significantly above 0 (p < 0.001) but by 0.3 points: inside the half-point margin
            _run(tmp_path, "tiny", "kd", _plus([0.0030, 0.0032, 0.0028, 0.0031, 0.0029])),
            _run(tmp_path, "noisy", "kd", _plus([0.05, -0.04, 0.03, -0.05, 0.02])),
            # beyond the margin on its own (p_margin ~ 0.03), not after Holm over the five rows
            _run(tmp_path, "lone", "kd", _plus([0.010, 0.030, 0.015, 0.035, 0.020]))]
    return collect(dirs, margins=MARGIN)


def test_holm_on_a_hand_computed_example():
    from cmkd.utils.stats import holm

    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([None, 0.02, 0.04]) == [None, pytest.approx(0.04), pytest.approx(0.04)]  # None: no test, not in k
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, never below a smaller p's adjustment
    assert holm([]) == [] and holm([0.2]) == [0.2]
    with pytest.raises(ValueError, match="p-values"):
        holm([1.5])


def test_two_sided_p_is_the_paired_t_test_shifted_by_the_margin():
    from cmkd.utils.stats import two_sided_p

    d = np.array([0.010, 0.030, 0.015, 0.035, 0.020])
    sem = d.std(ddof=1) / np.sqrt(5)
    assert two_sided_p(d.mean(), sem, 4) == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    # beyond +0.005: twice the one-sided p of d - 0.005 > 0 (the other side, d + 0.005 < 0, is far)
    assert two_sided_p(d.mean(), sem, 4, 0.005) == pytest.approx(
        2 * stats.ttest_1samp(d - 0.005, 0.0, alternative="greater").pvalue)
    assert two_sided_p(-d.mean(), sem, 4, 0.005) == two_sided_p(d.mean(), sem, 4, 0.005)
    assert two_sided_p(0.0, 0.0, 4) == 1.0 and two_sided_p(0.01, 0.0, 4, 0.005) == 0.0
    assert two_sided_p(0.004, 0.0, 4, 0.005) == 1.0 and two_sided_p(0.5, None, 0) is None


def test_each_verdict_from_constructed_seeds(tmp_path):
    report = _verdict_report(tmp_path)
    vs = {name: row["vs_student"] for name, row in report["rows"].items() if "vs_student" in row}
    assert {name: v["verdict"] for name, v in vs.items()} == {"up": "better", "down": "worse", "tiny": "equivalent",
                                                             "noisy": "indistinguishable", "lone": "indistinguishable"}
    assert report["margin"]["kind"] == "table_f1" and report["multiplicity"]["family"] == list(vs)
    # tiny: significant against 0, yet inside the margin, so neither better nor "no difference" by accident
    assert vs["tiny"]["p"] < 0.001 and vs["tiny"]["p_margin"] == pytest.approx(1.0)
    assert -0.005 < vs["tiny"]["ci95"][0] and vs["tiny"]["ci95"][1] < 0.005
    # lone: its own test says beyond the margin at 0.05; Holm (rank 3 of 5: x3) does not
    assert 0.05 / 3 < vs["lone"]["p_margin"] < 0.05 and vs["lone"]["p_holm"] == pytest.approx(
        max(3 * vs["lone"]["p_margin"], vs["up"]["p_holm"], vs["down"]["p_holm"]))
    assert vs["lone"]["ci95"][0] > 0.005 and vs["lone"]["p_holm"] > 0.05
    # the same row alone (a family of one) would have been better: the correction decides
    alone = vs_student(report["rows"]["lone"]["f1_weighted"], report["rows"]["student"]["f1_weighted"], 0.005)
    assert alone["verdict"] == "better"
    # better / worse rows: the 95% interval clears the margin
    assert vs["up"]["ci95"][0] > 0.005 and vs["down"]["ci95"][1] < -0.005
    # the same seeds without a margin: tiny is better (significant), nothing is equivalent
    plain = collect([tmp_path / n for n in ("student", "up", "down", "tiny", "noisy", "lone")])
    assert plain["rows"]["tiny"]["vs_student"]["verdict"] == "better"
    assert "equivalent" not in {r["vs_student"]["verdict"] for r in plain["rows"].values() if "vs_student" in r}


def test_table_marks_each_verdict_states_the_rule_and_the_detectable_effect(tmp_path):
    from cmkd.reporting.readme import compact_table

    report = _verdict_report(tmp_path)
    table = markdown_table(report, "toy", ("rgb", "depth"))
    cells = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in table.splitlines()
             if line.startswith("| ") and "---" not in line}
    assert cells["up"].startswith("↑ +3.00 [") and ", p < 0.001" in cells["up"]
    assert cells["down"].startswith("↓ -3.00 [") and cells["tiny"].startswith("≡ +0.30 [")
    assert cells["noisy"].startswith("≈ ") and cells["lone"].startswith("≈ +2.20 [")
    assert f", p {report['rows']['lone']['vs_student']['p_holm']:.2g}" in cells["lone"]
    assert "beyond ±0.50 (margin `table_f1`, claims.yaml), Holm-adjusted over the 5 rows" in table
    mde = report["mde"]
    assert "Minimum detectable effect at 80% power (two-sided paired t, n = 5 seeds" in table
    assert f": {100 * mde['effect']:.2f} at alpha 0.05;" in table
    assert f"needs {100 * mde['effect_verdict']:.2f}." in table
    # the README's compact table reads every marker, the p stays in table.md
    compact = compact_table(table, "toy/table.md")
    assert "| tiny | 62.30 ± 1.57 | +0.30 [+0.28, +0.32] | equivalent |" in compact
    assert compact.count("| equivalent |") == 1
    assert "| up |" in compact and "| better |" in compact and ", p " not in compact


def test_the_tables_detectable_effect_pools_the_paired_spread(tmp_path):
    report = _verdict_report(tmp_path)
    family = report["multiplicity"]["family"]
    diffs = [np.asarray(report["rows"][n]["f1_weighted"]["values"]) - STUDENT5 for n in family]
    pooled = np.sqrt(sum(((d - d.mean()) ** 2).sum() for d in diffs) / sum(len(d) - 1 for d in diffs))
    mde = report["mde"]
    assert mde["sd_diff"] == pytest.approx(pooled) and (mde["n"], mde["rows"], mde["df_pooled"]) == (5, 5, 20)
    from cmkd.utils.stats import min_detectable_effect, power_paired

    assert mde["effect"] == pytest.approx(min_detectable_effect(pooled, 5))
    assert power_paired(mde["effect"], pooled, 5) == pytest.approx(0.8)
    assert power_paired(mde["effect_verdict"], pooled, 5, 0.05 / 5, 0.005) == pytest.approx(0.8)
    assert mde["effect_verdict"] > mde["effect"] + 0.005  # a stricter alpha and the margin on top
    assert collect([tmp_path / "student"], margins=MARGIN)["mde"] is None  # nothing compared: no effect to state


def test_min_detectable_effect_against_a_textbook_value_and_monte_carlo():
    from cmkd.utils.stats import min_detectable_effect, power_paired, two_sided_p

    # Cohen's one-sample / paired t: d = 0.5 at 80% power, two-sided 0.05 needs n = 34 (33 falls short)
    assert min_detectable_effect(1.0, 34) < 0.5 < min_detectable_effect(1.0, 33)
    assert power_paired(0.0, 1.0, 5) == pytest.approx(0.05)  # at no effect the test rejects at its size
    assert min_detectable_effect(2.0, 5) == pytest.approx(2 * min_detectable_effect(1.0, 5))  # scales with sd
    # Monte-Carlo: 5 paired differences ~ N(effect, 1); the share of tests rejecting is the power
    rng = np.random.default_rng(0)
    for margin, alpha in ((0.0, 0.05), (0.3, 0.01)):
        effect = min_detectable_effect(1.0, 5, alpha=alpha, margin=margin)
        d = rng.normal(effect, 1.0, size=(200_000, 5))
        mean, sem = d.mean(axis=1), d.std(axis=1, ddof=1) / np.sqrt(5)
        crit = stats.t.ppf(1 - alpha / 2, 4)
        reject = ((mean - margin) / sem > crit) | ((mean + margin) / sem < -crit)
        assert reject.mean() == pytest.approx(0.8, abs=0.005), (margin, alpha)
        assert two_sided_p(mean[0], sem[0], 4, margin) < alpha or not reject[0]
