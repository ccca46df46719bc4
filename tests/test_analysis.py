"""The MFH generator's structure, the batched trainer's equivalence with training alone, and the
synthetic experiments on tiny configurations."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from torch import nn

from cmkd.data.datasets.synthetic import GENERATORS, mfh_general_channels, mfh_layout, n_shared, ntdh_sklearn
from cmkd.errors import ConfigError
from cmkd.experiments.analysis import (
    EXPERIMENTS,
    Slices,
    derive_mfh_alpha,
    derive_mfh_gamma,
    mfh_sweep,
    plot_rows,
    run_experiment,
    seeds_needed,
    slice_divergences,
    split_indices,
    summarize,
)
from cmkd.experiments.batched import BatchedMLP, slice_accuracy, train_batched
from cmkd.losses import kd_loss
from cmkd.methods import build_distiller
from cmkd.models import build_model

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the MFH generator

def shared_columns(teacher: np.ndarray, student: np.ndarray) -> list[tuple[int, int]]:
    """(teacher channel, student channel) pairs holding identical values."""
    return [(i, j) for i in range(teacher.shape[1]) for j in range(student.shape[1])
            if np.array_equal(teacher[:, i], student[:, j])]


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
def test_mfh_shares_exactly_the_modality_general_features(gamma):
    d, width = 8, 24
    teacher, student, y = GENERATORS["mfh"](n_samples=300, n_features=width, n_classes=3, gamma=gamma,
                                            seed=4, n_decisive=d)
    assert teacher.shape == (300, width) and student.shape == (300, width) and y.shape == (300,)
    assert teacher.dtype == np.float32 and y.dtype == np.int64
    k = int(round((1 - gamma) * d))
    pairs = shared_columns(teacher, student)
    assert len(pairs) == k == n_shared(d, gamma)
    mask = mfh_general_channels(width, gamma, 4, n_decisive=d)
    assert sorted(i for i, _ in pairs) == list(np.flatnonzero(mask))
    assert all(j < d for _, j in pairs)  # shared features sit among the student's decisive channels
    layout = mfh_layout(width, gamma, 4, n_decisive=d)
    assert layout.teacher_specific_share == pytest.approx(1 - k / d)


def test_mfh_label_is_a_linear_function_of_the_decisive_features_only():
    d, width = 6, 20
    teacher, student, y = GENERATORS["mfh"](n_samples=2000, n_features=width, n_classes=2, gamma=0.5,
                                            seed=1, n_decisive=d)
    layout = mfh_layout(width, 0.5, 1, n_decisive=d)
    decisive = np.concatenate([student[:, layout.student_latent >= 0],
                               teacher[:, (layout.teacher_latent >= 0) & ~layout.teacher_general_mask]], axis=1)
    assert decisive.shape[1] == layout.n_latent  # every latent is seen by one modality here
    fit = LogisticRegression(C=1e6, max_iter=5000).fit(decisive, y)
    assert fit.score(decisive, y) == 1.0  # y = 1[delta^T z > 0]: linearly separable
    noise = np.concatenate([student[:, layout.student_latent < 0], teacher[:, layout.teacher_latent < 0]], axis=1)
    assert LogisticRegression(max_iter=2000).fit(noise[:1000], y[:1000]).score(noise[1000:], y[1000:]) < 0.6
    assert 0.35 < y.mean() < 0.65


def test_mfh_alpha_adds_teacher_specific_features():
    d = 10
    for alpha, extra in [(0.0, 0), (0.5, 10), (0.75, 30)]:
        layout = mfh_layout(50, 0.0, 0, n_decisive=d, alpha=alpha, n_latent=50)
        assert layout.n_extra == extra and layout.n_general == d
        assert layout.teacher_specific_share == pytest.approx(alpha)
        assert int((layout.teacher_latent >= 0).sum()) == d + extra
    assert mfh_layout(50, 0.0, 0, n_decisive=20, n_extra=10).teacher_specific_share == pytest.approx(1 / 3)
    # MFH's own gamma for Fig. 2's layout: o / (2d - o)
    assert mfh_layout(25, 0.4, 0, n_decisive=10, student_features=50).mfh_gamma == pytest.approx(6 / 14)


def test_mfh_is_deterministic_and_validates():
    a = GENERATORS["mfh"](n_samples=50, n_features=12, n_classes=2, gamma=0.5, seed=3)
    b = GENERATORS["mfh"](n_samples=50, n_features=12, n_classes=2, gamma=0.5, seed=3)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    with pytest.raises(ConfigError, match="gamma"):
        mfh_layout(12, 1.5, 0)
    with pytest.raises(ConfigError, match="n_features"):
        mfh_layout(12, 0.0, 0, n_decisive=8, alpha=0.5)
    with pytest.raises(ConfigError, match="n_latent"):
        mfh_layout(12, 0.5, 0, n_decisive=4, n_latent=3)


def test_ntdh_generator_unchanged():
    t, s, y = ntdh_sklearn(n_samples=40, n_features=6, n_classes=2, gamma=0.5, seed=0)
    assert t.shape == s.shape == (40, 6)
    assert len(shared_columns(t, s)) == n_shared(6, 0.5)


# --------------------------------------------------------------------------- the batched trainer

@pytest.mark.parametrize("optimizer, lr", [("adam", 0.01), ("sgd", 0.1)])
def test_batched_slice_trains_exactly_as_alone(optimizer, lr):
    torch.manual_seed(0)
    n, s, d, c = 40, 3, 5, 3
    x_t, x_s = torch.randn(n, s, d), torch.randn(n, s, d)
    y = torch.randint(0, c, (n, s, 1))
    cfg = {"arch": "mlp", "hidden": [7]}
    seeds = [11, 12, 13]
    teacher = BatchedMLP.build(cfg, d, c, seeds)
    student = BatchedMLP.build(cfg, d, c, seeds)
    run = {"method": "kd", "ce_weight": 1.0, "kd_weight": 0.5, "temperature": 2.0}
    distiller = build_distiller(run, student, teacher, c)
    train_batched(distiller, {"teacher_input": x_t, "student_input": x_s, "target": y}, s, epochs=15, lr=lr,
                  optimizer=optimizer)

    # slice 1 alone, written out by hand: same init, same loss, same optimizer
    torch.manual_seed(12)
    t_alone = build_model(cfg, (d,), c)
    torch.manual_seed(12)
    s_alone = build_model(cfg, (d,), c)
    opt = (torch.optim.Adam(s_alone.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(s_alone.parameters(), lr=lr))
    with torch.no_grad():
        zt = t_alone(x_t[:, 1])
    for _ in range(15):
        zs = s_alone(x_s[:, 1])
        loss = torch.nn.functional.cross_entropy(zs, y[:, 1, 0]) + 0.5 * kd_loss(zs, zt, 2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert torch.allclose(student(x_s)[:, :, 1, 0], s_alone(x_s[:, 1]), atol=1e-5)
        assert torch.allclose(student.unstack(1)(x_s[:, 1]), s_alone(x_s[:, 1]), atol=1e-5)


def test_slice_metrics_match_per_slice_computation():
    torch.manual_seed(1)
    n, s, c = 30, 4, 5
    zt, zs = torch.randn(n, c, s, 1), torch.randn(n, c, s, 1)
    y = torch.randint(0, c, (n, s, 1))
    acc = slice_accuracy(zs, y)
    for i in range(s):
        assert acc[i] == pytest.approx(float((zs[:, :, i, 0].argmax(1) == y[:, i, 0]).float().mean()))
    div = slice_divergences(zt, zs, y)
    for i in range(s):
        pt, ps = torch.softmax(zt[:, :, i, 0], 1).numpy(), torch.softmax(zs[:, :, i, 0], 1).numpy()
        t = y[:, i, 0].numpy()
        js_target, js_non, nt_target, nt_non = [], [], [], []
        for r in range(n):  # plain NumPy reference, one sample at a time
            bt = np.array([pt[r, t[r]], 1 - pt[r, t[r]]])
            bs = np.array([ps[r, t[r]], 1 - ps[r, t[r]]])
            keep = np.arange(c) != t[r]
            qt, qs = pt[r, keep] / pt[r, keep].sum(), ps[r, keep] / ps[r, keep].sum()
            js_target.append(js(bt, bs))
            js_non.append(js(qt, qs))
            nt_target.append(ntdh_div(bt, bs))
            nt_non.append(ntdh_div(qt, qs))
        # NTDH's form by default, textbook JS under the `_js` names
        assert div["target_div"][i] == pytest.approx(np.mean(nt_target), rel=1e-4, abs=1e-6)
        assert div["non_target_div"][i] == pytest.approx(np.mean(nt_non), rel=1e-4, abs=1e-6)
        assert div["target_div_js"][i] == pytest.approx(np.mean(js_target), rel=1e-4, abs=1e-6)
        assert div["non_target_div_js"][i] == pytest.approx(np.mean(js_non), rel=1e-4, abs=1e-6)
    swapped = slice_divergences(zt, zs, y, form="js")
    assert np.array_equal(swapped["non_target_div"], div["non_target_div_js"])
    assert np.array_equal(swapped["non_target_div_ntdh"], div["non_target_div"])


def js(p, q):
    m = 0.5 * (p + q)
    return 0.5 * float(np.sum(p * np.log(p / m))) + 0.5 * float(np.sum(q * np.log(q / m)))


def ntdh_div(p, q):
    """NTDH's code: 0.5 [KL(m || p) + KL(m || q)]."""
    m = 0.5 * (p + q)
    return 0.5 * float(np.sum(m * np.log(m / p))) + 0.5 * float(np.sum(m * np.log(m / q)))


# --------------------------------------------------------------------------- statistics and plumbing

def test_summarize_and_seed_count():
    s = summarize([1.0, 2.0, 3.0, 6.0])
    assert s["mean"] == 3.0 and s["n"] == 4
    assert s["std"] == pytest.approx(math.sqrt(((2 * 2) + 1 + 0 + 9) / 3))
    assert s["sem"] == pytest.approx(s["std"] / 2)
    assert seeds_needed(0.01, 0.005) == 4
    assert seeds_needed(0.0101, 0.005) == 5
    assert seeds_needed(0.001, 0.005) == 3  # the minimum
    idx = split_indices(10, {"train": 4, "test": 5}, seed=0)
    assert len(idx["train"]) == 4 and len(idx["test"]) == 5 and not set(idx["train"]) & set(idx["test"])


TINY_NET = {"model": {"arch": "mlp", "hidden": []}, "train": {"epochs": 30, "lr": 0.1, "optimizer": "sgd"}}


def tiny_mfh(sweep):
    return {
        "generator": {"n_features": 10, "student_features": 12, "n_classes": 2, "n_decisive": 4, "n_latent": 8},
        "sweep": sweep, "split": {"train": 60, "test": 80},
        "nets": {"teacher": TINY_NET, "student": TINY_NET},
        "kd": {"method": "kd", "ce_weight": 1.0, "kd_weight": 0.5, "temperature": 1.0},
        "seeds": 2,
    }


def test_mfh_sweep_tiny_is_well_formed_and_deterministic():
    cfg = tiny_mfh({"gamma": [1.0, 0.5, 0.0]})
    result = mfh_sweep(cfg)
    again = mfh_sweep(copy.deepcopy(cfg))
    assert result["series"] == again["series"]
    assert result["seeds"] == [0, 1]
    assert len(result["points"]) == 3
    for p in result["points"]:
        for m in ("teacher_acc", "nokd_acc", "kd_acc", "kd_gain"):
            assert p[m]["n"] == 2 and len(p[m]["values"]) == 2
        assert all(0.0 <= v <= 1.0 for v in p["kd_acc"]["values"])
        assert p["kd_gain"]["values"] == pytest.approx(np.subtract(p["kd_acc"]["values"],
                                                                   p["nokd_acc"]["values"]).tolist())
    assert result["series"]["general_share"] == [0.0, 0.5, 1.0]
    # the no-KD student never sees the teacher: identical at every gamma of one seed
    assert len({tuple(p["nokd_acc"]["values"]) for p in result["points"]}) == 1
    derived = derive_mfh_gamma(result)
    assert derived["by_general_share"]["general_share"] == [0.0, 0.5, 1.0]
    assert derived["kd_gain_all_specific"] == result["points"][0]["kd_gain"]  # per-seed values for the claims' t test
    json.dumps(result)  # JSON-ready


def test_mfh_alpha_tiny_and_derived():
    cfg = tiny_mfh({"n_extra": [0, 4]})
    cfg["generator"].update(gamma=0.0)
    result = mfh_sweep(cfg)
    assert result["series"]["teacher_specific_share"] == [0.0, 0.5]
    d = derive_mfh_alpha(result)
    s = result["series"]
    assert d["teacher_gain"]["mean"] == pytest.approx(s["teacher_acc"][1] - s["teacher_acc"][0])
    t = result["points"]
    assert d["teacher_gain"]["values"] == pytest.approx(np.subtract(t[1]["teacher_acc"]["values"],
                                                                    t[0]["teacher_acc"]["values"]).tolist())
    assert d["kd_gain_band"] == pytest.approx(abs(s["kd_gain"][1] - s["kd_gain"][0]))
    ratio = d["kd_gain_band_over_teacher_gain"]
    if d["teacher_gain"]["mean"] > 0:
        assert ratio["mean"] == pytest.approx(d["kd_gain_band"] / d["teacher_gain"]["mean"])
    assert ratio["n"] == 2


def test_bad_sweeps_name_the_key():
    cfg = tiny_mfh({"gamma": [0.0, 0.5], "n_decisive": [4]})
    with pytest.raises(ConfigError, match="experiments.mfh.sweep"):
        mfh_sweep(cfg)
    cfg = tiny_mfh({"gamma": [0.0]})
    cfg["generator"].update(n_decisive=30, n_latent=60)
    with pytest.raises(ConfigError, match="experiments.mfh.sweep.n_features"):
        mfh_sweep(cfg)
    cfg = tiny_mfh({"gamma": [0.0]})
    cfg["seeds"] = []
    with pytest.raises(ConfigError, match="seeds"):
        mfh_sweep(cfg)


def test_stacked_slices_keep_each_slice_data():
    data = [GENERATORS["mfh"](n_samples=20, n_features=6, n_classes=2,
                              gamma=g, seed=s) for g in (0.0, 1.0) for s in (0, 1)]
    from cmkd.experiments.analysis import stack
    idx = [split_indices(20, {"train": 8, "test": 12}, s) for s in (0, 1, 0, 1)]
    splits = stack(data, idx)
    assert isinstance(splits["train"], Slices) and splits["train"].teacher.shape == (8, 4, 6)
    assert splits["test"].target.shape == (12, 4, 1)
    t, st, y = splits["train"].slice(3)
    assert np.array_equal(t.numpy(), data[3][0][idx[3]["train"]])
    assert np.array_equal(y.numpy(), data[3][2][idx[3]["train"]])


# --------------------------------------------------------------------------- the stage

def test_experiment_stage_writes_json_csv_and_figure(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["experiments"]["mfh_gamma"] = tiny_mfh({"gamma": [1.0, 0.0]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, "-m", "stages", "experiment", "mfh_gamma", "--params",
                          str(tmp_path / "params.yaml"),
                          "--out-dir", str(tmp_path / "exp")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "exp" / "mfh_gamma.json").read_text())
    assert result["experiment"] == "mfh_gamma" and "derived" in result
    assert result["config"]["sweep"] == {"gamma": [1.0, 0.0]}
    csv_lines = (tmp_path / "exp" / "mfh_gamma.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[0] == "general_share" and len(csv_lines) == 3
    assert (tmp_path / "exp" / "mfh_gamma.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_rows("mfh_gamma", result)[0]["general_share"] == 0.0


def test_every_configured_experiment_is_known():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    names = list(params["experiments"])
    assert set(names) == set(EXPERIMENTS)
    with pytest.raises(ConfigError, match="unknown experiment"):
        run_experiment("nope", {})


def test_mfh_equal_label_weights_follow_the_sum_of_decisive_features():
    d, width = 5, 20
    teacher, student, y = GENERATORS["mfh"](n_samples=500, n_features=width, n_classes=2, gamma=0.0, seed=2,
                                            n_decisive=d, n_extra=3, label_weights="ones")
    layout = mfh_layout(width, 0.0, 2, n_decisive=d, n_extra=3)
    total = student[:, :d].sum(1) + teacher[:, (layout.teacher_latent >= 0) & ~layout.teacher_general_mask].sum(1)
    assert np.array_equal(y, (total > 0).astype(np.int64))
    with pytest.raises(ConfigError, match="label_weights"):
        GENERATORS["mfh"](n_samples=5, n_features=width, n_classes=3, gamma=0.0, seed=0, label_weights="ones")


SMALL_MLP = {"model": {"arch": "mlp", "hidden": [8]}, "train": {"epochs": 15, "lr": 0.01, "optimizer": "adam"}}
KD = {"method": "kd", "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0}


def test_ntdh_gap_tiny_with_masks():
    cfg = {
        "generator": {"name": "ntdh", "n_features": 6, "n_classes": 3},
        "sweep": {"gamma": [0.0, 0.5, 1.0]}, "split": {"train": 90, "test": 60},
        "nets": {"teacher": SMALL_MLP, "student": SMALL_MLP}, "kd": KD, "seeds": 2, "mask_points": 2,
        "masks": {"ntdh_sample": {"method": "ntdh_mask", "mode": "sample", "base": KD},
                  "ntdh_feature": {"method": "ntdh_mask", "mode": "feature", "base": KD,
                                   "pair_epochs": 10, "n_repeats": 2}},
    }
    result = run_experiment("ntdh_gap", cfg)
    s = result["series"]
    assert s["gamma"] == [0.0, 0.5, 1.0]
    # NTDH's form by default (unbounded), textbook JS (at most ln 2) recorded beside it
    assert result["divergence_form"] == "ntdh"
    assert all(0.0 <= v <= math.log(2) + 1e-6 for v in s["target_div_js"] + s["non_target_div_js"])
    assert (all(v >= 0.0 for v in s["target_div"] + s["non_target_div"])
            and s["non_target_div"] != s["non_target_div_js"])
    masks = result["masks"]
    assert masks["names"] == ["ntdh_feature", "ntdh_sample"]
    assert [p["gamma"] for p in masks["points"]] == [0.5, 1.0]
    # the masks' KD reference is KD trained on the same slices as the sweep's (same seeds here)
    assert masks["series"]["kd_acc"] == pytest.approx(s["kd_acc"][1:], abs=1e-6)
    assert "ntdh_feature_teacher_acc" in masks["series"] and "ntdh_sample_teacher_acc" not in masks["series"]
    for p in masks["points"]:
        assert p["ntdh_sample_acc"]["n"] == 2
        assert p["ntdh_sample_minus_kd"]["values"] == pytest.approx(np.subtract(p["ntdh_sample_acc"]["values"],
                                                                                p["kd_acc"]["values"]).tolist())
    d = result["derived"]
    assert d["non_target_div_growth"]["mean"] == pytest.approx(s["non_target_div"][-1] - s["non_target_div"][0])
    assert d["non_target_div_growth"]["n"] == 2  # per seed: the claims pair it with target_div_growth
    assert d["large_gap"]["ntdh_sample_acc"] == masks["series"]["ntdh_sample_acc"]


def test_mfh_algorithm1_tiny_recovers_channels_and_trains_mg_teacher():
    cfg = tiny_mfh({"n_decisive": [3]})
    cfg["generator"] = {"n_features": 10, "student_features": 10, "n_classes": 2, "gamma": 0.0, "n_extra": 2,
                        "label_weights": "ones"}
    cfg["algorithm1"] = {"n_repeats": 2, "pair_epochs": 20, "pair_lr": 0.01, "distance": "mse"}
    result = run_experiment("mfh_alg1", cfg)
    p = result["points"][0]
    assert p["n_general"] == 3
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in p["recovered_fraction"]["values"])
    for m in ("teacher_acc", "mg_teacher_acc", "kd_acc", "mgkd_acc", "nokd_acc"):
        assert all(0.0 <= v <= 1.0 for v in p[m]["values"])
    assert p["mgkd_minus_kd"]["values"] == pytest.approx(np.subtract(p["mgkd_acc"]["values"],
                                                                     p["kd_acc"]["values"]).tolist())
    assert result["derived"]["recovered_fraction_mean"] == pytest.approx(p["recovered_fraction"]["mean"])


def test_algorithm1_receives_each_slice_and_true_channels_are_scored():
    """With an oracle standing in for Algorithm 1, the recovered fraction is exactly 1, and with
    an adversary that picks only noise channels it is exactly 0."""
    cfg = tiny_mfh({"n_decisive": [3]})
    cfg["generator"] = {"n_features": 10, "student_features": 10, "n_classes": 2, "gamma": 0.0, "n_extra": 2}
    cfg["algorithm1"] = {"pair_epochs": 2}
    seen = []

    def oracle(teacher, student, x_t, x_s, y, k, **_):
        # the true general channels are the teacher channels equal to a student decisive column
        same = [i for i in range(x_t.shape[1]) if any(torch.equal(x_t[:, i], x_s[:, j]) for j in range(x_s.shape[1]))]
        seen.append(len(y))
        return np.asarray(same[:k]), np.zeros(x_t.shape[1])

    def adversary(teacher, student, x_t, x_s, y, k, **_):
        same = {i for i in range(x_t.shape[1]) if any(torch.equal(x_t[:, i], x_s[:, j]) for j in range(x_s.shape[1]))}
        return np.asarray([i for i in range(x_t.shape[1]) if i not in same][:k]), np.zeros(x_t.shape[1])

    from cmkd.experiments.analysis import mfh_algorithm1_sweep
    good = mfh_algorithm1_sweep(cfg, algorithm1=oracle)
    assert good["points"][0]["recovered_fraction"]["values"] == [1.0, 1.0]
    assert seen == [60, 60]  # the training split of each seed
    bad = mfh_algorithm1_sweep(cfg, algorithm1=adversary)
    assert bad["points"][0]["recovered_fraction"]["values"] == [0.0, 0.0]


def test_digits_noise_tiny():
    cfg = {"data": {"image_size": 8, "blend": 0.5, "split": [0.6, 0.2, 0.2]}, "noise_std": [0.0, 1.0],
           "nets": {"teacher": SMALL_MLP, "student": SMALL_MLP}, "kd": KD, "seeds": 1}
    result = run_experiment("digits_noise", cfg)
    assert result["series"]["noise_std"] == [0.0, 1.0]
    assert len(result["points"]) == 2 and result["points"][0]["kd_acc"]["n"] == 1


@pytest.mark.parametrize("mode", ["sample", "sample_drop", "feature", "both"])
def test_batched_ntdh_masks_train_each_slice_exactly_as_alone(mode):
    """A slice of `fit_mask_slices` equals the `ntdh_mask` method trained on that slice alone;
    for the feature mask, alone = Algorithm 1 with NTDH's distance on a fresh pair, a teacher
    trained on the kept channels, then the base KD (PSSM too with `both`) from it."""
    from cmkd.config import TEACHER_RUN
    from cmkd.experiments.analysis import fit_mask_slices, fit_slices
    from cmkd.methods.mfh import algorithm1

    n, s, d, c = 48, 3, 6, 4
    torch.manual_seed(3)
    data = Slices(torch.randn(n, s, d), torch.randn(n, s, d), torch.randint(0, c, (n, s, 1)))
    net = {"model": {"arch": "mlp", "hidden": [8]}, "train": {"epochs": 12, "lr": 0.02, "optimizer": "adam"}}
    nets = {"teacher": net, "student": net}
    seeds = [5, 6, 7]
    teacher = fit_slices(TEACHER_RUN, net, data, seeds, c)
    base = {"method": "kd", "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 2.0}
    run = {"method": "ntdh_mask", "mode": mode, "base": base, "keep_ratio": 0.5, "pair_epochs": 6,
           "pair_lr": 0.05, "n_repeats": 2}
    if mode == "sample":
        run["cos_threshold"] = 0.2  # low enough that some teacher-wrong rows get a fractional weight
    if mode == "sample_drop":
        run["drop_ratio"] = 0.25
    batched, feature, mechanism = fit_mask_slices(run, nets, data.with_teacher(teacher), seeds, c, teacher)
    assert (feature is None) == (mode in ("sample", "sample_drop"))
    # the mask's activity over every slice: 3 of 6 channels removed; rows seen = epochs x rows x slices
    names = {"sample": ["PSSM sample mask"], "sample_drop": ["sample_drop mask"],
             "feature": ["NTDH feature mask"], "both": ["NTDH feature mask", "PSSM sample mask"]}[mode]
    assert mechanism["name"] == " + ".join(names)
    if mode == "feature":
        assert mechanism["active_share"] == 0.5 and not mechanism["inert"]

    i = 2
    x_t, x_s, y = data.slice(i)
    kd_teacher, alone_run = teacher.unstack(i), run
    if feature is not None:
        torch.manual_seed(seeds[i])
        pair_t, pair_s = build_model(net["model"], (d,), c), build_model(net["model"], (d,), c)
        channels, _ = algorithm1(pair_t, pair_s, x_t, x_s, y, 3, n_repeats=2, pair_epochs=6, pair_lr=0.05,
                                 distance="ntdh",
                                 generator=torch.Generator().manual_seed(seeds[i]))
        assert feature[1][i].tolist() == channels.tolist()
        torch.manual_seed(seeds[i])
        kd_teacher = build_model(net["model"], (3,), c)
        x_t = x_t[:, channels]
        train_batched(build_distiller(TEACHER_RUN, kd_teacher, None, c),
                      {"teacher_input": x_t, "student_input": x_s, "target": y},
                      1, seed=seeds[0], **net["train"])
        kd_teacher.eval()
        alone_run = {**run, "mode": "sample"} if mode == "both" else base
    torch.manual_seed(seeds[i])
    alone = build_model(net["model"], (d,), c)
    distiller = build_distiller(alone_run, alone, kd_teacher, c)
    train_batched(distiller, {"teacher_input": x_t, "student_input": x_s, "target": y}, 1,
                  seed=seeds[0], **net["train"])
    with torch.no_grad():
        assert torch.allclose(batched(data.student)[:, :, i, 0], alone(x_s), atol=1e-4)


def test_ntdh_gap_records_whether_each_mask_did_anything():
    """The large-gap mask claims read `masks.mechanism.<mask>`: PSSM weighs a row other than 1
    only where the teacher is wrong, so with a teacher right on every row the mask is inert and
    its record says so; a run without a mask has no record."""
    from cmkd.config import TEACHER_RUN
    from cmkd.experiments.analysis import fit_mask_slices, fit_slices
    from cmkd.training.activity import INERT_BELOW

    n, s, d, c = 64, 2, 5, 3
    torch.manual_seed(0)
    y = torch.randint(0, c, (n, s, 1))
    x_t = torch.nn.functional.one_hot(y[..., 0], c).float().repeat(1, 1, 2)[..., :d] * 5  # the label, plainly
    data = Slices(x_t, torch.randn(n, s, d), y)
    net = {"model": {"arch": "mlp", "hidden": [8]}, "train": {"epochs": 30, "lr": 0.05, "optimizer": "adam"}}
    teacher = fit_slices(TEACHER_RUN, net, data, [1, 2], c)
    base = {"method": "kd", "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0}
    run = {"method": "ntdh_mask", "mode": "sample", "base": base, "cos_threshold": 0.996}
    _, _, mechanism = fit_mask_slices(run, {"teacher": net, "student": net}, data.with_teacher(teacher), [1, 2], c,
                                      teacher)
    # a teacher right on every row: PSSM weighs every row 1, so the mask is inert and says so
    assert mechanism["active_share"] < INERT_BELOW and mechanism["inert"]
    assert "PSSM sample mask reweighted (weight != 1) 0 of" in mechanism["reason"]
    _, _, plain = fit_mask_slices(base, {"teacher": net, "student": net}, data.with_teacher(teacher), [1, 2], c,
                                  teacher)
    assert plain is None


def test_pssm_in_the_batched_layout_weights_each_slice_as_alone():
    """PSSM's KD term over stacked slices = the mean over slices of each slice's
    sum(w * KD) / N (NTDH's normalisation), so `train_batched`'s x S gives each slice its own loss."""
    from cmkd.experiments.analysis import PerSliceWeights
    from cmkd.losses import kd_rows, pssm_weights

    g = torch.Generator().manual_seed(1)
    n, c, s = 20, 4, 3
    zs, zt = torch.randn(n, c, s, 1, generator=g), torch.randn(n, c, s, 1, generator=g)
    zs[:, :, 1] = zt[:, :, 1] * 2  # slice 1: aligned, teacher-wrong rows keep ~1
    y = torch.randint(0, c, (n, s, 1), generator=g)
    y[:3, 0] = -1
    d = build_distiller({"method": "ntdh_mask", "base": {"method": "kd", "temperature": 1.0}}, nn.Identity(),
                        nn.Identity(), c)
    d.inner.sample_weight_hook = PerSliceWeights(d.inner.sample_weight_hook)
    got = float(d({"student_input": zs, "teacher_input": zt, "target": y})["kd"])
    per_slice = []
    for i in range(s):
        w = pssm_weights(zs[:, :, i], zt[:, :, i], y[:, i, 0])
        per_slice.append(float((kd_rows(zs[:, :, i], zt[:, :, i], 1.0) * w).sum() / (y[:, i, 0] >= 0).sum()))
    # the weighted mean over all valid rows: slices weigh by their valid rows (17, 20, 20 here)
    valid = torch.tensor([float((y[:, i, 0] >= 0).sum()) for i in range(s)])
    assert got == pytest.approx(float((torch.tensor(per_slice) * valid).sum() / valid.sum()), rel=1e-6)


def test_batched_pair_training_equals_algorithm1_step1_alone():
    from cmkd.experiments.analysis import train_pair_slices
    from cmkd.methods.mfh import train_modality_pair

    n, s, d, c = 40, 3, 7, 2
    torch.manual_seed(4)
    data = Slices(torch.randn(n, s, d), torch.randn(n, s, d + 2), torch.randint(0, c, (n, s, 1)))
    nets = {"teacher": {"model": {"arch": "mlp", "hidden": []}}, "student": {"model": {"arch": "mlp", "hidden": [5]}}}
    seeds = [21, 22, 23]
    pair_t, pair_s = train_pair_slices(nets, data, seeds, c, pair_epochs=25, pair_lr=0.05)
    i = 1
    x_t, x_s, y = data.slice(i)
    torch.manual_seed(seeds[i])
    t_alone, s_alone = (build_model(nets["teacher"]["model"], (d,), c),
                        build_model(nets["student"]["model"], (d + 2,), c))
    train_modality_pair(t_alone, s_alone, x_t, x_s, y, epochs=25, lr=0.05)
    with torch.no_grad():
        assert torch.allclose(pair_t.unstack(i)(x_t), t_alone(x_t), atol=1e-5)
        assert torch.allclose(pair_s.unstack(i)(x_s), s_alone(x_s), atol=1e-5)


def test_per_slice_sample_mask_in_one_pass_equals_the_slice_loop():
    """The NTDH sample mask ranks every slice's rows apart: the one-pass path and the
    slice-by-slice loop give the same weights (with ignored rows and wrong-teacher drops)."""
    from cmkd.experiments.analysis import PerSliceWeights
    from cmkd.methods.ntdh import NonTargetSampleMask

    g = torch.Generator().manual_seed(0)
    n, c, s = 16, 5, 7
    student = torch.randn(n, c, s, 1, generator=g)
    teacher = torch.randn(n, c, s, 1, generator=g) * 2
    target = torch.randint(0, c, (n, s, 1), generator=g)
    target[torch.rand(n, s, 1, generator=g) < 0.2] = -1
    for drop_ratio, drop_wrong, down in ((0.25, True, 0.0), (0.5, False, 0.3), (0.0, True, 0.0)):
        hook = NonTargetSampleMask(drop_ratio, drop_wrong, down)
        fast = PerSliceWeights(hook)({"target": target}, student, teacher)
        slow = PerSliceWeights(lambda b, zs, zt: hook(b, zs, zt))({"target": target}, student, teacher)
        assert torch.equal(fast, slow)
        # each slice on its own drops floor(ratio * its valid rows) by divergence
        for i in range(s):
            alone = hook.dropped(student[:, :, i:i + 1], teacher[:, :, i:i + 1], target[:, i:i + 1])
            assert torch.equal(hook.dropped_per_column(student, teacher, target)[:, i:i + 1], alone)


def test_band_ratio_bootstrap_against_a_plain_loop():
    from cmkd.experiments.analysis import band_ratio_bootstrap

    rng = np.random.default_rng(3)
    gain = rng.normal(0.0, 0.01, size=(4, 6))
    teacher = np.linspace(0.5, 0.9, 4)[:, None] + rng.normal(0.0, 0.02, size=(4, 6))
    out = band_ratio_bootstrap(gain, teacher, n_boot=300, seed=1)
    g, t = gain.mean(axis=1), teacher.mean(axis=1)
    assert out["mean"] == pytest.approx((g.max() - g.min()) / (t[-1] - t[0]))
    idx = np.random.default_rng(1).integers(0, 6, size=(300, 6))
    ref = []
    for row in idx:  # the same resamples, one at a time
        gb, tb = gain[:, row].mean(axis=1), teacher[:, row].mean(axis=1)
        ref.append((gb.max() - gb.min()) / (tb[-1] - tb[0]))
    assert out["sem"] == pytest.approx(np.std(ref, ddof=1))
    assert out["n"] == 6
