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
from cmkd.methods.mfh import ChannelMasked, channel_mask
from cmkd.methods.mlkd import strong_augment, teacher_confidence_mask
from cmkd.methods.ntdh import NonTargetSampleMask, PSSMSampleMask
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
    batch = {"student_input": torch.randn(n, 5, generator=g), "teacher_input": torch.randn(n, 7, generator=g),
             "target": target}
    return student, teacher, batch


def segmentation_setup(seed=0, n=3, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    student, teacher = TinySeg(2, C), TinySeg(3, C)
    target = torch.randint(0, C, (n, h, w), generator=g)
    target[0, :2] = -1
    target[2, 3, 4] = -1
    batch = {"student_input": torch.randn(n, 2, h, w, generator=g),
             "teacher_input": torch.randn(n, 3, h, w, generator=g), "target": target}
    return student, teacher, batch


def image_classification_setup(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    student = build_model({"arch": "small_cnn", "width": 4}, (2, 8, 8), C)
    teacher = build_model({"arch": "small_cnn", "width": 4}, (3, 8, 8), C)
    batch = {"student_input": torch.randn(n, 2, 8, 8, generator=g),
             "teacher_input": torch.randn(n, 3, 8, 8, generator=g),
             "target": torch.randint(0, C, (n,), generator=g)}
    return student, teacher, batch


RUNS = [
    {"method": "dkd"},
    {"method": "dkd", "lskd": True, "temperature": 2.0},
    {"method": "ctkd"},
    {"method": "ctkd", "lskd": True},
    {"method": "mlkd", "confidence_threshold": 0.0},
    {"method": "mlkd", "lskd": True, "strong_aug": True, "confidence_threshold": 0.0},
    *[{"method": "ntdh_mask", "base": {"method": m}, "mode": mode, "drop_ratio": 0.25}
      for m in ("kd", "dkd", "mlkd", "ctkd") for mode in ("sample", "sample_drop", "feature", "both")],
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
    if cfg.get("mode") in ("feature", "both"):  # what prepare() installs: a teacher on some of its channels
        distiller.set_teacher(ChannelMasked(teacher, channel_mask([0, 1], batch["teacher_input"].shape[1]), "input"))
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
    d = build_distiller({"method": "dkd", "warmup_epochs": 4, "alpha": 0.5, "beta": 3.0, "temperature": 2.0},
                        student, teacher, C)
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
    want_batch = sum(((np_softmax(s / T) @ np_softmax(s / T).T - np_softmax(t / T) @ np_softmax(t / T).T) ** 2)
                     .sum() / n
                     for T in temps)
    want_class = sum(((np_softmax(s / T).T @ np_softmax(s / T) - np_softmax(t / T).T @ np_softmax(t / T)) ** 2)
                     .sum() / C
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
                 np_softmax(np.delete(s.numpy()[i], y[i]).astype(np.float64))) if y[i] >= 0 else -np.inf
           for i in range(6)]
    valid_order = np.argsort(ntd)[::-1]
    assert list(valid_order[:2]) == [3, 1]  # the construction works as intended
    mask = NonTargetSampleMask(drop_ratio=0.4)  # floor(0.4 * 5 valid) = 2 rows + the teacher-wrong row
    assert mask.dropped(s, t, y).tolist() == [False, True, False, True, False, True]
    weights = mask({"target": y}, s, t)
    assert weights.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert NonTargetSampleMask(0.2, drop_wrong=False).dropped(s, t, y).tolist() == [False, False, False,
                                                                                    True, False, False]
    soft = NonTargetSampleMask(0.4, down_weight=0.25)({"target": y}, s, t)
    assert soft.tolist() == [1.0, 0.25, 1.0, 0.25, 1.0, 0.25]


def test_ntdh_sample_mask_segmentation_counts_valid_pixels():
    s, t, y = hand_made_batch()
    # the same 6 rows as one 2x3 image: [1, C, 2, 3]
    def seg(z):
        return z.T.reshape(1, C, 2, 3)

    dropped = NonTargetSampleMask(0.4).dropped(seg(s), seg(t), y.reshape(1, 2, 3))
    assert dropped.reshape(-1).tolist() == [False, True, False, True, False, True]


class Fixed(nn.Module):
    """A 'network' returning fixed logits (plus a trainable bias, so gradients exist)."""

    def __init__(self, logits):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.logits = logits

    def forward(self, x):
        return self.logits + self.bias


def test_ntdh_sample_drop_variant_equals_kd_on_kept_rows():
    s, t, y = hand_made_batch()
    d = build_distiller({"method": "ntdh_mask", "base": {"method": "kd", "temperature": 2.0}, "mode": "sample_drop",
                         "divergence_form": "js", "drop_ratio": 0.4}, Fixed(s), Fixed(t), C)
    batch = {"student_input": torch.zeros(6, 1), "teacher_input": torch.zeros(6, 1), "target": y}
    got = d(batch)["kd"]
    keep = torch.tensor([0, 2])
    assert float(got.detach()) == pytest.approx(float(kd_loss(s[keep], t[keep], 2.0)), rel=1e-6)


def test_ntdh_pssm_default_weights_kd_as_ntdh_code_and_leaves_ce():
    """mode sample (the default) is PSSM; the KD term is sum(w * KD_i) / valid rows as in NTDH's
    code, CE is the plain mean over valid rows."""
    from cmkd.losses import cross_entropy, kd_rows, pssm_weights

    s, t, y = hand_made_batch()
    s = s.clone()
    s[2] = -t[2]  # teacher right on row 2 (weight 1 regardless of the student)
    s[5] = t[5] * 1.5 + 0.01  # teacher wrong on row 5, student aligned: (1 + cos) / 2
    d = build_distiller({"method": "ntdh_mask", "base": {"method": "kd", "temperature": 2.0, "ce_weight": 1.0}},
                        Fixed(s), Fixed(t), C)
    assert isinstance(d.inner.sample_weight_hook, PSSMSampleMask) and d.cfg["mode"] == "sample"
    batch = {"student_input": torch.zeros(6, 1), "teacher_input": torch.zeros(6, 1), "target": y}
    losses = d(batch)
    w = pssm_weights(s, t, y)
    assert 0.99 < float(w[5]) < 1.0 and float(w[2]) == 1.0 and float(w[4]) == 0.0  # row 4 ignored
    valid = (y >= 0).float()
    expected = float((kd_rows(s, t, 2.0) * w).sum() / valid.sum())
    assert float(losses["kd"].detach()) == pytest.approx(expected, rel=1e-6)
    assert float(losses["ce"].detach()) == pytest.approx(float(cross_entropy(s, y)), rel=1e-6)
    # a teacher-wrong, unaligned row gets no KD at all
    s2 = s.clone()
    s2[5] = -t[5]
    w2 = pssm_weights(s2, t, y)
    assert float(w2[5]) == 0.0
    d2 = build_distiller({"method": "ntdh_mask", "base": {"method": "kd", "temperature": 2.0}}, Fixed(s2), Fixed(t), C)
    assert float(d2(batch)["kd"].detach()) == pytest.approx(
        float((kd_rows(s2, t, 2.0) * w2).sum() / valid.sum()), rel=1e-6)


def test_ntdh_pssm_segmentation_normalises_by_valid_pixels():
    from cmkd.losses import pssm_weights

    s, t, y = hand_made_batch()
    def seg(z):
        return z.T.reshape(1, C, 2, 3)

    ys = y.reshape(1, 2, 3)
    d = build_distiller({"method": "ntdh_mask", "base": {"method": "dkd", "warmup_epochs": 0, "ce_weight": 0.0}},
                        Fixed(seg(s)), Fixed(seg(t)), C)
    d.on_epoch_start(1, 2)
    got = float(d({"student_input": torch.zeros(1, 1),
                   "teacher_input": torch.zeros(1, 1), "target": ys})["dkd"].detach())
    from cmkd.losses import dkd_loss
    w = pssm_weights(seg(s), seg(t), ys)
    # dkd_loss with weights divides by sum(w); NTDH divides by the 5 valid pixels
    expected = float(dkd_loss(seg(s), seg(t), ys, 1.0, 8.0, 4.0, mask=w)) * float(w.sum()) / 5
    assert got == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- NTDH feature mask


def _shared_channel_split(n, g):
    """Teacher input: 8 channels, 0-3 the student's too (decisive), 4-7 noise."""
    from cmkd.training.data import SplitData

    z = torch.randn(n, 4, generator=g)
    y = (z @ torch.tensor([[1.0, 0, -1], [0, 1.0, -1], [1.0, -1, 0], [0, 1.0, 1]])).argmax(1)
    x_t = torch.cat([z, torch.randn(n, 4, generator=g)], 1)
    x_s = torch.cat([z, torch.randn(n, 2, generator=g)], 1)
    return SplitData.from_arrays(teacher_input=x_t, student_input=x_s, target=y)


def test_ntdh_feature_mask_is_algorithm1_with_ntdh_distance_and_a_retrained_teacher():
    from cmkd.training.config import TrainConfig

    g = torch.Generator().manual_seed(0)
    train, val = _shared_channel_split(400, g), _shared_channel_split(200, g)
    torch.manual_seed(0)
    teacher = build_model({"arch": "mlp", "hidden": [16]}, (8,), 3)
    student = build_model({"arch": "mlp", "hidden": [16]}, (6,), 3)
    run = {"method": "ntdh_mask", "base": {"method": "kd", "temperature": 1.0}, "mode": "feature", "keep_ratio": 0.5,
           "pair_epochs": 15, "pair_lr": 0.05, "pair_batch_size": 50, "n_repeats": 3}
    d = build_distiller(run, student, teacher, 3)
    assert d.needs_teacher is False and d.uses_teacher_logits_only is False
    assert get_method("ntdh_mask").cfg_uses_teacher_logits_only({"mode": "feature"}) is False
    assert get_method("ntdh_mask").cfg_uses_teacher_logits_only({"mode": "sample"}) is True
    with pytest.raises(RuntimeError, match="prepare"):
        d({"student_input": torch.zeros(2, 6), "teacher_input": torch.zeros(2, 8),
           "target": torch.zeros(2, dtype=torch.long)})
    selection = d.prepare(train, val, TrainConfig(epochs=15, batch_size=50, lr=0.01, device="cpu", seed=0),
                          task="classification", num_classes=3, progress=False)
    assert selection["level"] == "input" and selection["distance"] == "ntdh"
    assert sorted(selection["channels"]) == [0, 1, 2, 3]  # the modality-general ones
    new_teacher = d.inner.teacher
    assert isinstance(new_teacher, ChannelMasked) and new_teacher is d.teacher and new_teacher.model is not teacher
    assert new_teacher.mask.tolist() == [True] * 4 + [False] * 4
    assert selection["teacher_val"]["accuracy"] > 0.6  # retrained, not just masked
    assert all(not p.requires_grad for p in new_teacher.parameters())
    # the retrained teacher's logits are used, never cached ones
    x = next(iter(val.batches(16)))
    clean = d(x)["kd"]
    poisoned = d({**x, "teacher_logits": torch.full((16, 3), 100.0)})["kd"]
    assert float(clean.detach()) == pytest.approx(float(poisoned.detach()))
    # the sample masks have nothing to prepare
    assert build_distiller({"method": "ntdh_mask"}, student, teacher, 3).prepare(train, val, None,
        task="classification", num_classes=3) is None


def test_ntdh_feature_mask_rules_follow_ntdh_code_per_kind_of_data():
    from cmkd.methods.ntdh import NTDHMask, feature_mask_rules

    cfg = dict(NTDHMask.defaults)
    # vectors: NTDH's sklearn code keeps --mask_dim (2) features, tagged by permutation, teacher retrained
    assert feature_mask_rules(cfg, True, 32) == (2, "permute", True)
    # images: NTDH's MNIST code removes --ratio 0.75 (a quarter kept), tagged by zeroing, not retrained
    assert feature_mask_rules(cfg, False, 32) == (8, "zero", False)
    # the variant kdv1_ntdh_feat_retrain: half, permutation, retrained, on both
    variant = {**cfg, "keep_ratio": 0.5, "saliency": "permute", "retrain": True}
    assert feature_mask_rules(variant, True, 32) == (16, "permute", True)
    assert feature_mask_rules(variant, False, 32) == (16, "permute", True)
    assert feature_mask_rules({**cfg, "mask_dim": 50}, True, 32)[0] == 32  # never more than there are


def test_zeroing_saliency_matches_a_channel_by_channel_reference():
    from cmkd.methods.mfh import pair_distance, zeroing_saliency

    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    feats, reference = torch.randn(10, 6), torch.randn(10, 4)
    labels = torch.randint(0, 4, (10,))
    dist = pair_distance("ntdh")
    got = zeroing_saliency(head, feats, reference, labels, dist, batch_size=25)  # chunks of 2 channels
    expected = []
    for c in range(6):
        x = feats.clone()
        x[:, c] = 0.0
        with torch.no_grad():
            expected.append(float(dist(head(x), reference, labels).mean()))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


def _image_split(n, g):
    from cmkd.training.data import SplitData

    y = torch.randint(0, 3, (n,), generator=g)
    x_t = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    x_s = torch.randn(n, 1, 8, 8, generator=g) + 0.5 * y.view(-1, 1, 1, 1).float()
    return SplitData.from_arrays(teacher_input=x_t, student_input=x_s, target=y)


def test_ntdh_feature_mask_on_images_zeroes_a_quarter_of_the_pair_teachers_channels_without_retraining():
    from cmkd.training.config import TrainConfig

    g = torch.Generator().manual_seed(0)
    train, val = _image_split(96, g), _image_split(32, g)
    torch.manual_seed(0)
    teacher = build_model({"arch": "small_cnn", "width": 4}, (1, 8, 8), 3)
    student = build_model({"arch": "small_cnn", "width": 4}, (1, 8, 8), 3)
    run = {"method": "ntdh_mask", "base": {"method": "kd", "temperature": 1.0}, "mode": "feature",
           "pair_epochs": 2, "pair_batch_size": 32}
    d = build_distiller(run, student, teacher, 3)
    selection = d.prepare(train, val, TrainConfig(epochs=1, batch_size=32, lr=0.01, device="cpu", seed=0),
                          task="classification", num_classes=3, progress=False)
    width = teacher.features(torch.zeros(2, 1, 8, 8)).shape[1]
    assert selection["level"] == "feature" and selection["saliency_rule"] == "zero"
    assert selection["retrained"] is False and selection["teacher_val"] is None
    assert len(selection["channels"]) == round(0.25 * width)
    # the channels kept are the most salient by the zeroing tag (min-max normalised)
    sal = torch.tensor(selection["saliency"])
    assert set(selection["channels"]) == set(sal.argsort(descending=True, stable=True)[:len(selection["channels"])]
                                             .tolist())
    masked = d.teacher
    assert isinstance(masked, ChannelMasked) and masked.level == "feature" and masked.model is not teacher
    assert int(masked.mask.sum()) == len(selection["channels"])
    assert all(not p.requires_grad for p in masked.parameters())
    x = next(iter(val.batches(8)))
    assert torch.isfinite(d(x)["kd"])
    # retrain: true (the variant's rule) trains the masked teacher further and records its val score
    d2 = build_distiller({**run, "retrain": True, "saliency": "permute", "keep_ratio": 0.5, "n_repeats": 2},
                         student, teacher, 3)
    sel2 = d2.prepare(train, val, TrainConfig(epochs=1, batch_size=32, lr=0.01, device="cpu", seed=0),
                      task="classification", num_classes=3, progress=False)
    assert sel2["retrained"] is True and sel2["teacher_val"] is not None
    assert len(sel2["channels"]) == round(0.5 * width) and sel2["saliency_rule"] == "permute"


def test_ntdh_feature_mask_on_vectors_keeps_mask_dim_channels_by_default():
    from cmkd.training.config import TrainConfig

    g = torch.Generator().manual_seed(0)
    train, val = _shared_channel_split(400, g), _shared_channel_split(200, g)
    torch.manual_seed(0)
    teacher = build_model({"arch": "mlp", "hidden": [16]}, (8,), 3)
    student = build_model({"arch": "mlp", "hidden": [16]}, (6,), 3)
    run = {"method": "ntdh_mask", "base": {"method": "kd", "temperature": 1.0}, "mode": "feature",
           "pair_epochs": 15, "pair_lr": 0.05, "pair_batch_size": 50, "n_repeats": 3}
    d = build_distiller(run, student, teacher, 3)
    selection = d.prepare(train, val, TrainConfig(epochs=5, batch_size=50, lr=0.01, device="cpu", seed=0),
                          task="classification", num_classes=3, progress=False)
    assert selection["level"] == "input" and selection["saliency_rule"] == "permute"
    assert len(selection["channels"]) == 2 and set(selection["channels"]) <= {0, 1, 2, 3}
    assert selection["retrained"] is True and selection["teacher_val"] is not None


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
    ({"method": "ntdh_mask", "divergence_form": "kl"}, "runs.r.divergence_form"),
    ({"method": "ntdh_mask", "cos_threshold": 2}, "runs.r.cos_threshold"),
    ({"method": "ntdh_mask", "pair_epochs": 0}, "runs.r.pair_epochs"),
    ({"method": "ntdh_mask", "level": "pixel"}, "runs.r.level"),
    ({"method": "ntdh_mask", "keep_ratio": "half"}, "runs.r.keep_ratio"),
    ({"method": "ntdh_mask", "mask_dim": 0}, "runs.r.mask_dim"),
    ({"method": "ntdh_mask", "saliency": "shuffle"}, "runs.r.saliency"),
    ({"method": "ntdh_mask", "retrain": "yes"}, "runs.r.retrain"),
])
def test_bad_config_names_the_key(cfg, key):
    cfg = dict(cfg)
    with pytest.raises(ConfigError) as err:
        get_method(cfg.pop("method")).validate(cfg, "runs.r")
    assert err.value.key == key


def test_params_yaml_runs_build():
    from pathlib import Path

    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    names = ["dkd", "dkd_lskd", "ctkd", "ctkd_lskd", "mlkd", "mlkd_lskd", "kdv1_ntdh", "kdv1_ntdh_feat",
             "kdv1_ntdh_drop", "kdv1_ntdh_feat_retrain"]
    for name in names:
        cfg = dict(params["runs"][name])
        get_method(cfg["method"]).validate({k: v for k, v in cfg.items() if k != "method"}, f"runs.{name}")
        student, teacher, batch = classification_setup()
        d = build_distiller(cfg, student, teacher, C)
        if getattr(d, "uses_feature_mask", False):
            d.set_teacher(ChannelMasked(teacher, channel_mask([0], 7), "input"))
        assert all(torch.isfinite(v) for v in d(batch).values())
    assert params["runs"]["kdv1_ntdh"]["base"] == {k: v for k, v in params["runs"]["kdv1"].items()}
    # NTDH's definitions are the runs in the table; the old drop rule is a named variant outside it
    assert params["runs"]["kdv1_ntdh"]["mode"] == "sample" and params["runs"]["kdv1_ntdh_feat"]["mode"] == "feature"
    assert params["runs"]["kdv1_ntdh_drop"]["mode"] == "sample_drop" and "kdv1_ntdh_drop" not in params["methods"]
    # the feature mask follows NTDH's code per kind of data; the earlier rule is a named variant
    feat, retrain = params["runs"]["kdv1_ntdh_feat"], params["runs"]["kdv1_ntdh_feat_retrain"]
    assert (feat["keep_ratio"], feat["saliency"], feat["retrain"], feat["mask_dim"]) == ("auto", "auto", "auto", 2)
    assert (retrain["keep_ratio"], retrain["saliency"], retrain["retrain"]) == (0.5, "permute", True)
    assert "kdv1_ntdh_feat_retrain" not in params["methods"]
    # C2KD as its code: the target zeroed, OFSD over the batch; the earlier C2KD is a named variant
    assert (params["runs"]["c2kd"]["non_target"], params["runs"]["c2kd"]["ofsd_normalise"]) == ("zero", "batch")
    variant = params["runs"]["c2kd_remove_target"]
    assert (variant["non_target"], variant["ofsd_normalise"]) == ("remove", "kept")
    assert "c2kd_remove_target" not in params["methods"]


# ---------------------------------------------------------------- through the engine


def test_methods_train_through_engine_fit():
    """A smoke run of cmkd.training.loop.fit: the optimiser reaches CTKD's theta, the NTDH feature mask
    is prepared, and every run ends with a finite history."""
    from cmkd.training.config import TrainConfig
    from cmkd.training.data import SplitData
    from cmkd.training.loop import fit

    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.randint(0, C, (n,), generator=g)
        t = torch.randn(n, 7, generator=g) + 2 * nn.functional.one_hot(y, 7).float()
        s = torch.randn(n, 5, generator=g) + nn.functional.one_hot(y, 5).float()
        return SplitData.from_arrays(teacher_input=t, student_input=s, target=y)

    train, val = split(96), split(32)
    teacher = build_model({"arch": "mlp", "hidden": [16]}, (7,), C)
    cfg = TrainConfig(epochs=2, batch_size=32, device="cpu")
    for run in ({"method": "ctkd", "ramp_epochs": 1},
                {"method": "ntdh_mask", "base": {"method": "dkd"}, "mode": "both"}):
        d = build_distiller(run, build_model({"arch": "mlp", "hidden": [16]}, (5,), C), teacher, C)
        if run["method"] == "ntdh_mask":
            d.prepare(train, val, TrainConfig(epochs=2, batch_size=32, device="cpu", seed=0),
                      task="classification", num_classes=C)
        theta0 = float(d.temperature_module.theta.detach()) if run["method"] == "ctkd" else None
        result = fit(d, train, val, cfg, task="classification", num_classes=C, progress=False)
        assert len(result.history) == 2 and all(math.isfinite(v) for h in result.history for v in h.values()
                                                if isinstance(v, float))
        if theta0 is not None:
            assert float(d.temperature_module.theta.detach()) != theta0
        else:
            # vectors: NTDH's sklearn mask_dim (2) of the 7 input channels
            assert len(d.selection["channels"]) == 2 and int(d.teacher.mask.sum()) == 2
