"""The methods' options: MLKD's batch-normalised class term (against NumPy),
CTKD's temperature learning rate (tau moves with it, barely without) and its logged trajectory,
and the synthetic generator's student noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cmkd.errors import ConfigError
from cmkd.methods import build_distiller, get_method
from cmkd.models import build_model

C = 4


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_class_term(zs, zt, temps, batch_norm):
    """MLKD's class level summed over temperatures: ||G_s - G_t||^2 / C, G = P^T P (/ N)."""
    total = 0.0
    for t in temps:
        ps, pt = np_softmax(zs / t), np_softmax(zt / t)
        gs, gt = ps.T @ ps, pt.T @ pt
        if batch_norm:
            gs, gt = gs / len(zs), gt / len(zt)
        total += ((gs - gt) ** 2).sum() / zs.shape[1]
    return total


def _mlkd(class_norm, threshold=0.0):
    cfg = {"method": "mlkd", "class_norm": class_norm, "confidence_threshold": threshold, "strong_aug": False}
    return build_distiller(cfg, nn.Identity(), nn.Identity(), C)  # student(x) = x: the logits are the input


@pytest.mark.parametrize("n", [7, 128])
def test_mlkd_batch_normalised_class_term_matches_numpy(n):
    rng = np.random.default_rng(n)
    zs, zt = rng.normal(size=(n, C)) * 2, rng.normal(size=(n, C)) * 3
    batch = {"student_input": torch.tensor(zs, dtype=torch.float64),
             "teacher_logits": torch.tensor(zt, dtype=torch.float64),
             "target": torch.tensor(rng.integers(0, C, n))}
    temps = [2.0, 3.0, 4.0, 5.0, 6.0]
    got_batch = float(_mlkd("batch")(batch)["kd_class"])
    got_none = float(_mlkd("none")(batch)["kd_class"])
    np.testing.assert_allclose(got_batch, np_class_term(zs, zt, temps, True), rtol=1e-6)  # the row weights are float32
    np.testing.assert_allclose(got_none, np_class_term(zs, zt, temps, False), rtol=1e-6)  # the row weights are float32
    np.testing.assert_allclose(got_none / got_batch,
                               n * n, rtol=1e-6)  # the row weights are float32  # the reference's B^2 growth


def test_mlkd_batch_normalised_class_term_counts_only_selected_rows():
    rng = np.random.default_rng(1)
    n = 40
    zs, zt = rng.normal(size=(n, C)), rng.normal(size=(n, C)) * 3
    threshold = 0.6
    keep = np_softmax(zt).max(axis=1) >= threshold
    assert 0 < keep.sum() < n
    batch = {"student_input": torch.tensor(zs), "teacher_logits": torch.tensor(zt),
             "target": torch.zeros(n, dtype=torch.long)}
    got = float(_mlkd("batch", threshold)(batch)["kd_class"])
    np.testing.assert_allclose(got, np_class_term(zs[keep], zt[keep],
        [2.0, 3.0, 4.0, 5.0, 6.0], True), rtol=1e-6)  # the row weights are float32


def test_mlkd_class_norm_is_validated():
    with pytest.raises(ConfigError, match="runs.r.class_norm"):
        get_method("mlkd").validate({"class_norm": "sum"}, "runs.r")


# ---------------------------------------------------------------------------- CTKD


def _ctkd_fit(temperature_lr, epochs=3):
    from cmkd.training.config import TrainConfig
    from cmkd.training.data import SplitData
    from cmkd.training.loop import fit

    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.randint(0, C, (n,), generator=g)
        t = torch.randn(n, 7, generator=g) + 2 * nn.functional.one_hot(y, 7).float()
        s = torch.randn(n, 5, generator=g) + nn.functional.one_hot(y, 5).float()
        return SplitData.from_arrays(teacher_input=t, student_input=s, target=y)

    torch.manual_seed(0)
    teacher = build_model({"arch": "mlp", "hidden": [16]}, (7,), C)
    student = build_model({"arch": "mlp", "hidden": [16]}, (5,), C)
    cfg = {"method": "ctkd", "init_temperature": 4.0, "ramp_epochs": 0, "temperature_lr": temperature_lr}
    d = build_distiller(cfg, student, teacher, C)
    result = fit(d, split(256), split(64), TrainConfig(epochs=epochs, batch_size=32, lr=1e-3, device="cpu"),
                 task="classification", num_classes=C, progress=False)
    return d, result


def test_ctkd_temperature_moves_with_its_learning_rate_and_not_without():
    slow, slow_result = _ctkd_fit(None)    # theta at the student's lr 1e-3: 24 Adam steps of ~1e-3
    fast, fast_result = _ctkd_fit(0.1)
    slow_moved = abs(slow.temperature - 4.0)
    fast_moved = abs(fast.temperature - 4.0)
    assert slow_moved < 0.2, slow_moved
    assert fast_moved > 2.0, fast_moved
    # theta is the adversary: it raises the KD loss, and here that means a higher tau
    trajectory = [h["train/temperature"] for h in fast_result.history]
    assert len(trajectory) == 3 and trajectory[-1] > trajectory[0] > 4.0
    summary = fast.summary(fast_result.history)
    assert summary["temperature_trajectory"] == trajectory and summary["temperature_final"] == trajectory[-1]


def test_ctkd_param_groups_give_theta_its_own_lr():
    d = build_distiller({"method": "ctkd", "temperature_lr": 0.05}, nn.Linear(3, C), nn.Linear(3, C), C)
    groups = d.param_groups(1e-3)
    theta = d.temperature_module.theta
    assert [p is theta for p in groups[1]["params"]] == [True] and groups[1]["lr"] == 0.05
    assert all(p is not theta for p in groups[0]["params"]) and "lr" not in groups[0]
    n_trainable = sum(1 for p in d.parameters() if p.requires_grad)
    assert len(groups[0]["params"]) + 1 == n_trainable  # the frozen teacher is left out
    default = build_distiller({"method": "ctkd"}, nn.Linear(3, C), nn.Linear(3, C), C).param_groups(2e-3)
    assert default[1]["lr"] == 2e-3


@pytest.mark.parametrize("lr", [0, -1.0, "fast", True])
def test_ctkd_temperature_lr_is_validated(lr):
    with pytest.raises(ConfigError, match="runs.r.temperature_lr"):
        get_method("ctkd").validate({"temperature_lr": lr}, "runs.r")


# ---------------------------------------------------------------------------- synthetic data


def test_student_noise_degrades_only_the_student_modality():
    from cmkd.data.datasets.synthetic import GENERATORS

    gen = GENERATORS["ntdh"]
    t0, s0, y0 = gen(n_samples=500, n_features=8, n_classes=4, gamma=0.5, seed=3)
    t1, s1, y1 = gen(n_samples=500, n_features=8, n_classes=4, gamma=0.5, seed=3, student_noise=0.6)
    np.testing.assert_array_equal(t0, t1)
    np.testing.assert_array_equal(y0, y1)
    ratio = (s1 - s0).std(axis=0) / s0.std(axis=0)
    np.testing.assert_allclose(ratio, 0.6, rtol=0.1)  # noise of 0.6 feature std
    # the shared (modality-general) features are still there under the noise
    k = 4  # round((1 - 0.5) * 8) teacher features copy the student's
    corr = [np.corrcoef(t1[:, j], s1[:, j])[0, 1] for j in range(k)]
    assert min(corr) > 0.8


def test_student_noise_is_validated():
    from cmkd.data.datasets.synthetic import validate

    base = {"generator": "ntdh", "gamma": 0.5, "gammas": [0.5], "split": [0.6, 0.2, 0.2]}
    with pytest.raises(ConfigError, match="generator_params.student_noise"):
        validate({**base, "generator_params": {"student_noise": -1}}, "data.synthetic")
    with pytest.raises(ConfigError, match="generator_params.alpha"):
        validate({**base, "generator_params": {"alpha": 0.5}}, "data.synthetic")
    validate({**base, "generator_params": {"student_noise": 0.6}}, "data.synthetic")
