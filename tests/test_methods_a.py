"""DKD, CTKD, MLKD and the NTDH masks: hand-computed values and end-to-end forward/backward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cmkd.errors import ConfigError
from cmkd.losses import dkd_loss, kd_loss
from cmkd.methods import build_distiller, get_method
from cmkd.methods.ctkd import GlobalTemperature, cosine_ramp, gradient_reversal
from cmkd.methods.dkd import linear_warmup
from cmkd.methods.mlkd import strong_augment, teacher_confidence_mask
from cmkd.methods.ntdh import MaskedTeacher, NonTargetSampleMask, permutation_saliency
from cmkd.models import build_model

C = 4


class TinySeg(nn.Module):
    """features -> [N, F, H, W], head = 1x1 conv: the model contract for segmentation."""

    def __init__(self, in_ch: int, num_classes: int, width: int = 6):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU())
        self.feature_dim = width
        self.head = nn.Conv2d(width, num_classes, 1)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def np_js(p, q):
    m = (p + q) / 2
    return 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)


# ---------------------------------------------------------------- fixtures: tiny tasks


def classification_setup(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    student = build_model({"arch": "mlp", "hidden": [16]}, (5,), C)
    teacher = build_model({"arch": "mlp", "hidden": [16]}, (7,), C)
    target = torch.randint(0, C, (n,), generator=g)
    target[1] = -1
    batch = {"student_input": torch.randn(n, 5, generator=g), "teacher_input": torch.randn(n, 7, generator=g), "target": target}
    return student, teacher, batch


def segmentation_setup(seed=0, n=3, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    student, teacher = TinySeg(2, C), TinySeg(3, C)
    target = torch.randint(0, C, (n, h, w), generator=g)
    target[0, :2] = -1
    target[2, 3, 4] = -1
    batch = {"student_input": torch.randn(n, 2, h, w, generator=g), "teacher_input": torch.randn(n, 3, h, w, generator=g), "target": target}
    return student, teacher, batch


def image_classification_setup(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    student = build_model({"arch": "small_cnn", "width": 4}, (2, 8, 8), C)
    teacher = build_model({"arch": "small_cnn", "width": 4}, (3, 8, 8), C)
    batch = {"student_input": torch.randn(n, 2, 8, 8, generator=g), "teacher_input": torch.randn(n, 3, 8, 8, generator=g),
             "target": torch.randint(0, C, (n,), generator=g)}
    return student, teacher, batch


RUNS = [
    {"method": "dkd"},
    {"method": "dkd", "lskd": True, "temperature": 2.0},
    {"method": "ctkd"},
    {"method": "ctkd", "lskd": True},
    {"method": "mlkd", "confidence_threshold": 0.0},
    {"method": "mlkd", "lskd": True, "strong_aug": True, "confidence_threshold": 0.0},
    *[{"method": "ntdh_mask", "base": {"method": m}, "mode": mode, "drop_ratio": 0.25, "saliency_batch_size": 4}
      for m in ("kd", "dkd", "mlkd", "ctkd") for mode in ("sample", "feature", "both")],
]


def run_id(cfg):
    base = cfg.get("base", {}).get("method", "")
    return "-".join(str(x) for x in (cfg["method"], base, cfg.get("mode", ""), "lskd" if cfg.get("lskd") else "") if x)


@pytest.mark.parametrize("setup", [classification_setup, segmentation_setup], ids=["cls", "seg"])
@pytest.mark.parametrize("run_cfg", RUNS, ids=run_id)
def test_forward_backward_reaches_student_not_teacher(setup, run_cfg):
    torch.manual_seed(0)
    student, teacher, batch = setup()
    cfg = dict(run_cfg)
    cls = get_method(cfg["method"])
    cls.validate({k: v for k, v in cfg.items() if k != "method"}, "runs.test")
    distiller = build_distiller(cfg, student, teacher, C)
    distiller.train()
    distiller.on_epoch_start(2, 10)  # past epoch 0, so warm-ups and ramps are non-zero
    losses = distiller(batch)
    assert losses and all(isinstance(k, str) for k in losses)
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    total = sum(losses.values())
    total.backward()
    student_grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in student_grads)
    assert sum(float(g.abs().sum()) for g in student_grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training is False  # frozen teacher stays in eval mode


def test_mlkd_strong_view_on_images_runs_and_changes_input():
    torch.manual_seed(0)
    student, teacher, batch = image_classification_setup()
    d = build_distiller({"method": "mlkd", "strong_aug": True, "confidence_threshold": 0.0}, student, teacher, C)
    losses = d(batch)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    x = batch["student_input"]
    strong = strong_augment(x, noise_std=0.0, erase=True)
    erased = (strong != x).flatten(1).any(1)
    assert erased.all() and strong.shape == x.shape  # every image has one erased rectangle
    same = strong == x
    assert same.flatten(1).float().mean(1).min() > 0.5  # at most a third of each image erased (+ rounding)


# ---------------------------------------------------------------- DKD


def test_linear_warmup_values():
    assert linear_warmup(0, 5) == pytest.approx(0.2)
    assert linear_warmup(3, 5) == pytest.approx(0.8)
    assert linear_warmup(4, 5) == 1.0 and linear_warmup(30, 5) == 1.0
    assert linear_warmup(0, 0) == 1.0


def test_dkd_method_is_ce_plus_warmed_dkd():
    student, teacher, batch = classification_setup()
    d = build_distiller({"method": "dkd", "warmup_epochs": 4, "alpha": 0.5, "beta": 3.0, "temperature": 2.0}, student, teacher, C)
    d.on_epoch_start(0, 10)
    losses = d(batch)
    with torch.no_grad():
        s, t = student(batch["student_input"]), teacher(batch["teacher_input"])
        want = 0.25 * dkd_loss(s, t, batch["target"], 0.5, 3.0, 2.0)
    assert set(losses) == {"dkd", "ce"}
    assert float(losses["dkd"].detach()) == pytest.approx(float(want), rel=1e-6)


# ---------------------------------------------------------------- CTKD


def test_gradient_reversal_negates_and_scales():
    x = torch.tensor([1.5, -2.0, 0.25], requires_grad=True)
    coef = torch.tensor([3.0, -1.0, 2.0])
    y = gradient_reversal(x, 0.3)
    assert torch.equal(y, x.detach())
    (coef * y).sum().backward()
    assert torch.allclose(x.grad, -0.3 * coef)


def test_cosine_ramp_by_hand():
    # n = epoch + 1; lambda = (1 - cos(pi * min(n / R, 1))) / 2
    assert cosine_ramp(0, 4) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)  # 0.14645
    assert cosine_ramp(1, 4) == pytest.approx(0.5)
    assert cosine_ramp(2, 4) == pytest.approx((1 - math.cos(3 * math.pi / 4)) / 2)  # 0.85355
    assert cosine_ramp(3, 4) == pytest.approx(1.0)
    assert cosine_ramp(50, 4) == pytest.approx(1.0)
    assert cosine_ramp(1, 4, max_value=0.5) == pytest.approx(0.25)
    assert cosine_ramp(0, 0) == 1.0


def test_ctkd_temperature_range_and_init():
    module = GlobalTemperature(4.0)
    assert float(module(0.0).detach()) == pytest.approx(4.0, rel=1e-6)
    for theta, want in ((0.0, 11.0), (60.0, 21.0), (-60.0, 1.0), (1.0, 1 + 20 / (1 + math.exp(-1)))):
        with torch.no_grad():
            module.theta.fill_(theta)
        assert float(module(1.0).detach()) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ConfigError, match="init_temperature"):
        get_method("ctkd").validate({"init_temperature": 21.0}, "runs.x")


def test_ctkd_theta_ascends_student_descends():
    """theta's gradient is -lambda times the gradient of the KD loss; the student's is not reversed."""
    student, teacher, batch = classification_setup()
    d = build_distiller({"method": "ctkd", "ce_weight": 0.0, "ramp_epochs": 4}, student, teacher, C)
    d.on_epoch_start(1, 10)  # lambda = 0.5
    losses = d(batch)
    losses["kd"].backward()
    # the same loss without the reversal layer, by hand
    theta = d.temperature_module.theta.detach().clone().requires_grad_(True)
    tau = 1 + 20 * torch.sigmoid(theta)
    s = student(batch["student_input"])
    t = teacher(batch["teacher_input"])
    plain = kd_loss(s, t, tau, mask=batch["target"] >= 0)
    g_theta, g_student = torch.autograd.grad(plain, [theta, student.head.weight])
    assert float(d.temperature_module.theta.grad) == pytest.approx(-0.5 * float(g_theta), rel=1e-5)
    assert torch.allclose(student.head.weight.grad, g_student, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- MLKD


def test_mlkd_confidence_mask_selects_exactly_confident_rows():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0],    # p_max = 0.9802
                           [0.0, 0.0, 0.0, 0.0],    # 0.25
                           [0.0, 1.0, 0.0, 0.0],    # 0.4753
                           [0.0, 0.0, 2.0, 0.0]])   # 0.7112
    pmax = np_softmax(logits.numpy().astype(np.float64)).max(1)
    for threshold in (0.3, 0.5, 0.75):
        got = teacher_confidence_mask(logits, threshold)
        assert got.tolist() == (pmax >= threshold).tolist()
    assert teacher_confidence_mask(logits, 0.5).tolist() == [True, False, False, True]


def test_mlkd_masked_batch_equals_batch_of_confident_rows():
    """Masking rows out gives exactly the KD terms of the batch made of the kept rows only."""
    torch.manual_seed(0)
    student, teacher, batch = classification_setup(n=10)
    batch["target"][1] = 2  # all valid here
    t_logits = teacher(batch["teacher_input"]).detach()
    t_logits[[0, 3, 4, 8]] *= 25.0  # these become confident
    batch["teacher_logits"] = t_logits
    threshold = 0.9
    conf = teacher_confidence_mask(t_logits, threshold)
    assert 0 < int(conf.sum()) < 10
    d = build_distiller({"method": "mlkd", "confidence_threshold": threshold}, student, teacher, C)
    full = d(batch)
    sub = {k: v[conf] for k, v in batch.items()}
    d_all = build_distiller({"method": "mlkd", "confidence_threshold": 0.0}, student, teacher, C)
    kept = d_all(sub)
    for name in ("kd_instance", "kd_batch", "kd_class"):
        assert float(full[name].detach()) == pytest.approx(float(kept[name].detach()), rel=1e-5), name
    # and the instance term by hand in NumPy: sum over T of T^2 * mean KL over confident rows
    s = student(sub["student_input"]).detach().double().numpy()
    t = sub["teacher_logits"].double().numpy()
    temps = (2.0, 3.0, 4.0, 5.0, 6.0)
    want = sum(T * T * np_kl(np_softmax(t / T), np_softmax(s / T)).mean() for T in temps)
    assert float(full["kd_instance"].detach()) == pytest.approx(want, rel=1e-5)
    # batch level ||P_s P_s^T - P_t P_t^T||^2 / n and class level ||P_s^T P_s - P_t^T P_t||^2 / C, summed over T
    n = len(s)
    want_batch = sum(((np_softmax(s / T) @ np_softmax(s / T).T - np_softmax(t / T) @ np_softmax(t / T).T) ** 2).sum() / n
                     for T in temps)
    want_class = sum(((np_softmax(s / T).T @ np_softmax(s / T) - np_softmax(t / T).T @ np_softmax(t / T)) ** 2).sum() / C
                     for T in temps)
    assert float(full["kd_batch"].detach()) == pytest.approx(want_batch, rel=1e-4)
    assert float(full["kd_class"].detach()) == pytest.approx(want_class, rel=1e-4)


def test_mlkd_no_confident_rows_gives_zero_kd():
    student, teacher, batch = classification_setup()
    d = build_distiller({"method": "mlkd", "confidence_threshold": 1.0}, student, teacher, C)
    batch["teacher_logits"] = torch.zeros(12, C)
    losses = d(batch)
    assert all(float(losses[k].detach()) == 0.0 for k in ("kd_instance", "kd_batch", "kd_class"))


# ---------------------------------------------------------------- NTDH sample mask


def hand_made_batch():
    """6 samples, 4 classes. Student = teacher except rows 1 (small) and 3 (large) non-target
    differences; the teacher is wrong on row 5; row 4 is ignored (and diverges most)."""
    teacher = np.array([[4.0, 1.0, 0.0, -1.0],
                        [0.0, 3.0, 1.0, 0.5],
                        [1.0, 0.0, 5.0, 0.0],
                        [0.0, 0.0, 0.0, 4.0],
                        [3.0, 0.0, 0.0, 0.0],
                        [2.0, 0.0, 0.0, 1.0]])
    student = teacher.copy()
    student[1] = [0.5, 3.0, 1.0, 0.0]     # small non-target change
    student[3] = [3.0, -2.0, 0.0, 4.0]    # large non-target change
    student[4] = [-5.0, 0.0, 0.0, 9.0]
    target = np.array([0, 1, 2, 3, -1, 3])  # teacher predicts 0 for row 5: wrong
    return torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32), torch.tensor(target)


def test_ntdh_sample_mask_drops_expected_rows():
    s, t, y = hand_made_batch()
    # independent NTD: JS of softmax over np.delete(row, target)
    ntd = [np_js(np_softmax(np.delete(t.numpy()[i], y[i]).astype(np.float64)),
                 np_softmax(np.delete(s.numpy()[i], y[i]).astype(np.float64))) if y[i] >= 0 else -np.inf for i in range(6)]
    valid_order = np.argsort(ntd)[::-1]
    assert list(valid_order[:2]) == [3, 1]  # the construction works as intended
    mask = NonTargetSampleMask(drop_ratio=0.4)  # floor(0.4 * 5 valid) = 2 rows + the teacher-wrong row
    assert mask.dropped(s, t, y).tolist() == [False, True, False, True, False, True]
    weights = mask({"target": y}, s, t)
    assert weights.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert NonTargetSampleMask(0.2, drop_wrong=False).dropped(s, t, y).tolist() == [False, False, False, True, False, False]
    soft = NonTargetSampleMask(0.4, down_weight=0.25)({"target": y}, s, t)
    assert soft.tolist() == [1.0, 0.25, 1.0, 0.25, 1.0, 0.25]


def test_ntdh_sample_mask_segmentation_counts_valid_pixels():
    s, t, y = hand_made_batch()
    # the same 6 rows as one 2x3 image: [1, C, 2, 3]
    seg = lambda z: z.T.reshape(1, C, 2, 3)
    dropped = NonTargetSampleMask(0.4).dropped(seg(s), seg(t), y.reshape(1, 2, 3))
    assert dropped.reshape(-1).tolist() == [False, True, False, True, False, True]


def test_ntdh_wrapping_kd_equals_kd_on_kept_rows():
    s, t, y = hand_made_batch()

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(()))
            self.logits = logits

        def forward(self, x):
            return self.logits + self.bias

    student = Fixed(s)
    d = build_distiller({"method": "ntdh_mask", "base": {"method": "kd", "temperature": 2.0}, "drop_ratio": 0.4}, student, Fixed(t), C)
    batch = {"student_input": torch.zeros(6, 1), "teacher_input": torch.zeros(6, 1), "target": y}
    got = d(batch)["kd"]
    keep = torch.tensor([0, 2])
    assert float(got.detach()) == pytest.approx(float(kd_loss(s[keep], t[keep], 2.0)), rel=1e-6)


# ---------------------------------------------------------------- NTDH feature mask


class ToyTeacher(nn.Module):
    """features = the input's 8 channels; the head reads channel 5 strongly, the rest weakly."""

    def __init__(self, seg: bool = False):
        super().__init__()
        self.feature_dim = 8
        self.head = nn.Conv2d(8, 3, 1) if seg else nn.Linear(8, 3)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            w = 0.05 * torch.randn(3, 8, generator=g)
            w[:, 5] = torch.tensor([4.0, -4.0, 0.0])
            self.head.weight.copy_(w.view_as(self.head.weight))
            self.head.bias.zero_()

    def features(self, x):
        return x

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("seg", [False, True], ids=["cls", "seg"])
def test_permutation_saliency_ranks_planted_channel_first(seg):
    g = torch.Generator().manual_seed(0)
    teacher = ToyTeacher(seg)
    x = torch.randn(300, 8, 2, 2, generator=g) if seg else torch.randn(300, 8, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    if seg:
        y[:10, 0, 0] = -1
    saliency = permutation_saliency(teacher, x, y, batch_size=64, generator=torch.Generator().manual_seed(1))
    assert saliency.shape == (8,)
    assert int(saliency.argmax()) == 5
    assert float(saliency[5]) > 10 * float(saliency[torch.arange(8) != 5].abs().max())


def test_feature_mask_keeps_salient_channels_and_ignores_cached_logits():
    g = torch.Generator().manual_seed(0)
    teacher = ToyTeacher()
    x = torch.randn(200, 8, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    student = build_model({"arch": "mlp", "hidden": [8]}, (8,), 3)
    d = build_distiller({"method": "ntdh_mask", "base": {"method": "kd"}, "mode": "feature", "keep_ratio": 0.25}, student, teacher, 3)
    assert d.uses_teacher_logits_only is False
    assert get_method("ntdh_mask").cfg_uses_teacher_logits_only({"mode": "feature"}) is False
    assert get_method("ntdh_mask").cfg_uses_teacher_logits_only({"mode": "sample"}) is True

    class Split:  # the SplitData interface the engine passes
        def batches(self, batch_size, shuffle=False, seed=0):
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
            for i in range(0, len(y), batch_size):
                yield {"teacher_input": x[order[i:i + batch_size]], "target": y[order[i:i + batch_size]]}

    d.on_train_start(Split())
    mask = d.masked_teacher.channel_mask
    assert int(mask.sum()) == 2 and float(mask[5]) == 1.0
    with torch.no_grad():
        assert torch.allclose(d.masked_teacher(x[:4]), teacher.head(x[:4] * mask))
    batch = {"student_input": x[:16], "teacher_input": x[:16], "target": y[:16]}
    clean = d(batch)["kd"]
    poisoned = d({**batch, "teacher_logits": torch.full((16, 3), 100.0)})["kd"]
    assert float(clean.detach()) == pytest.approx(float(poisoned.detach()))
    capped = build_distiller({"method": "ntdh_mask", "mode": "feature", "saliency_samples": 150, "saliency_batch_size": 64},
                             build_model({"arch": "mlp", "hidden": [8]}, (8,), 3), ToyTeacher(), 3)
    assert [len(b[1]) for b in capped._first_rows(Split())] == [64, 64, 22]
    # without on_train_start the first batch estimates the mask (with a warning)
    lazy = build_distiller({"method": "ntdh_mask", "mode": "feature", "keep_ratio": 0.125},
                           build_model({"arch": "mlp", "hidden": [8]}, (8,), 3), ToyTeacher(), 3)
    lazy({"student_input": x[:100], "teacher_input": x[:100], "target": y[:100]})
    assert bool(lazy.masked_teacher.fitted) and lazy.masked_teacher.channel_mask.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    # a checkpoint restores the mask and does not re-estimate it
    fresh = build_distiller({"method": "ntdh_mask", "base": {"method": "kd"}, "mode": "feature", "keep_ratio": 0.25},
                            build_model({"arch": "mlp", "hidden": [8]}, (8,), 3), ToyTeacher(), 3)
    fresh.load_state_dict(d.state_dict())
    assert bool(fresh.masked_teacher.fitted) and torch.equal(fresh.masked_teacher.channel_mask, mask)


def test_masked_teacher_needs_feature_dim():
    with pytest.raises(ValueError, match="feature"):
        MaskedTeacher(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("cfg, key", [
    ({"method": "dkd", "beta": -1}, "runs.r.beta"),
    ({"method": "dkd", "gamma": 1}, "runs.r.gamma"),
    ({"method": "mlkd", "temperatures": []}, "runs.r.temperatures"),
    ({"method": "mlkd", "confidence_threshold": 2}, "runs.r.confidence_threshold"),
    ({"method": "ctkd", "ramp_epochs": -1}, "runs.r.ramp_epochs"),
    ({"method": "ntdh_mask", "base": {"method": "supervised"}}, "runs.r.base.method"),
    ({"method": "ntdh_mask", "base": {"method": "kd", "temperature": -1}}, "runs.r.base.temperature"),
    ({"method": "ntdh_mask", "mode": "pixels"}, "runs.r.mode"),
    ({"method": "ntdh_mask", "drop_ratio": 1.0}, "runs.r.drop_ratio"),
    ({"method": "ntdh_mask", "keep_ratio": 0.0}, "runs.r.keep_ratio"),
])
def test_bad_config_names_the_key(cfg, key):
    cfg = dict(cfg)
    with pytest.raises(ConfigError) as err:
        get_method(cfg.pop("method")).validate(cfg, "runs.r")
    assert err.value.key == key


def test_params_yaml_runs_build():
    import yaml
    from pathlib import Path

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    names = ["dkd", "dkd_lskd", "ctkd", "ctkd_lskd", "mlkd", "mlkd_lskd", "kdv1_ntdh", "kdv1_ntdh_feat"]
    for name in names:
        cfg = dict(params["runs"][name])
        get_method(cfg["method"]).validate({k: v for k, v in cfg.items() if k != "method"}, f"runs.{name}")
        student, teacher, batch = classification_setup()
        d = build_distiller(cfg, student, teacher, C)
        assert all(torch.isfinite(v) for v in d(batch).values())
    assert params["runs"]["kdv1_ntdh"]["base"] == {k: v for k, v in params["runs"]["kdv1"].items()}


# ---------------------------------------------------------------- through the engine


def test_methods_train_through_engine_fit():
    """A smoke run of cmkd.engine.fit: the optimiser reaches CTKD's theta, the NTDH feature mask
    is estimated, and every run ends with a finite history."""
    from cmkd.engine import SplitData, TrainConfig, fit

    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.randint(0, C, (n,), generator=g)
        t = torch.randn(n, 7, generator=g) + 2 * nn.functional.one_hot(y, 7).float()
        s = torch.randn(n, 5, generator=g) + nn.functional.one_hot(y, 5).float()
        return SplitData.from_arrays(teacher_input=t, student_input=s, target=y)

    train, val = split(96), split(32)
    teacher = build_model({"arch": "mlp", "hidden": [16]}, (7,), C)
    cfg = TrainConfig(epochs=2, batch_size=32, device="cpu")
    for run in ({"method": "ctkd", "ramp_epochs": 1}, {"method": "ntdh_mask", "base": {"method": "dkd"}, "mode": "both"}):
        d = build_distiller(run, build_model({"arch": "mlp", "hidden": [16]}, (5,), C), teacher, C)
        theta0 = float(d.temperature_module.theta.detach()) if run["method"] == "ctkd" else None
        result = fit(d, train, val, cfg, task="classification", num_classes=C, progress=False)
        assert len(result.history) == 2 and all(math.isfinite(v) for h in result.history for v in h.values() if isinstance(v, float))
        if theta0 is not None:
            assert float(d.temperature_module.theta.detach()) != theta0
        else:
            assert bool(d.masked_teacher.fitted) and int(d.masked_teacher.channel_mask.sum()) == 8
