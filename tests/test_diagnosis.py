"""The diagnosis: indicators against independent numpy references, batched == per
slice, the predictor and its leave-one-sweep-out validation on data whose answer is known, the
report formats, the stage end to end on the tiny synthetic file, and dvc.yaml's dependencies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cmkd.diagnosis.indicators import INDICATORS, calibration_error, indicators, ridge_r2
from cmkd.diagnosis.predictor import (
    fit_predictor,
    leave_one_sweep_out,
    predict,
    standing,
    sweep_bootstrap,
    validation_summary,
    weighted_spearman,
)

REPO = Path(__file__).resolve().parents[1]


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ntdh_div(p, q):
    """NTDH's form 0.5 [KL(m || p) + KL(m || q)], m = (p + q) / 2, per row."""
    m = (p + q) / 2
    return 0.5 * (m * np.log(m / p)).sum(-1) + 0.5 * (m * np.log(m / q)).sum(-1)


def _reference(zt, zs, y, feats, bins=15, penalty=1.0):
    """Numpy reference of every indicator for one slice."""
    n, c = zt.shape
    pt, ps = _softmax(zt.astype(np.float64)), _softmax(zs.astype(np.float64))
    rows = np.arange(n)
    ref = {"teacher_acc": np.mean(pt.argmax(1) == y), "student_acc": np.mean(ps.argmax(1) == y),
           "agreement": np.mean(pt.argmax(1) == ps.argmax(1))}
    ref["acc_gap"] = ref["teacher_acc"] - ref["student_acc"]
    bt, bs = np.stack([pt[rows, y], 1 - pt[rows, y]], 1), np.stack([ps[rows, y], 1 - ps[rows, y]], 1)
    ref["target_div"] = _ntdh_div(bs, bt).mean()
    keep = np.ones((n, c), bool)
    keep[rows, y] = False
    nt = lambda p: (p[keep].reshape(n, c - 1)) / p[keep].reshape(n, c - 1).sum(1, keepdims=True)  # noqa: E731
    ref["non_target_div"] = _ntdh_div(nt(ps), nt(pt)).mean()

    def ece(p):
        conf, correct = p.max(1), p.argmax(1) == y
        total = 0.0
        for b in range(bins):  # (b/bins, (b+1)/bins], the first bin also taking 0
            sel = (conf > b / bins) & (conf <= (b + 1) / bins) if b else conf <= 1 / bins
            if sel.any():
                total += sel.sum() / n * abs(conf[sel].mean() - correct[sel].mean())
        return total

    ref["teacher_ece"], ref["student_ece"] = ece(pt), ece(ps)

    def r2(x, t):
        xf, xh, tf, th = x[0::2], x[1::2], t[0::2], t[1::2]
        mu, sd = xf.mean(0), xf.std(0, ddof=1)
        xf, xh = (xf - mu) / sd, (xh - mu) / sd
        w = np.linalg.solve(xf.T @ xf + penalty * np.eye(x.shape[1]), xf.T @ (tf - tf.mean(0)))
        pred = xh @ w + tf.mean(0)
        return 1 - ((th - pred) ** 2).sum() / ((th - tf.mean(0)) ** 2).sum()

    logp = np.log(pt)
    class_mean = np.stack([logp[0::2][y[0::2] == k].mean(0) for k in range(c)])
    ref["probe_r2"] = r2(feats, logp - class_mean[y])
    ref["general_r2"] = r2(feats, zt.astype(np.float64))
    return ref


def _case(seed=0, s=3, n=120, c=4, d=6):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(s, n, c, generator=g) * 2
    zs = zt * 0.5 + torch.randn(s, n, c, generator=g)
    y = torch.randint(0, c, (s, n), generator=g)
    y[:, :2 * c] = torch.arange(c).repeat(2)  # every class among the fit rows
    f = torch.randn(s, n, d, generator=g)
    return zt, zs, y, f


def test_indicators_match_numpy_reference():
    zt, zs, y, f = _case()
    got = indicators(zt[0], zs[0], y[0], f[0])
    ref = _reference(zt[0].numpy(), zs[0].numpy(), y[0].numpy(), f[0].numpy().astype(np.float64))
    assert set(got) == set(INDICATORS)
    for name in INDICATORS:
        assert got[name] == pytest.approx(ref[name], rel=1e-4, abs=1e-6), name


def test_identical_pair_has_no_divergence_and_full_agreement():
    zt, _, y, _ = _case()
    got = indicators(zt[0], zt[0].clone(), y[0])
    assert got["agreement"] == 1.0 and got["acc_gap"] == 0.0
    assert got["target_div"] == pytest.approx(0, abs=1e-6) and got["non_target_div"] == pytest.approx(0, abs=1e-6)
    assert got["teacher_ece"] == got["student_ece"]
    # the student's logits (as features) are the teacher's: the general probe is nearly exact
    assert got["general_r2"] > 0.99


def test_batched_equals_per_slice():
    zt, zs, y, f = _case(seed=3, s=4)
    batched = indicators(zt, zs, y, f)
    for i in range(4):
        one = indicators(zt[i], zs[i], y[i], f[i])
        for name in INDICATORS:
            assert batched[name][i] == pytest.approx(one[name], rel=1e-6, abs=1e-9), (i, name)  # float32 divergences


def test_calibration_error_matches_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    zt, _, y, _ = _case(seed=5, s=2, n=300)
    ours = calibration_error(zt, y, 10)
    for i in range(2):
        ref = multiclass_calibration_error(zt[i].softmax(-1), y[i], num_classes=4, n_bins=10, norm="l1")
        assert float(ours[i]) == pytest.approx(float(ref), abs=1e-5)


def test_probe_sees_information_beyond_the_label():
    """Features that carry the teacher's within-class variation give a high probe R^2; pure
    noise features give R^2 <= ~0."""
    g = torch.Generator().manual_seed(1)
    n, c = 400, 3
    y = torch.randint(0, c, (n,), generator=g)
    latent = torch.randn(n, 2, generator=g)
    zt = torch.nn.functional.one_hot(y, c).float() * 3 + latent @ torch.randn(2, c, generator=g)
    informative = torch.cat([latent, torch.nn.functional.one_hot(y, c).float()], 1)
    noise = torch.randn(n, 5, generator=g)
    assert indicators(zt, zt, y, informative)["probe_r2"] > 0.5  # log-softmax is not linear in the latent
    assert indicators(zt, zt, y, noise)["probe_r2"] < 0.05


def test_ridge_r2_exact_linear_map():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 200, 3, generator=g)
    y = x @ torch.randn(3, 2, generator=g)
    assert torch.all(ridge_r2(x, y, penalty=1e-8) > 1 - 1e-8)


def test_indicators_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        indicators(torch.zeros(10, 3), torch.zeros(10, 4), torch.zeros(10, dtype=torch.long))


def _conditions(gain_of):
    rng = np.random.default_rng(0)
    out = []
    for sweep in ("a", "b", "c", "d"):
        for i in range(5):
            ind = {"x": float(rng.normal()), "z": float(rng.normal())}
            out.append({"sweep": sweep, "point": i, "indicators": ind, "gain": gain_of(ind)})
    return out


def test_leave_one_sweep_out_recovers_a_linear_gain():
    conds = _conditions(lambda ind: 0.05 * ind["x"] + 0.01)
    held = leave_one_sweep_out(conds, ["x", "z"], penalty=1e-9)
    for c in held:
        assert c["predicted"]["mean"] == pytest.approx(c["gain"], abs=1e-6)
    summary = validation_summary(held)
    assert summary["conditions"] == 20 and summary["spearman_heldout"] == pytest.approx(1.0)
    assert summary["sign_accuracy"] == 1.0
    assert set(summary["per_sweep"]) == {"a", "b", "c", "d"}
    assert all(v == {"spearman": pytest.approx(1.0), "n": 5} for v in summary["per_sweep"].values())


def test_heldout_sweep_is_never_in_the_fit():
    """A sweep whose gain is shifted by a constant nobody else shows is mispredicted by exactly
    that constant: its own rows did not enter the fit."""
    conds = _conditions(lambda ind: 0.05 * ind["x"])
    for c in conds:
        if c["sweep"] == "c":
            c["gain"] += 0.3
    held = {(c["sweep"], c["point"]): c for c in leave_one_sweep_out(conds, ["x"], penalty=1e-9)}
    errors = [held[("c", i)]["gain"] - held[("c", i)]["predicted"]["mean"] for i in range(5)]
    assert np.allclose(errors, 0.3, atol=1e-6)


def test_prediction_interval_covers_new_conditions_at_the_nominal_rate():
    """Marginal coverage of the t prediction interval over many small fits (unpenalised: the
    exact OLS interval): 95% within sampling error."""
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(600):
        x = rng.normal(size=13)
        y = 0.1 * x + rng.normal(0, 0.05, size=13)
        model = fit_predictor([{"x": float(v)} for v in x[:12]], y[:12], ["x"], penalty=0.0)
        lo, hi = predict(model, {"x": float(x[12])})["ci95"]
        hits.append(lo <= y[12] <= hi)
    assert 0.925 <= np.mean(hits) <= 0.975  # +- 2.8 standard errors of a 95% rate over 600
    half = [predict(model, {"x": 0.0})["ci95"][1] - predict(model, {"x": 0.0})["mean"]]
    assert half[0] > 0


def _heldout(sweep_of_row, predicted, gain):
    return [{"sweep": s, "point": i, "gain": float(g), "predicted": {"mean": float(p)}}
            for i, (s, p, g) in enumerate(zip(sweep_of_row, predicted, gain))]


def test_weighted_spearman_is_scipys_on_the_repeated_rows():
    """Every resample at once equals scipy's Spearman on the sample with row j written w_j times
    (ties, from repeats and from equal values, get mid-ranks as in scipy)."""
    from scipy import stats

    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 4, size=15).astype(float), rng.normal(size=15)
    weights = rng.integers(0, 3, size=(40, 15))
    ours = weighted_spearman(a, b, weights)
    for w, r in zip(weights, ours):
        ref = stats.spearmanr(np.repeat(a, w), np.repeat(b, w)).statistic if w.sum() >= 3 else np.nan
        assert (math.isnan(r) and math.isnan(ref)) or r == pytest.approx(ref, abs=1e-12)
    assert math.isnan(weighted_spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], np.ones((1, 3)))[0])  # constant side


def test_sweep_bootstrap_of_perfect_predictions_is_one_and_of_noise_contains_zero():
    sweeps = np.repeat(["a", "b", "c", "d", "e", "f"], 5)
    gain = np.random.default_rng(0).normal(size=30)
    perfect = sweep_bootstrap(_heldout(sweeps, 2 * gain + 0.1 * np.sign(gain), gain))
    assert perfect["spearman_heldout_ci95"] == [1.0, 1.0] and perfect["sign_accuracy_ci95"] == [1.0, 1.0]
    noise = sweep_bootstrap(_heldout(sweeps, np.random.default_rng(1).normal(size=30), gain))
    lo, hi = noise["spearman_heldout_ci95"]
    assert lo < 0 < hi and hi - lo > 0.2
    lo, hi = noise["sign_accuracy_ci95"]
    assert lo < 0.5 < hi
    assert noise == sweep_bootstrap(_heldout(sweeps, np.random.default_rng(1).normal(size=30), gain))  # seeded
    assert noise["bootstrap"]["unit"] == "sweep" and noise["bootstrap"]["resamples"] == 2000


def test_sweep_bootstrap_draws_whole_sweeps_not_rows():
    """Two sweeps of 20 conditions: ranked exactly right in one, exactly wrong in the other. Drawing
    whole sweeps gives each sweep alone a quarter of the time, so the interval runs from -1 to 1;
    drawing the 40 rows one by one would give a narrow interval around the pooled value instead."""
    x = np.arange(20.0)
    sweeps = ["right"] * 20 + ["wrong"] * 20
    boot = sweep_bootstrap(_heldout(sweeps, np.concatenate([x, x]), np.concatenate([x, -x])))
    assert boot["spearman_heldout_ci95"] == pytest.approx([-1.0, 1.0])
    assert boot["sign_accuracy_ci95"][1] == 1.0  # "right" drawn twice: every sign (zero as its own) right


def test_the_wording_is_a_prior_until_the_spearman_interval_excludes_zero():
    from cmkd.diagnosis.report import standing_sentence

    v = {"conditions": 29, "sweeps": 6, "spearman_heldout": 0.3, "spearman_heldout_ci95": [-0.2, 0.7],
         "sign_accuracy": 0.69, "sign_accuracy_ci95": [0.5, 0.85]}
    assert standing(v["spearman_heldout_ci95"]) == "prior"
    text = standing_sentence(v)
    assert "**a prior**" in text and "contains 0" in text and "[-0.20, +0.70]" in text and "69% [50%, 85%]" in text
    assert "29 conditions in 6 sweeps" in text
    up = {**v, "spearman_heldout_ci95": [0.05, 0.7]}
    assert standing(up["spearman_heldout_ci95"]) == "prediction"
    assert "**a prediction**" in standing_sentence(up) and "prior" not in standing_sentence(up)
    down = {**v, "spearman_heldout_ci95": [-0.7, -0.05]}
    assert standing(down["spearman_heldout_ci95"]) == "prior" and "wrong way" in standing_sentence(down)
    assert standing(None) == "prior" and "**a prior**" in standing_sentence(None)


def test_diagnosis_says_prior_or_prediction_from_the_committed_numbers_and_in_sample():
    from cmkd.diagnosis.report import apply_predictor, dataset_report, diagnosis_markdown

    conds = _conditions(lambda ind: 0.05 * ind["x"])
    cfg = {"predictor": {"features": ["x"], "penalty": 1.0}}
    model = fit_predictor([c["indicators"] for c in conds], [c["gain"] for c in conds], ["x"], 1.0)
    validation = {"conditions": 20, "sweeps": 4, "spearman_heldout": 0.3, "spearman_heldout_ci95": [-0.2, 0.7],
                  "sign_accuracy": 0.6, "sign_accuracy_ci95": [0.4, 0.8]}
    metrics = {"rows": {"student": {"accuracy": {"values": [0.5, 0.6], "seeds": ["0", "1"], "n": 2}},
                        "kdv1": {"accuracy": {"values": [0.55, 0.62], "seeds": ["0", "1"], "n": 2}}}}

    def report(validation, main):
        fit_on = {"conditions": 20, "sweeps": ["a", "main"]} | ({"main": main} if main is not None else {})
        predictor = {"model": model, "validation": validation, "fit_on": fit_on}
        d = apply_predictor({"dataset": "syn", "split": "val", "seeds": [0, 1], "indicators": {"x": 0.5}},
                            predictor, cfg)
        rep = dataset_report(d, metrics)
        return d, rep, diagnosis_markdown({**d, **rep})

    d, rep, md = report(validation, ["syn"])
    assert d["predictor"]["standing"] == "prior" and d["method_expectations"]["kdv1"].startswith("prior: plain KD")
    assert "**Predicted KD gain, a prior**" in md and "contains 0" in md
    assert rep["comparison"] == "in-sample" and "**in-sample**" in md
    d, rep, md = report({**validation, "spearman_heldout_ci95": [0.1, 0.7]}, ["other"])
    assert d["predictor"]["standing"] == "prediction" and "**Predicted KD gain, a prediction**" in md
    assert rep["comparison"] == "out-of-sample" and "in-sample" not in md
    _, _, md = report(None, None)  # an older predictor file: no numbers, fit on main datasets it does not name
    assert "a prior" in md and "no held-out interval" in md and "**in-sample**" in md


def test_predictor_names_missing_indicator():
    with pytest.raises(ValueError, match="'z' missing"):
        fit_predictor([{"x": 1.0}] * 3, [0.0, 1.0, 2.0], ["x", "z"])


def test_validation_format_and_markdown(tmp_path):
    from cmkd.diagnosis.report import fit_committed, validate, validation_figure, validation_markdown

    conds = []
    rng = np.random.default_rng(3)
    for sweep in ("mfh_gamma", "mfh_alg1", "ntdh_gap"):
        for i in range(6):
            ind = {name: float(rng.normal()) for name in INDICATORS}
            conds.append({"sweep": sweep, "point": i, "coords": {}, "indicators": ind, "gain": 0.02 * ind["acc_gap"],
                          "true_general_share": ind["general_r2"] + 0.01 * i})
    cfg = {"predictor": {"features": ["acc_gap", "general_r2"], "penalty": 1.0}}
    committed = fit_committed(conds, cfg)
    v = validate(conds, cfg, committed)
    assert {"conditions", "sweeps", "spearman_heldout", "sign_accuracy", "per_sweep", "spearman_heldout_ci95",
            "sign_accuracy_ci95", "standing", "summary"} <= set(v)
    assert v["conditions"] == 18 and v["sweeps"] == 3 and v["predictor_up_to_date"] is True
    lo, hi = v["spearman_heldout_ci95"]
    assert lo <= v["spearman_heldout"] <= hi and 0 <= v["sign_accuracy_ci95"][0] <= v["sign_accuracy_ci95"][1] <= 1
    assert committed["validation"]["spearman_heldout_ci95"] == v["spearman_heldout_ci95"]
    assert committed["fit_on"]["main"] == []
    old_format = {k: committed[k] for k in ("target", "model")} | {"fit_on": {"conditions": 18, "sweeps": []}}
    assert validate(conds, cfg, old_format)["predictor_up_to_date"] is False  # refit to record its validation
    assert all(set(e) == {"spearman", "n"} for e in v["per_sweep"].values())
    assert v["spearman_heldout"] > 0.9
    stale = json.loads(json.dumps(committed))
    stale["model"]["weights"][1] += 0.01
    assert validate(conds, cfg, stale)["predictor_up_to_date"] is False
    md = validation_markdown(v)
    assert "held-out Spearman" in md and v["summary"] in md and "18 conditions in 3 sweeps" in md
    assert f"[{v['spearman_heldout_ci95'][0]:.3f}, {v['spearman_heldout_ci95'][1]:.3f}]" in md
    validation_figure(v, tmp_path / "v.png")
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"


def test_dataset_report_format():
    from cmkd.diagnosis.report import dataset_report

    diag = {"dataset": "d", "split": "val", "seeds": [0, 1], "indicators": {"acc_gap": 0.1},
            "predicted_kd_gain": {"mean": 0.01, "ci95": [-0.01, 0.03]}}
    metrics = {"metric": "f1_weighted", "rows": {
        "student": {"accuracy": {"values": [0.5, 0.6], "seeds": ["0", "1"], "n": 2}},
        "kdv1": {"accuracy": {"values": [0.55, 0.62], "seeds": ["0", "1"], "n": 2}, "vs_student": {"mean": 0.04}}}}
    rep = dataset_report(diag, metrics)
    assert rep["indicators"] == {"acc_gap": 0.1} and rep["predicted_kd_gain"]["ci95"] == [-0.01, 0.03]
    assert rep["measured_kd_gain"] == pytest.approx(0.035)
    assert dataset_report(diag, {"rows": {"student": metrics["rows"]["student"]}})["measured_kd_gain"] is None
    assert dataset_report(diag, None)["measured_kd_gain"] is None


def test_experiment_indicators_are_emitted_per_point():
    """teacher_student_kd gives every slice its diag_* indicators, equal to indicators() on that
    slice's own teacher and no-KD student."""
    from cmkd.experiments.analysis import Slices, teacher_student_kd

    g = torch.Generator().manual_seed(0)
    n, s = 40, 2
    y = torch.randint(0, 3, (n, s, 1), generator=g)
    data = Slices(torch.randn(n, s, 5, generator=g) + y, torch.randn(n, s, 4, generator=g), y)
    nets = {r: {"model": {"arch": "mlp", "hidden": [6]},
                "train": {"epochs": 3, "lr": 0.01, "optimizer": "adam"}} for r in ("teacher", "student")}
    acc, out = teacher_student_kd({"train": data, "test": data}, nets, {"method": "kd"}, 3, [0, 1], "k")
    for i in range(s):
        one = indicators(out["test_logits"]["teacher"][:, :, i, 0], out["test_logits"]["nokd"][:, :, i, 0], y[:, i, 0],
                         out["nokd"].features(data.student)[i])
        for name in INDICATORS:
            assert acc[f"diag_{name}"][i] == pytest.approx(one[name], rel=1e-6, abs=1e-9)
    assert acc["diag_student_acc"] == pytest.approx(acc["nokd_acc"])


def test_diagnose_stage_end_to_end(tmp_path, monkeypatch, one_thread):
    """measure_dataset + apply_predictor on the tiny prepared synthetic file with a teacher and
    a student trained by the pipeline."""
    from cmkd.config import STUDENT_RUN, TEACHER_RUN
    from cmkd.diagnosis.report import apply_predictor, diagnosis_markdown, measure_dataset
    from cmkd.pipeline.train import train_run
    from cmkd.training.config import TrainConfig
    from tests.conftest import tiny_synthetic_file

    tiny_synthetic_file(tmp_path / "d.h5")
    models = {"teacher": {"arch": "mlp", "hidden": [16]}, "student": {"arch": "mlp", "hidden": [16]}}
    common = dict(dataset="synthetic", prepared=tmp_path / "d.h5", models=models,
                  train_cfg=TrainConfig(epochs=2, batch_size=32),
                  seeds=[0, 1], checkpoint_root=None, progress=False)
    train_run(run_name="teacher", run_cfg=TEACHER_RUN, out_dir=tmp_path / "teacher", **common)
    train_run(run_name="student", run_cfg=STUDENT_RUN, out_dir=tmp_path / "student", **common)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = params["diagnosis"]
    d = measure_dataset(tmp_path / "d.h5", tmp_path / "teacher", tmp_path / "student", models, [0, 1], "synthetic", cfg)
    assert set(d["indicators"]) == set(INDICATORS) and set(d["per_seed"]) == {"0", "1"}
    assert d["indicator_intervals"]["acc_gap"]["n"] == 2
    assert d["indicators"]["teacher_acc"] == pytest.approx(np.mean([d["per_seed"][s]["teacher_acc"] for s in "01"]))
    predictor = json.loads((REPO / "diagnosis_predictor.json").read_text())
    d = apply_predictor(d, predictor, cfg)
    lo, hi = d["predicted_kd_gain"]["ci95"]
    assert lo < d["predicted_kd_gain"]["mean"] < hi
    assert "Predicted KD gain" in diagnosis_markdown(d)
    with pytest.raises(Exception, match="seed 7"):
        measure_dataset(tmp_path / "d.h5", tmp_path / "teacher", tmp_path / "student", models, [7], "synthetic", cfg)


def test_dvc_diagnose_depends_on_no_distill_or_experiment_output():
    """Every output of every stage but prepare / train_teacher / train_student (distill runs for
    each dataset and method, experiments, reports...) is forbidden as a diagnose dependency."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deps = stages["diagnose"]["do"]["deps"]
    assert "data/runs/${item}/teacher" in deps and "data/runs/${item}/student" in deps
    assert "diagnosis_predictor.json" in deps
    # resolve writes each role's model and training, which the diagnosis reads
    allowed_producers = {"download", "resolve", "prepare", "train_teacher", "train_student"}
    forbidden = set()
    for ds in params["datasets"]:
        for name, stage in stages.items():
            if name in allowed_producers:
                continue
            body = stage.get("do", stage)
            for out in body.get("outs", []):
                path = out if isinstance(out, str) else next(iter(out))
                for run in params["methods"]:
                    forbidden.add(path.replace("${item.dataset}", ds).replace("${item.run}", run)
                                  .replace("${item}", ds))
        resolved = [d.replace("${item}", ds) for d in deps]
        assert "data/runs/" + ds + "/kdv1" in forbidden  # the check sees the distill outputs
        for dep in resolved:
            assert not any(dep == f or dep.startswith(f + "/") or f.startswith(dep + "/") for f in forbidden), dep
    assert stages["diagnose"]["do"]["params"][0] == "diagnosis"
    # the predictor is committed, not produced by any stage
    assert all("diagnosis_predictor.json" not in json.dumps(s.get("do", s).get("outs", [])) for s in stages.values())


def test_committed_predictor_matches_params():
    params = yaml.safe_load((REPO / "params.yaml").read_text())["diagnosis"]["predictor"]
    model = json.loads((REPO / "diagnosis_predictor.json").read_text())["model"]
    assert model["features"] == params["features"] and model["penalty"] == params["penalty"]
    assert len(model["weights"]) == len(params["features"]) + 1 and math.isfinite(model["sigma2"])


def test_pipeline_artifact_shows_the_diagnosis_first(tmp_path):
    from flows.reports import pipeline_markdown

    (tmp_path / "params.yaml").write_text("datasets: [synthetic]\n")
    stages = [{"stage": "diagnose@synthetic", "status": "ok", "seconds": 1.0, "attempts": 1}]
    assert "Will KD help" not in pipeline_markdown(tmp_path, stages)
    (tmp_path / "data" / "diagnosis").mkdir(parents=True)
    (tmp_path / "data" / "diagnosis" / "synthetic.md").write_text("# Will KD help on `synthetic`?\n\nPREDICTED\n")
    md = pipeline_markdown(tmp_path, stages)
    assert md.index("## Will KD help? (diagnosis)") < md.index("PREDICTED") < md.index("## Stages")
    assert "### Will KD help on `synthetic`?" in md


def test_collect_conditions_reads_sweeps_and_measured_main_datasets(tmp_path):
    from cmkd.diagnosis.report import SWEEPS, collect_conditions

    point = {**{f"diag_{n}": {"mean": 0.1} for n in INDICATORS},
             "kd_gain": {"mean": 0.02, "sem": 0.01, "n": 3}, "gamma": 0.5}
    for sweep in SWEEPS:
        (tmp_path / f"{sweep}.json").write_text(json.dumps({"points": [point, point]}))
    (tmp_path / "syn.json").write_text(json.dumps({"indicators": {n: 0.2 for n in INDICATORS},
                                                   "measured_kd_gain": -0.01,
                                                   "measured_detail": {"n": 5}}))
    (tmp_path / "dig.json").write_text(json.dumps({"indicators": {n: 0.2 for n in INDICATORS},
                                                   "measured_kd_gain": None}))
    conds = collect_conditions(tmp_path, {"syn": tmp_path / "syn.json", "dig": tmp_path / "dig.json",
                                          "none": tmp_path / "x.json"})
    assert len(conds) == 2 * len(SWEEPS) + 1
    main = [c for c in conds if c["sweep"] == "main"]
    assert main == [{"sweep": "main", "point": "syn", "coords": {}, "indicators": {n: 0.2 for n in INDICATORS},
                     "gain": -0.01, "n_seeds": 5}]
    (tmp_path / "mfh_gamma.json").write_text(json.dumps({"points": [{"kd_gain": {"mean": 0.0}}]}))
    with pytest.raises(Exception, match="rerun exp_mfh_gamma"):
        collect_conditions(tmp_path, {})


def test_diagnosis_params_are_checked_naming_the_key():
    from cmkd.diagnosis.report import check_config
    from cmkd.errors import ConfigError

    cfg = yaml.safe_load((REPO / "params.yaml").read_text())["diagnosis"]
    assert check_config(cfg) == cfg
    with pytest.raises(ConfigError, match="diagnosis.predictor.features"):
        check_config({**cfg, "predictor": {"features": ["acc_gap", "nope"], "penalty": 1.0}})
    with pytest.raises(ConfigError, match="diagnosis.bins"):
        check_config({**cfg, "bins": 3})


@pytest.mark.slow
def test_tiny_pipeline_writes_both_reports_and_diagnose_ignores_distill_changes(tmp_path):
    """A fresh tiny pipeline: `dvc repro` of the diagnosis targets trains what they need, writes
    diagnosis.json (the issue's format) and validation.json with a `main` condition; a second
    repro runs nothing; a distillation param change leaves diagnose up to date."""
    from tests.conftest import copy_pipeline, dvc, stages_run, tiny_params, tool_env

    repo = copy_pipeline(tmp_path / "repo")
    env = {**tool_env(tmp_path), "CMKD_SEED_WORKERS": "1"}
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(["init", "--no-scm", "-q"], repo, env)
    targets = ["diagnosis_validation", "diagnosis_report@synthetic"]
    ran = stages_run(dvc(["repro", *targets], repo, env).stdout)
    assert {"diagnose@synthetic", "diagnosis_report@synthetic", "diagnosis_validation", "distill@synthetic-kdv1"} <= ran
    report = json.loads((repo / "data/reports/synthetic/diagnosis.json").read_text())
    assert set(report["predicted_kd_gain"]) == {"mean", "ci95"} and isinstance(report["measured_kd_gain"], float)
    assert set(report["indicators"]) == set(INDICATORS)
    v = json.loads((repo / "data/reports/diagnosis/validation.json").read_text())
    assert v["conditions"] == 28 and v["per_sweep"]["main"]["n"] == 1
    assert (repo / "data/reports/diagnosis/validation.png").read_bytes()[:4] == b"\x89PNG"
    assert stages_run(dvc(["repro", *targets], repo, env).stdout) == set()
    params["runs"]["kdv1"]["temperature"] = 2.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "diagnose@synthetic" not in dvc(["status", "diagnose@synthetic"], repo, env).stdout
