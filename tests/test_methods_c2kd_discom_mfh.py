"""C2KD, DisCoM-KD and MFH (Algorithm 1, MG-KD): formulas against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau
from torch import nn

from cmkd.errors import ConfigError
from cmkd.losses import kendall_tau
from cmkd.methods import build_distiller, get_method
from cmkd.methods.c2kd import nontarget_kl_rows, ofsd_mask
from cmkd.methods.discom import STUDENT_MODALITY, TEACHER_MODALITY, grad_reverse, modality_targets, orthogonality_loss
from cmkd.methods.mfh import ChannelMasked, algorithm1, channel_mask, permutation_saliency
from cmkd.models import build_model

C = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _mlp(in_dim: int, hidden=(16, 16)):
    return build_model({"arch": "mlp", "hidden": list(hidden)}, (in_dim,), C)


def _batch(n=32, ds=6, dt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "student_input": torch.randn(n, ds, generator=g),
        "teacher_input": torch.randn(n, dt, generator=g),
        "target": torch.randint(0, C, (n,), generator=g),
    }


# ----------------------------------------------------------------------------- Kendall tau


def test_kendall_tau_matches_scipy_with_ties_and_constant_row():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 7))
    b = a + 0.8 * rng.standard_normal((40, 7))
    # ties: rounded values, and a row that is constant in b
    a[:10] = np.round(a[:10])
    b[5:15] = np.round(b[5:15] * 2) / 2
    b[20] = 3.0
    a[21] = [1, 1, 2, 2, 2, 3, 3]
    b[21] = [1, 2, 2, 3, 3, 3, 1]
    expected = np.array([kendalltau(a[i], b[i]).statistic for i in range(len(a))])
    for chunk in (1 << 24, 49 * 3):  # one chunk, and several chunks of 3 rows
        got = kendall_tau(torch.tensor(a), torch.tensor(b), chunk_elements=chunk).numpy()
        assert np.isnan(got[20]) and np.isnan(expected[20])
        np.testing.assert_allclose(np.delete(got, 20), np.delete(expected, 20), rtol=1e-12, atol=1e-12)
    assert kendall_tau(torch.tensor(a, dtype=torch.float32),
                       torch.tensor(b, dtype=torch.float32)).dtype == torch.float32


def test_kendall_tau_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        kendall_tau(torch.zeros(3, 4), torch.zeros(3, 5))


# -------------------------------------------------------------------------------------- C2KD


def test_ofsd_keeps_exactly_rows_above_threshold():
    ref = torch.tensor([0.0, 1.0, 2.0, 3.0])
    proxy_t = ref.repeat(5, 1)
    proxy_s = torch.stack([
        torch.tensor([0.0, 1.0, 2.0, 3.0]) * 7,   # same order: tau = 1
        torch.tensor([3.0, 2.0, 1.0, 0.0]),       # reversed: tau = -1
        torch.tensor([1.0, 0.0, 2.0, 3.0]),       # one swapped pair of 6: tau = (5 - 1) / 6
        torch.tensor([2.0, 3.0, 0.0, 1.0]),       # 2 concordant, 4 discordant: tau = -1/3
        torch.tensor([1.0, 1.0, 1.0, 1.0]),       # constant: no ranking, never kept
    ])
    assert ofsd_mask(proxy_s, proxy_t, 0.0).tolist() == [True, False, True, False, False]
    assert ofsd_mask(proxy_s, proxy_t, 0.7).tolist() == [True, False, False, False, False]
    assert ofsd_mask(proxy_s, proxy_t, -0.5).tolist() == [True, False, True, True, False]
    torch.testing.assert_close(kendall_tau(proxy_s[:4], proxy_t[:4]), torch.tensor([1.0, -1.0, 4 / 6, -1 / 3]))


def _np_softmax(z):
    p = np.exp(z - z.max())
    return p / p.sum()


def _np_nontarget_kl(s, t, y, temperature, form="zero"):
    """Loop reference. zero (C2KD's `ntkl`): the target logit set to 0, softmax and KL over all C
    classes; remove: the target column dropped, softmax and KL over the C - 1 others."""
    out = []
    for si, ti, yi in zip(s, t, y):
        if form == "zero":
            zs, zt = si.copy(), ti.copy()
            zs[yi] = zt[yi] = 0.0
        else:
            keep = np.arange(len(si)) != yi
            zs, zt = si[keep], ti[keep]
        ps, pt = _np_softmax(zs / temperature), _np_softmax(zt / temperature)
        out.append(np.sum(pt * (np.log(pt) - np.log(ps))))
    return np.array(out)


@pytest.mark.parametrize("form", ["zero", "remove"])
def test_nontarget_kl_matches_numpy_reference(form):
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal((12, C)) * 3, rng.standard_normal((12, C)) * 3
    y = rng.integers(0, C, 12)
    for temperature in (1.0, 2.5):
        got = nontarget_kl_rows(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature, form).numpy()
        np.testing.assert_allclose(got, _np_nontarget_kl(s, t, y, temperature, form), rtol=1e-10, atol=1e-12)
    # ignored rows (target -1) contribute 0
    y2 = torch.tensor(y)
    y2[3] = -1
    assert nontarget_kl_rows(torch.tensor(s), torch.tensor(t), y2, 1.0, form)[3] == 0


def test_nontarget_kl_zeroed_and_removed_target_differ_by_hand():
    # 3 classes, target 0. Student logits [5, 0, 0], teacher [1, ln 9, 0]:
    # removed: q_s = (1/2, 1/2), q_t = (9/10, 1/10): KL = 9/10 ln(9/5) + 1/10 ln(1/5) = 0.368
    # zeroed: both target logits become 0, q_s = (1/3, 1/3, 1/3), q_t = (1/11, 9/11, 1/11):
    #         KL = 2/11 ln(3/11) + 9/11 ln(27/11) = 0.498
    s = torch.tensor([[5.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, math.log(9.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    removed = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    zeroed = 2 / 11 * math.log(3 / 11) + 9 / 11 * math.log(27 / 11)
    assert nontarget_kl_rows(s, t, y, 1.0, "remove").item() == pytest.approx(removed, abs=1e-12)
    assert nontarget_kl_rows(s, t, y, 1.0, "zero").item() == pytest.approx(zeroed, abs=1e-12)
    assert nontarget_kl_rows(s, t, y, 1.0).item() == pytest.approx(zeroed, abs=1e-12)  # C2KD's form by default
    assert abs(zeroed - removed) > 0.1


def _c2kd_proxies(d, batch):
    with torch.no_grad():
        ps = d.student_proxy(d.student.forward_stages(batch["student_input"], ["hidden1"])["hidden1"]).double().numpy()
        pt = d.teacher_proxy(d.teacher.forward_stages(batch["teacher_input"], ["hidden1"])["hidden1"]).double().numpy()
    return ps, pt


@pytest.mark.parametrize("variant", [{}, {"non_target": "remove", "ofsd_normalise": "kept"}])
def test_c2kd_ofsd_loss_matches_reference_on_the_proxies(variant):
    torch.manual_seed(0)
    # untrained proxies rank classes alike for every sample (bias-dominated), mostly with
    # tau in [-0.6, 0]: a threshold inside that range exercises the selection
    cfg = {"temperature": 2.0, "threshold": -0.3, "crossmodal_weight": 0.7, **variant}
    d = build_distiller({"method": "c2kd", **cfg}, _mlp(6), _mlp(7), C)
    batch = _batch()
    d.eval()  # BatchNorm of the proxies uses running statistics: the same values twice
    losses = d(batch)
    assert d.student_stage == "hidden1" and d.teacher_stage == "hidden1"  # the MLPs' intermediate stage
    ps, pt = _c2kd_proxies(d, batch)
    y = batch["target"].numpy()
    tau = np.array([kendalltau(ps[i], pt[i]).statistic for i in range(len(y))])
    keep = tau > -0.3
    assert 0 < keep.sum() < len(y), "the batch should exercise the selection"
    form = variant.get("non_target", "zero")
    kl_rows, kl_back_rows = _np_nontarget_kl(ps, pt, y, 2.0, form), _np_nontarget_kl(pt, ps, y, 2.0, form)
    if variant:  # the variant: the mean over the kept rows
        kl, kl_back = kl_rows[keep].mean(), kl_back_rows[keep].mean()
    else:  # C2KD's code: (mask * kl).mean() over the whole batch
        kl, kl_back = (kl_rows * keep).sum() / len(y), (kl_back_rows * keep).sum() / len(y)
    assert _f(losses["ofsd_student"]) == pytest.approx(kl * 4.0 * 0.7, rel=1e-4)
    assert _f(losses["ofsd_teacher"]) == pytest.approx(kl_back * 4.0 * 0.7, rel=1e-4)
    assert d.last_kept_fraction == pytest.approx(keep.mean())


def test_c2kd_ofsd_batch_normalisation_is_the_kept_mean_times_the_fraction_kept():
    torch.manual_seed(0)
    cfg = {"temperature": 1.0, "threshold": -0.3, "non_target": "zero"}
    batch = _batch()
    default = build_distiller({"method": "c2kd", **cfg}, _mlp(6), _mlp(7), C).eval()
    kept = build_distiller({"method": "c2kd", **cfg, "ofsd_normalise": "kept"}, _mlp(6), _mlp(7), C).eval()
    kept.load_state_dict(default.state_dict())
    a, b = default(batch), kept(batch)
    frac = default.last_kept_fraction
    assert 0 < frac < 1
    assert _f(a["ofsd_student"]) == pytest.approx(_f(b["ofsd_student"]) * frac, rel=1e-5)
    assert _f(a["ce"]) == _f(b["ce"])


@pytest.mark.parametrize("cfg, key", [({"non_target": "drop"}, "runs.r.non_target"),
                                      ({"ofsd_normalise": "rows"}, "runs.r.ofsd_normalise")])
def test_c2kd_variant_keys_are_validated(cfg, key):
    with pytest.raises(ConfigError) as err:
        get_method("c2kd").validate(cfg, "runs.r")
    assert key in str(err.value)


def test_c2kd_backward_reaches_student_teacher_and_proxies():
    torch.manual_seed(0)
    student, teacher = _mlp(6), _mlp(7)
    d = build_distiller({"method": "c2kd", "threshold": -1.0 + 1e-6}, student, teacher, C)
    assert d.trains_teacher and not d.uses_teacher_logits_only
    d.train()
    assert teacher.training
    losses = d(_batch())
    assert set(losses) == {"ce", "ce_teacher", "proxy_student", "proxy_teacher", "ofsd_student", "ofsd_teacher"}
    sum(losses.values()).backward()
    for name, module in (("student", student), ("teacher", teacher), ("student_proxy", d.student_proxy),
                         ("teacher_proxy", d.teacher_proxy)):
        for pname, p in module.named_parameters():
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    # the cross-modal term alone trains the teacher's trunk too (bidirectional)
    d.zero_grad()
    d(_batch())["ofsd_teacher"].backward()
    assert teacher.body[0].weight.grad.abs().sum() > 0
    assert student.body[0].weight.grad is None or student.body[0].weight.grad.abs().sum() == 0


def test_c2kd_trains_on_a_batch_of_one():
    torch.manual_seed(0)
    d = build_distiller({"method": "c2kd"}, _mlp(6), _mlp(7), C).train()
    losses = d(_batch(n=1))
    assert all(torch.isfinite(v) for v in losses.values())


class _TinySeg(nn.Module):
    """Dense toy network: features at half resolution, 1x1-conv head (one stage: features)."""

    def __init__(self, in_ch: int, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.ReLU())
        self.feature_dim = width
        self.head = nn.Conv2d(width, C, 1)
        self.stage_names, self.stage_channels, self.intermediate_stage = ["features"], {"features": width}, "features"

    def features(self, x):
        return self.body(x)

    def forward_stages(self, x, names=None):
        f = self.features(x)
        return {"features": f, "logits": self.head(f)}

    def forward(self, x):
        return self.head(self.features(x))


def test_c2kd_segmentation_uses_valid_pixels():
    torch.manual_seed(0)
    d = build_distiller({"method": "c2kd"}, _TinySeg(2), _TinySeg(3), C)
    target = torch.randint(0, C, (2, 8, 8))
    target[:, :4] = -1
    batch = {"student_input": torch.randn(2, 2, 8, 8), "teacher_input": torch.randn(2, 3, 8, 8), "target": target}
    losses = d(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0 <= d.last_kept_fraction <= 1
    sum(losses.values()).backward()


def _grad_sum(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_c2kd_proxies_sit_on_layer3_by_default(task):
    """C2KD's proxies on the output of layer3 (its code's `Tea` / `Stu`): the cross-modal proxy
    loss trains layer3 and below, never layer4 or the main head; `proxy_stage: features` is
    the old placement (the penultimate features, after layer4)."""
    torch.manual_seed(0)
    if task == "classification":
        cfg = {"arch": "resnet18", "width": 4, "small_input": True}
        shapes, target = ((2, 16, 16), (3, 16, 16)), torch.randint(0, C, (4,))
    else:
        cfg = {"arch": "seg_resnet", "width": 4}
        shapes, target = ((2, 16, 24), (3, 16, 24)), torch.randint(0, C, (4, 16, 24))
        target[:, :3] = -1
    student, teacher = build_model(cfg, shapes[0], C), build_model(cfg, shapes[1], C)
    d = build_distiller({"method": "c2kd", "threshold": -1.0 + 1e-6}, student, teacher, C).train()
    assert (d.student_stage, d.teacher_stage) == ("layer3", "layer3")
    assert d.student_proxy.net[0].in_channels == student.stage_channels["layer3"] == 16
    batch = {"student_input": torch.randn(4, *shapes[0]), "teacher_input": torch.randn(4, *shapes[1]), "target": target}
    maps = student.forward_stages(batch["student_input"], ["layer3"])["layer3"]
    proxy = d.student_proxy(maps, task == "classification")
    if task == "classification":
        assert maps.dim() == 4 and proxy.shape == (4, C)  # the layer3 map pooled to one prediction
    else:
        assert proxy.shape == (4, C, *maps.shape[-2:]) and maps.shape[-1] < 24  # per pixel, at layer3's resolution
    losses = d(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["ofsd_student"].backward()
    layer3, layer4 = student.stages[2], student.stages[3]
    assert _grad_sum(layer3) > 0 and _grad_sum(d.student_proxy) > 0
    assert _grad_sum(layer4) == 0 and _grad_sum(student.head) == 0 and _grad_sum(teacher) == 0
    # the old placement: proxies on the penultimate features, whose gradient reaches layer4
    old = build_distiller({"method": "c2kd", "threshold": -1.0 + 1e-6, "proxy_stage": "features"},
                          student, teacher, C).train()
    student.zero_grad()
    old(batch)["ofsd_student"].backward()
    assert old.student_stage == "features" and _grad_sum(layer4) > 0


def test_c2kd_proxy_stage_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        build_distiller({"method": "c2kd", "proxy_stage": "layer9"}, _mlp(6), _mlp(7), C)
    assert err.value.key == "c2kd.proxy_stage" and "hidden1" in str(err.value)
    with pytest.raises(ConfigError) as err:
        get_method("c2kd").validate({"proxy_stage": 3}, "runs.c2kd")
    assert err.value.key == "runs.c2kd.proxy_stage"


# ------------------------------------------------------------------------------- DisCoM-KD


def test_grl_reverses_and_scales_gradients():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    y = grad_reverse(x, 0.5)
    torch.testing.assert_close(y, x)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * w)


def test_orthogonality_abs_vs_signed():
    a = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    anti, orth, para = -2 * a[:1], torch.tensor([[0.0, 0.0, 5.0]]), 3 * a[:1]
    assert float(orthogonality_loss(a[:1], anti, "signed")) == pytest.approx(-1.0)
    assert float(orthogonality_loss(a[:1], anti, "abs")) == pytest.approx(1.0)
    assert float(orthogonality_loss(a[:1], orth, "abs")) == pytest.approx(0.0)
    assert float(orthogonality_loss(a[:1], orth, "signed")) == pytest.approx(0.0)
    assert float(orthogonality_loss(a[:1], para, "signed")) == pytest.approx(1.0)
    # mean over rows: cos = 1/sqrt(5), 0, 1 -> abs and signed agree; with an anti-parallel row they differ
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    assert float(orthogonality_loss(a, b, "abs")) == pytest.approx((1 / 5**0.5 + 0 + 1) / 3)
    assert float(orthogonality_loss(a, b, "signed")) == pytest.approx((1 / 5**0.5 + 0 - 1) / 3)


def _discom(**cfg):
    torch.manual_seed(0)
    return build_distiller({"method": "discom_kd", **cfg}, _mlp(6), _mlp(7), C)


def test_discom_modality_targets_are_branch_indices():
    assert (STUDENT_MODALITY, TEACHER_MODALITY) == (0, 1)
    assert modality_targets(3, 1, torch.device("cpu")).tolist() == [1, 1, 1]
    d = _discom()
    batch = _batch()
    losses = d(batch)
    with torch.no_grad():
        (m0, _, z0), (m1, _, z1) = d.embeddings(batch)
    assert (m0, m1) == (0, 1)

    def mod_loss(t0, t1):
        n = len(batch["target"])
        y0, y1 = torch.full((n,), t0), torch.full((n,), t1)
        return float(F.cross_entropy(d.inf_modality(z0["inf"]), y0) + F.cross_entropy(d.irr_modality(z0["irr"]), y0)
                     + F.cross_entropy(d.inf_modality(z1["inf"]), y1) + F.cross_entropy(d.irr_modality(z1["irr"]), y1))

    def adv_loss(t0, t1):
        n = len(batch["target"])
        return float(F.cross_entropy(d.adversary(z0["inv"]),
            torch.full((n,), t0)) + F.cross_entropy(d.adversary(z1["inv"]), torch.full((n,), t1)))

    with torch.no_grad():
        assert _f(losses["mod"]) == pytest.approx(mod_loss(0, 1), rel=1e-5)
        assert _f(losses["adv"]) == pytest.approx(adv_loss(0, 1), rel=1e-5)
        assert abs(mod_loss(0, 1) - mod_loss(1, 0)) > 1e-4  # the check can tell swapped targets apart
        assert abs(adv_loss(0, 1) - adv_loss(1, 0)) > 1e-4


def test_discom_embeddings_are_halves_and_projection():
    d = _discom()
    x = _batch()["student_input"]
    z = d.student_branch.embed(x)
    spec = d.student.features(x)
    e = spec.shape[1] // 2
    assert all(v.shape == (x.shape[0], e) for v in z.values())
    torch.testing.assert_close(z["irr"], spec[:, :e])
    torch.testing.assert_close(z["inf"], spec[:, e:])
    torch.testing.assert_close(z["inv"], d.student_branch.invariant_projection(d.student_branch.invariant.features(x)))
    # the invariant encoder is a separate, re-initialised copy
    assert d.student_branch.invariant is not d.student
    assert not torch.equal(d.student_branch.invariant.body[0].weight, d.student.body[0].weight)


@pytest.mark.parametrize("switch,key",
                         [("use_adv", "adv"), ("use_mod", "mod"), ("use_aux", "aux"), ("use_orth", "orth")])
def test_discom_ablation_switch_removes_exactly_its_term(switch, key):
    batch = _batch()
    full = _discom()(batch)
    ablated = _discom(**{switch: False})(batch)
    assert set(full) == {"cl", "adv", "mod", "aux", "orth"}
    assert set(ablated) == set(full) - {key}
    for k in ablated:  # same initialisation: the other terms are unchanged
        assert _f(ablated[k]) == pytest.approx(_f(full[k]), rel=1e-6)


@pytest.mark.parametrize("representation,part", [("inv_only", "inv"), ("inf_only", "inf")])
def test_discom_representation_ablation_feeds_one_embedding(representation, part):
    d = _discom(representation=representation)
    batch = _batch()
    losses = d(batch)
    with torch.no_grad():
        cl = 0.0
        for _, branch, z in d.embeddings(batch):
            assert branch.head.in_features == z[part].shape[1]
            cl += float(F.cross_entropy(branch.head(z[part]), batch["target"]))
    assert _f(losses["cl"]) == pytest.approx(cl, rel=1e-5)


def test_discom_signed_orthogonality_is_the_printed_sum():
    d = _discom(orthogonality="signed")
    batch = _batch()
    losses = d(batch)
    with torch.no_grad():
        expected = 0.0
        for _, _, z in d.embeddings(batch):
            expected += float(F.cosine_similarity(z["inv"], z["inf"]).mean()
                              + F.cosine_similarity(z["inf"], z["irr"]).mean())
    assert _f(losses["orth"]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_discom_deployables_run_alone_on_their_modality():
    d = _discom()
    sum(d(_batch()).values()).backward()  # both branches train jointly
    assert d.student.body[0].weight.grad is not None and d.teacher.body[0].weight.grad is not None
    deploy = d.deployables()
    assert set(deploy) == {"student", "teacher_modality"}
    for name, x in (("student", torch.randn(9, 6)), ("teacher_modality", torch.randn(9, 7))):
        net, key = deploy[name]
        assert key == {"student": "student_input", "teacher_modality": "teacher_input"}[name]
        net.eval()
        out = net(x)
        assert out.shape == (9, C)
        torch.testing.assert_close(out, net.head(net.features(x)))
    with pytest.raises(RuntimeError):
        deploy["student"][0](torch.randn(9, 7))  # the student-modality model takes the student modality only


def test_discom_rejects_segmentation_and_bad_params():
    d = _discom()
    batch = _batch(n=4)
    batch["target"] = torch.zeros(4, 3, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="classification only"):
        d(batch)
    cls = get_method("discom_kd")
    with pytest.raises(ConfigError, match="orthogonality"):
        cls.validate({"orthogonality": "cos"}, "runs.x")
    with pytest.raises(ConfigError, match="representation"):
        cls.validate({"representation": "all"}, "runs.x")
    with pytest.raises(ConfigError, match="use_aux"):
        cls.validate({"use_aux": "no"}, "runs.x")


# ------------------------------------------------------------------------------------- MFH


def _naive_saliency(model, x, y, n_repeats, seed, loss):
    """Reference: one channel at a time, the same permutations as the vectorised version."""
    g = torch.Generator().manual_seed(seed)
    n, c = x.shape[:2]
    with torch.no_grad():
        base = loss(model(x), y).mean()
        out = torch.zeros(c, dtype=torch.float64)
        for _ in range(n_repeats):
            perms = torch.rand(c, n, generator=g).argsort(dim=1)
            for ch in range(c):
                xp = x.clone()
                xp[:, ch] = x[perms[ch], ch]
                out[ch] += float(loss(model(xp), y).mean() - base)
    return (out / n_repeats).float()


def test_permutation_saliency_ranks_planted_channels_first_and_matches_loop():
    torch.manual_seed(0)
    n, c = 200, 8
    x = torch.randn(n, c)
    model = nn.Linear(c, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
        model.weight[1, 2], model.weight[1, 5] = 3.0, -2.0  # only channels 2 and 5 matter
    y = (model(x).argmax(1)).long()
    sal = permutation_saliency(model, x, y, n_repeats=4, generator=torch.Generator().manual_seed(3), batch_size=3 * n)
    assert set(torch.argsort(sal, descending=True)[:2].tolist()) == {2, 5}
    assert torch.all(sal[[0, 1, 3, 4, 6, 7]] == 0)  # unused channels: permuting them changes nothing
    assert sal[2] > sal[5] > 0
    ref = _naive_saliency(model, x, y, 4, 3, lambda o, t: F.cross_entropy(o, t, reduction="none"))
    torch.testing.assert_close(sal, ref, rtol=1e-5, atol=1e-6)


def test_permutation_saliency_image_channels_match_loop():
    torch.manual_seed(0)
    x = torch.randn(10, 4, 5, 5)
    model = nn.Sequential(nn.Conv2d(4, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    reference_out = torch.randn(10, 3)
    sal = permutation_saliency(model, x, reference_out, n_repeats=2, generator=torch.Generator().manual_seed(1),
                               loss="mse", batch_size=25)
    ref = _naive_saliency(model, x, reference_out, 2, 1, lambda o, t: (o - t).pow(2).mean(1))
    torch.testing.assert_close(sal, ref, rtol=1e-5, atol=1e-6)


def test_algorithm1_recovers_modality_general_channels():
    # MFH's Gaussian setting: 10 decisive features, the first 5 shared with the student modality.
    rng = np.random.default_rng(0)
    n, shared, specific = 300, 5, 5
    xs = rng.standard_normal((n, shared + specific))
    y = torch.tensor((xs.sum(1) > 0).astype(np.int64))
    x_t = rng.standard_normal((n, 20))
    x_t[:, : shared + specific] = xs
    x_s = rng.standard_normal((n, 20))
    x_s[:, :shared] = xs[:, :shared]
    x_t, x_s = torch.tensor(x_t, dtype=torch.float32), torch.tensor(x_s, dtype=torch.float32)
    torch.manual_seed(0)
    channels, saliency = algorithm1(nn.Linear(20, 2), nn.Linear(20, 2), x_t, x_s, y, k=shared, n_repeats=10,
                                    pair_epochs=100, pair_lr=0.03, generator=torch.Generator().manual_seed(0))
    assert channels.shape == (shared,) and saliency.shape == (20,)
    assert float(saliency.max()) == 1.0 and float(saliency.min()) == 0.0
    assert set(channels.tolist()) == set(range(shared))
    with pytest.raises(ValueError):
        algorithm1(nn.Linear(20, 2), nn.Linear(20, 2), x_t, x_s, y, k=21, train_pair=False)


def _four_class_shared(n=400, shared=5, specific=5, noise=10, seed=0):
    """4 classes decided by 10 features; the teacher sees all 10, the student the first `shared`."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, shared + specific))
    w = rng.standard_normal((shared + specific, 4))
    y = torch.tensor((xs @ w).argmax(1).astype(np.int64))
    x_t = rng.standard_normal((n, shared + specific + noise))
    x_t[:, : shared + specific] = xs
    x_s = rng.standard_normal((n, shared + specific + noise))
    x_s[:, :shared] = xs[:, :shared]
    return torch.tensor(x_t, dtype=torch.float32), torch.tensor(x_s, dtype=torch.float32), y


def test_algorithm1_with_ntdh_distance_recovers_shared_channels():
    """NTDH's feature mask: Algorithm 1 with its non-target divergence as the distance."""
    x_t, x_s, y = _four_class_shared()
    torch.manual_seed(0)
    channels, saliency = algorithm1(nn.Linear(20, 4), nn.Linear(20, 4), x_t, x_s, y, k=5, n_repeats=3, distance="ntdh",
                                    pair_epochs=10, pair_lr=0.05, pair_batch_size=50,
                                    generator=torch.Generator().manual_seed(0))
    # at least 4 of the 5 shared channels (a teacher-only decisive channel can outrank one: it
    # changes the teacher's non-target distribution too), and no pure-noise channel
    assert len(set(channels.tolist()) & set(range(5))) >= 4 and max(channels.tolist()) < 10
    assert float(saliency[:5].mean()) > 3 * float(saliency[10:].max())
    assert float(saliency.max()) == 1.0 and float(saliency.min()) == 0.0
    with pytest.raises(ValueError, match="unknown Algorithm 1 distance"):
        algorithm1(nn.Linear(20, 4), nn.Linear(20, 4), x_t, x_s, y, k=5, distance="kl")


def test_permutation_saliency_with_labels_matches_naive():
    """The label-aware path (NTDH's distance) against one channel at a time."""
    from cmkd.losses import non_target_divergence

    torch.manual_seed(0)
    model, ref_model = _mlp(6), _mlp(6)
    x, y = torch.randn(30, 6), torch.randint(0, C, (30,))
    with torch.no_grad():
        reference_out = ref_model(x)
    def dist(o, r, lab):
        return non_target_divergence(r, o, lab, form="ntdh")

    sal = permutation_saliency(model, x, reference_out, n_repeats=2, generator=torch.Generator().manual_seed(1),
                               loss=dist,
                               labels=y, batch_size=25)
    ref = _naive_saliency(model, x, reference_out, 2, 1, lambda o, t: dist(o, t, y))
    torch.testing.assert_close(sal, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="callable"):
        permutation_saliency(model, x, reference_out, loss="mse", labels=y)


def test_algorithm1_feature_level_ranks_feature_channels():
    torch.manual_seed(0)
    teacher, student = _mlp(7, hidden=(12,)), _mlp(6)
    x_t, x_s, y = torch.randn(40, 7), torch.randn(40, 6), torch.randint(0, C, (40,))
    channels, saliency = algorithm1(teacher, student, x_t, x_s, y, k=4, level="feature", n_repeats=2, train_pair=False,
                                    generator=torch.Generator().manual_seed(0))
    assert saliency.shape == (12,) and channels.shape == (4,)
    # the same as permuting the features in front of the head, by hand
    with torch.no_grad():
        ref = permutation_saliency(teacher.head, teacher.features(x_t), student(x_s), 2,
                                   torch.Generator().manual_seed(0), loss="mse")
    assert channels.tolist() == torch.argsort(ref, descending=True, stable=True)[:4].tolist()


def test_channel_masked_model_ignores_other_channels():
    torch.manual_seed(0)
    net = ChannelMasked(_mlp(6), channel_mask([0, 3], 6))
    x = torch.randn(4, 6)
    x2 = x.clone()
    x2[:, [1, 2, 4, 5]] = torch.randn(4, 4)
    torch.testing.assert_close(net(x), net(x2))
    torch.testing.assert_close(net(x), net.head(net.features(x)))
    with pytest.raises(ValueError):
        channel_mask([6], 6)
    feat = ChannelMasked(_mlp(6, hidden=(8,)), channel_mask([1, 2], 8), level="feature")
    f = feat.features(x)
    assert torch.all(f[:, [0, 3, 4, 5, 6, 7]] == 0)
    torch.testing.assert_close(f[:, [1, 2]], feat.model.features(x)[:, [1, 2]])


def test_mgkd_distils_from_the_installed_teacher_only():
    torch.manual_seed(0)
    d = build_distiller({"method": "mgkd", "temperature": 2.0}, _mlp(6), _mlp(7), C)
    batch = _batch()
    with pytest.raises(RuntimeError, match="prepare"):
        d(batch)
    teacher = ChannelMasked(_mlp(7), channel_mask([1, 2], 7))
    d.set_teacher(teacher)
    batch["teacher_logits"] = torch.zeros(32, C)  # stale cache of the full teacher: must be ignored
    losses = d(batch)
    s = d.student(batch["student_input"])
    with torch.no_grad():
        t = teacher(batch["teacher_input"])
    expected = 4.0 * F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    assert _f(losses["kd"]) == pytest.approx(_f(expected), rel=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_params_runs_validate():
    import yaml

    params = yaml.safe_load(open("params.yaml"))
    for name in ("c2kd", "discom_kd", "mgkd"):
        cfg = dict(params["runs"][name])
        get_method(cfg.pop("method"), f"runs.{name}").validate(cfg, f"runs.{name}")


# ------------------------------------------------------------------ through cmkd.training.loop.fit


def _engine_data(n_features=8, n_classes=3):
    from cmkd.data.datasets.synthetic import ntdh_sklearn
    from cmkd.training.data import SplitData

    t, s, y = ntdh_sklearn(n_samples=300, n_features=n_features, n_classes=n_classes, gamma=0.5, seed=0)
    return (SplitData.from_arrays(teacher_input=t[:200], student_input=s[:200], target=y[:200]),
            SplitData.from_arrays(teacher_input=t[200:], student_input=s[200:], target=y[200:]))


def _params_of(net):
    return torch.cat([p.detach().flatten().clone() for p in net.parameters()])


def test_fit_c2kd_trains_student_and_teacher():
    from cmkd.training.config import TrainConfig
    from cmkd.training.distributed import seed_everything
    from cmkd.training.loop import fit

    train, val = _engine_data()
    seed_everything(0)
    student, teacher = (build_model({"arch": "mlp", "hidden": [16]}, (8,), 3),
                        build_model({"arch": "mlp", "hidden": [16]}, (8,), 3))
    d = build_distiller({"method": "c2kd"}, student, teacher, 3)
    before_t, before_s = _params_of(teacher), _params_of(student)
    result = fit(d, train, val, TrainConfig(epochs=2, batch_size=64), task="classification", num_classes=3,
                 ignore_index=None, progress=False)
    assert {"train/ofsd_student", "train/ofsd_teacher", "train/ce_teacher"} <= set(result.history[-1])
    assert not torch.equal(before_t, _params_of(teacher)) and not torch.equal(before_s, _params_of(student))


def test_fit_discom_kd_selects_on_student_and_both_deployables_evaluate():
    from cmkd.training.config import TrainConfig
    from cmkd.training.distributed import seed_everything
    from cmkd.training.evaluate import evaluate
    from cmkd.training.loop import fit

    train, val = _engine_data()
    seed_everything(0)
    d = build_distiller({"method": "discom_kd"}, build_model({"arch": "mlp", "hidden": [16]}, (8,), 3),
                        build_model({"arch": "mlp", "hidden": [16]}, (8,), 3), 3)
    result = fit(d, train, val, TrainConfig(epochs=2, batch_size=64), task="classification", num_classes=3,
                 ignore_index=None, progress=False)
    assert {"train/cl", "train/adv", "train/mod", "train/aux", "train/orth"} <= set(result.history[-1])
    student_val = evaluate(d.deployables()["student"][0], val, "student_input", task="classification", num_classes=3,
                           ignore_index=None)
    assert student_val["f1_weighted"] == pytest.approx(result.best_val["f1_weighted"])
    other = evaluate(d.deployables()["teacher_modality"][0], val, "teacher_input", task="classification", num_classes=3,
                     ignore_index=None)
    assert 0.0 <= other["accuracy"] <= 1.0


def test_mgkd_prepare_selects_retrains_and_freezes_the_teacher():
    from cmkd.training.config import TrainConfig
    from cmkd.training.distributed import seed_everything
    from cmkd.training.loop import fit

    train, val = _engine_data()
    seed_everything(0)
    d = build_distiller({"method": "mgkd", "pair_epochs": 20, "n_repeats": 2, "k_fraction": 0.25},
                        build_model({"arch": "mlp", "hidden": [16]}, (8,), 3),
                        build_model({"arch": "mlp", "hidden": [16]}, (8,), 3), 3)
    cfg = TrainConfig(epochs=2, batch_size=64)
    selection = d.prepare(train, val, cfg, task="classification", num_classes=3, ignore_index=None)
    assert selection["level"] == "input" and len(selection["channels"]) == 2 and len(selection["saliency"]) == 8
    assert isinstance(d.teacher, ChannelMasked) and d.teacher.mask.sum() == 2
    assert set(torch.nonzero(d.teacher.mask).flatten().tolist()) == set(selection["channels"])
    frozen = _params_of(d.teacher)
    fit(d, train, val, cfg, task="classification", num_classes=3, ignore_index=None, progress=False)
    assert torch.equal(frozen, _params_of(d.teacher.cpu()))


def test_pipeline_train_run_c2kd_and_discom_deployables(tmp_path):
    from cmkd.pipeline.train import train_run
    from cmkd.training.config import TrainConfig
    from tests.conftest import tiny_synthetic_file

    tiny_synthetic_file(tmp_path / "d.h5")
    models = {"teacher": {"arch": "mlp", "hidden": [16]}, "student": {"arch": "mlp", "hidden": [16]}}
    common = dict(dataset="synthetic", prepared=tmp_path / "d.h5", models=models,
                  train_cfg=TrainConfig(epochs=1, batch_size=64),
                  seeds=[0], checkpoint_root=None, progress=False)
    # C2KD through the pipeline: the pre-trained teacher is loaded and trained further (no cached logits)
    train_run(run_name="teacher", run_cfg={"method": "teacher"}, out_dir=tmp_path / "teacher",
              cache_train_logits=True, **common)
    c2kd = train_run(run_name="c2kd", run_cfg={"method": "c2kd"}, out_dir=tmp_path / "c2kd",
                     teacher_dir=tmp_path / "teacher", **common)
    assert set(c2kd["seeds"]["0"]["test"]) == {"student"}
    # NTDH's feature mask through the pipeline: prepare() runs Algorithm 1 and retrains the teacher
    feat = train_run(run_name="kdv1_ntdh_feat",
                     run_cfg={"method": "ntdh_mask", "mode": "both", "pair_epochs": 2, "n_repeats": 1,
                                                         "pair_batch_size": 64},
                     out_dir=tmp_path / "feat", teacher_dir=tmp_path / "teacher", **common)
    prepared = feat["seeds"]["0"]["prepare"]
    # keep_ratio auto on vector inputs: NTDH's sklearn code, its mask_dim (2) of the channels kept
    assert prepared["level"] == "input" and prepared["distance"] == "ntdh" and len(prepared["channels"]) == 2
    out = train_run(dataset="synthetic", prepared=tmp_path / "d.h5", run_name="discom_kd",
                    run_cfg={"method": "discom_kd"},
                    models=models, train_cfg=TrainConfig(epochs=1, batch_size=64), seeds=[0], out_dir=tmp_path / "out",
                    checkpoint_root=None, progress=False)
    assert set(out["seeds"]["0"]["test"]) == {"student", "teacher_modality"}
    assert ((tmp_path / "out" / "seed0" / "student.pt").exists()
            and (tmp_path / "out" / "seed0" / "teacher_modality.pt").exists())
