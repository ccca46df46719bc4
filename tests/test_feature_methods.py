"""The feature-based baselines fitnet, at, rkd, crd: losses against hand computations on the
models' stages, refusals, CRD's sampling / memory / NCE, and training through the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkd.errors import ConfigError
from cmkd.losses import at_loss, rkd_loss
from cmkd.methods import available_methods, build_distiller, get_method
from cmkd.methods.crd import nce_loss
from cmkd.models import build_model
from cmkd.training.config import TrainConfig
from cmkd.training.data import SplitData
from cmkd.training.loop import fit

C = 4
FEATURE_METHODS = ("fitnet", "at", "rkd", "crd")


pytestmark = pytest.mark.usefixtures("one_thread")


def _nets(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "vector":
        return (build_model({"arch": "mlp", "hidden": [16, 12]}, (6,), C),
                build_model({"arch": "mlp", "hidden": [20, 10]}, (9,), C),
                (6,), (9,))
    if kind == "image":
        return (build_model({"arch": "small_cnn", "width": 4}, (1, 8, 8), C),
                build_model({"arch": "small_cnn", "width": 6}, (3, 8, 8), C),
                (1, 8, 8), (3, 8, 8))
    return (build_model({"arch": "seg_resnet", "width": 4}, (1, 16, 16), C),
            build_model({"arch": "seg_resnet", "width": 4}, (3, 16, 16), C),
            (1, 16, 16), (3, 16, 16))


def _batch(kind, s_shape, t_shape, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (n, 16, 16) if kind == "seg" else (n,), generator=g)
    if kind == "seg":
        target[:, 0] = -1  # ignored pixels
    return {"student_input": torch.randn(n, *s_shape, generator=g),
            "teacher_input": torch.randn(n, *t_shape, generator=g),
            "target": target, "index": torch.arange(n)}


def _crd_ready(d, batch):
    """Size CRD's banks for a split of the batch's rows, as fit() does before training."""
    if d.method_name == "crd":
        d.on_train_start(SplitData.from_arrays(**{k: batch[k] for k in ("student_input", "teacher_input", "target")}))


def test_registered():
    assert set(FEATURE_METHODS) <= set(available_methods())
    for name in FEATURE_METHODS:
        cls = get_method(name)
        assert cls.uses_teacher_logits_only is False and cls.trains_teacher is False and cls.needs_teacher is True


CASES = [(m, k) for k in ("vector", "image", "seg") for m in FEATURE_METHODS if not (m == "at" and k == "vector")]


@pytest.mark.parametrize("method,kind", CASES)
def test_backward_reaches_student_not_teacher(method, kind):
    student, teacher, ss, ts = _nets(kind)
    batch = _batch(kind, ss, ts)
    d = build_distiller({"method": method}, student, teacher, C).train()
    _crd_ready(d, batch)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = d(batch)
    assert "ce" in losses and len(losses) == 2 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    kd_term = next(k for k in losses if k != "ce")
    d.zero_grad()
    losses = d(batch)
    losses[kd_term].backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0, kd_term
    # the frozen teacher stays in eval mode: its BatchNorm statistics do not move
    assert all(torch.equal(t_state[k], v) for k, v in teacher.state_dict().items())


def test_at_refuses_vectors_naming_the_key():
    student, teacher, _, _ = _nets("vector")
    with pytest.raises(ConfigError, match="spatial feature maps") as err:
        build_distiller({"method": "at"}, student, teacher, C)
    assert err.value.key.endswith(".stages")
    # a vector stage of an image network is refused at the first step, naming the stage
    student, teacher, ss, ts = _nets("image")
    d = build_distiller({"method": "at", "stages": ["block2", "features"]}, student, teacher, C)
    with pytest.raises(ConfigError, match="'features' is not a spatial map"):
        d(_batch("image", ss, ts))
    with pytest.raises(ConfigError, match="no stage 'layer3'"):
        build_distiller({"method": "at", "stages": ["layer3"]}, student, teacher, C)


@pytest.mark.parametrize("cfg,key", [
    ({"method": "at", "p": 0}, "runs.r.p"), ({"method": "at", "stages": []}, "runs.r.stages"),
    ({"method": "crd", "nce_k": 0}, "runs.r.nce_k"), ({"method": "crd", "nce_m": 1.0}, "runs.r.nce_m"),
    ({"method": "crd", "negatives": "hard"}, "runs.r.negatives"),
                                     ({"method": "rkd", "angle_weight": -1}, "runs.r.angle_weight"),
    ({"method": "fitnet", "beta": 1}, "runs.r.beta"),
])
def test_bad_config_names_the_key(cfg, key):
    cfg = dict(cfg)
    with pytest.raises(ConfigError) as err:
        get_method(cfg.pop("method")).validate(cfg, "runs.r")
    assert err.value.key == key


def test_fitnet_loss_is_mse_of_regressed_intermediate_stage():
    student, teacher, ss, ts = _nets("image")
    batch = _batch("image", ss, ts)
    d = build_distiller({"method": "fitnet", "hint_weight": 3.0, "ce_weight": 0.5}, student, teacher, C).train()
    assert (d.student_stage, d.teacher_stage) == ("block2", "block2")
    assert d.regressor.in_channels == 8 and d.regressor.out_channels == 12
    losses = d(batch)
    s = student.forward_stages(batch["student_input"], ["block2"])
    t = teacher.eval().forward_stages(batch["teacher_input"], ["block2"])["block2"]
    w, b = d.regressor.weight[:, :, 0, 0], d.regressor.bias
    regressed = torch.einsum("oc,nchw->nohw", w, s["block2"]) + b[None, :, None, None]
    assert losses["hint"].item() == pytest.approx(3.0 * ((regressed - t) ** 2).mean().item(), rel=1e-5)
    assert losses["ce"].item() == pytest.approx(0.5 * F.cross_entropy(s["logits"], batch["target"]).item(), rel=1e-5)


def test_fitnet_on_vectors_and_other_stages():
    student, teacher, ss, ts = _nets("vector")
    d = build_distiller({"method": "fitnet", "student_stage": "features", "teacher_stage": "hidden1"},
                        student, teacher, C)
    assert d.regressor.in_channels == 12 and d.regressor.out_channels == 20
    batch = _batch("vector", ss, ts)
    s = student.forward_stages(batch["student_input"], ["features"])["features"]
    t = teacher.forward_stages(batch["teacher_input"], ["hidden1"])["hidden1"]
    expected = 100.0 * ((s @ d.regressor.weight[:, :, 0, 0].T + d.regressor.bias - t) ** 2).mean()
    assert d(batch)["hint"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_at_loss_sums_the_matched_groups():
    student, teacher, ss, ts = _nets("image")
    batch = _batch("image", ss, ts)
    d = build_distiller({"method": "at"}, student, teacher, C).train()
    assert d.stages == ["block1", "block2", "block3"]
    s = student.forward_stages(batch["student_input"])
    t = teacher.eval().forward_stages(batch["teacher_input"])
    expected = 1000.0 * sum(at_loss(s[n], t[n]) for n in d.stages)
    assert d(batch)["at"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_at_interpolates_student_maps_to_the_teacher_size():
    torch.manual_seed(0)
    student = build_model({"arch": "small_cnn", "width": 4}, (1, 8, 8), C)
    teacher = build_model({"arch": "small_cnn", "width": 4}, (3, 16, 16), C)
    d = build_distiller({"method": "at", "stages": ["block1"]}, student, teacher, C).train()
    batch = {"student_input": torch.randn(3, 1, 8, 8), "teacher_input": torch.randn(3, 3, 16, 16),
             "target": torch.tensor([0, 1, 2])}
    s = student.forward_stages(batch["student_input"], ["block1"])["block1"]
    t = teacher.eval().forward_stages(batch["teacher_input"], ["block1"])["block1"]
    up = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    assert d(batch)["at"].item() == pytest.approx(1000.0 * at_loss(up, t).item(), rel=1e-5)


def test_rkd_on_penultimate_embeddings_pooled_for_segmentation():
    for kind in ("vector", "seg"):
        student, teacher, ss, ts = _nets(kind)
        batch = _batch(kind, ss, ts, n=5)
        d = build_distiller({"method": "rkd"}, student, teacher, C).train()
        s = student.forward_stages(batch["student_input"], ["features"])["features"]
        t = teacher.eval().forward_stages(batch["teacher_input"], ["features"])["features"]
        if kind == "seg":
            s, t = s.mean(dim=(2, 3)), t.mean(dim=(2, 3))
        assert d(batch)["rkd"].item() == pytest.approx(rkd_loss(s, t, 25.0, 50.0).item(), rel=1e-5)


# ---------------------------------------------------------------------------------- CRD


def np_nce(scores, n_rows):
    scores = np.asarray(scores, np.float64)
    k = scores.shape[1] - 1
    pn = k / n_rows
    total = 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + pn + 1e-7))
        total += sum(math.log(pn / (x + pn + 1e-7)) for x in row[1:])
    return -total / len(scores)


def test_nce_loss_matches_reference():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.01, 3.0, size=(5, 9))
    assert nce_loss(torch.tensor(scores), 40).item() == pytest.approx(np_nce(scores, 40), rel=1e-10)
    # a confident positive and negligible negatives cost less than the reverse
    good = torch.tensor([[50.0] + [1e-4] * 8])
    bad = torch.tensor([[1e-4] + [50.0] * 8])
    assert nce_loss(good, 40) < nce_loss(bad, 40)


def _crd_split(n=30, kind="vector", seed=0):
    student, teacher, ss, ts = _nets(kind, seed)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    data = SplitData.from_arrays(student_input=torch.randn(n, *ss, generator=g),
                                 teacher_input=torch.randn(n, *ts, generator=g), target=y)
    return student, teacher, data, y


def test_crd_negatives_are_other_classes_or_other_rows():
    student, teacher, data, y = _crd_split()
    d = build_distiller({"method": "crd", "nce_k": 500}, student, teacher, C)
    d.on_train_start(data)
    assert d.memory.rows == 30 and d.n_negatives() == 29  # capped: K <= rows - 1
    index = torch.arange(30)
    neg = d.sample_negatives(index, y)
    assert neg.shape == (30, 29)
    assert bool((y[neg] != y[:, None]).all())
    # uniform over the other classes' rows: with many draws every such row appears
    many = d.sample_negatives(torch.zeros(2000, dtype=torch.long), torch.zeros(2000, dtype=torch.long))
    assert set(many.flatten().tolist()) == set(torch.nonzero(y != 0).flatten().tolist())
    d_any = build_distiller({"method": "crd", "negatives": "any"}, *_crd_split()[:2], C)
    d_any.on_train_start(data)
    neg = d_any.sample_negatives(index, y)
    assert bool((neg != index[:, None]).all()) and int(neg.min()) >= 0 and int(neg.max()) <= 29
    assert set(d_any.sample_negatives(torch.full((3000,), 7),
                                      y[:1].expand(3000)).flatten().tolist()) == set(range(30)) - {7}


def test_crd_memory_update_and_loss_by_hand():
    student, teacher, data, y = _crd_split(n=12)
    d = build_distiller({"method": "crd", "nce_m": 0.25, "feat_dim": 6}, student, teacher, C).train()
    d.on_train_start(data)
    batch = next(data.batches(5))
    bank_s, bank_t = d.memory.student.clone(), d.memory.teacher.clone()
    torch.manual_seed(3)
    losses = d(batch)
    # the same draw again, by hand
    torch.manual_seed(3)
    s = student.forward_stages(batch["student_input"], ["features"])["features"]
    t = teacher.forward_stages(batch["teacher_input"], ["features"])["features"]
    v_s, v_t = d.embed_student(s), d.embed_teacher(t)
    idx = torch.cat([batch["index"][:, None], d.sample_negatives(batch["index"], batch["target"])], dim=1)
    out_s = torch.exp((bank_t[idx] * v_s[:, None, :]).sum(-1) / 0.07)
    out_t = torch.exp((bank_s[idx] * v_t[:, None, :]).sum(-1) / 0.07)
    z_s, z_t = out_s.mean() * 12, out_t.mean() * 12
    assert d.memory.z.tolist() == pytest.approx([z_s.item(), z_t.item()], rel=1e-5)
    expected = 0.8 * (np_nce((out_s / z_s).detach().numpy(), 12) + np_nce((out_t / z_t).detach().numpy(), 12))
    assert losses["crd"].item() == pytest.approx(expected, rel=1e-4)
    rows = batch["index"]
    want = F.normalize(bank_s[rows] * 0.25 + v_s.detach() * 0.75, dim=1)
    assert torch.allclose(d.memory.student[rows], want, atol=1e-6)
    others = torch.tensor([i for i in range(12) if i not in rows.tolist()])
    assert torch.equal(d.memory.teacher[others], bank_t[others])


def test_crd_bank_survives_state_dict_round_trip():
    student, teacher, data, _ = _crd_split(n=16)
    d = build_distiller({"method": "crd", "feat_dim": 8}, student, teacher, C).train()
    d.on_train_start(data)
    d(next(data.batches(6)))
    state = {k: v.clone() for k, v in d.state_dict().items()}
    fresh = build_distiller({"method": "crd", "feat_dim": 8}, *_crd_split(n=16)[:2], C)
    assert fresh.memory.rows == 0
    fresh.load_state_dict(state)
    assert fresh.memory.rows == 16 and torch.equal(fresh.memory.student,
                                                   d.memory.student) and torch.equal(fresh.memory.z, d.memory.z)
    fresh.on_train_start(data)  # a resumed run keeps its restored banks
    assert torch.equal(fresh.memory.teacher, d.memory.teacher)


# ------------------------------------------------------------------------- through the engine


def _split(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "seg":
        y = torch.randint(0, C, (n, 16, 16), generator=g)
        t = torch.randn(n, 3, 16, 16, generator=g) + y[:, None].float()
        s = torch.randn(n, 1, 16, 16, generator=g) + y[:, None].float()
        return SplitData.from_arrays(teacher_input=t, student_input=s, target=y)
    y = torch.randint(0, C, (n,), generator=g)
    if kind == "vector":
        t = torch.randn(n, 9, generator=g) + 2 * F.one_hot(y, 9).float()
        s = torch.randn(n, 6, generator=g) + F.one_hot(y, 6).float()
    else:
        t = torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None].float()
        s = torch.randn(n, 1, 8, 8, generator=g) + 0.5 * y[:, None, None, None].float()
    return SplitData.from_arrays(teacher_input=t, student_input=s, target=y)


@pytest.mark.parametrize("kind", ["vector", "image", "seg"])
def test_methods_train_through_engine_fit(kind):
    n_train, n_val = (64, 24) if kind != "seg" else (12, 6)
    train, val = _split(kind, n_train, 1), _split(kind, n_val, 2)
    task = "segmentation" if kind == "seg" else "classification"
    cfg = TrainConfig(epochs=2, batch_size=16 if kind != "seg" else 4, device="cpu")
    for method in FEATURE_METHODS:
        if method == "at" and kind == "vector":
            continue
        student, teacher, _, _ = _nets(kind)
        t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
        s_before = [p.detach().clone() for p in student.parameters()]
        d = build_distiller({"method": method}, student, teacher, C)
        result = fit(d, train, val, cfg, task=task, num_classes=C, progress=False)
        assert len(result.history) == 2
        assert all(math.isfinite(v) for h in result.history for v in h.values() if isinstance(v, float)), method
        assert any(k.startswith("train/") and k not in ("train/ce", "train/loss") for k in result.history[0]), method
        assert all(torch.equal(t_state[k], v) for k, v in teacher.state_dict().items()), method
        assert any(not torch.equal(a, b.detach()) for a, b in zip(s_before, student.parameters())), method
        if method == "crd":
            assert d.memory.rows == n_train


def test_params_yaml_feature_runs_build():
    from pathlib import Path

    import yaml

    runs = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["runs"]
    for name in FEATURE_METHODS:
        cfg = dict(runs[name])
        get_method(cfg["method"]).validate({k: v for k, v in cfg.items() if k != "method"}, f"runs.{name}")
        student, teacher, ss, ts = _nets("image")
        batch = _batch("image", ss, ts)
        d = build_distiller(cfg, student, teacher, C).train()
        _crd_ready(d, batch)
        assert all(torch.isfinite(v) for v in d(batch).values()), name


def test_methods_train_on_prepared_digits(tmp_path):
    """The project's digits -> digits-M data (8 x 8, a subset of rows), small CNNs, one epoch."""
    from cmkd.data.datasets import digits
    from cmkd.data.h5 import read_attrs
    from cmkd.training.data import load_split

    out = tmp_path / "digits.h5"
    digits.prepare({"image_size": 8, "blend": 0.5, "split": [0.6, 0.2, 0.2], "seed": 0}, tmp_path, out)
    attrs = read_attrs(out)

    def subset(split, n):
        data = load_split(out, split, attrs, in_memory=True)
        return SplitData.from_arrays(**{k: v[:n] for k, v in data.tensors.items()})

    train, val = subset("train", 192), subset("val", 64)
    for method in FEATURE_METHODS:
        torch.manual_seed(0)
        teacher = build_model({"arch": "small_cnn", "width": 4}, (1, 8, 8), 10)
        student = build_model({"arch": "small_cnn", "width": 4}, (3, 8, 8), 10)
        d = build_distiller({"method": method}, student, teacher, 10)
        result = fit(d, train, val, TrainConfig(epochs=1, batch_size=32, device="cpu"), task="classification",
                     num_classes=10, progress=False)
        assert math.isfinite(result.history[0]["train/loss"]) and 0.0 <= result.best_val["f1_weighted"] <= 1.0, method
