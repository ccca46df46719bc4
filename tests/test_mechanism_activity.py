"""Mechanism-activity records (cmkd.training.activity): each counter against a hand-computed case,
inert detection, the table's marker, and that recording changes no loss or gradient."""

from __future__ import annotations

import json

import pytest
import torch

from cmkd.methods import build_distiller
from cmkd.methods.mfh import ChannelMasked, channel_mask
from cmkd.methods.ntdh import NonTargetSampleMask, PSSMSampleMask
from cmkd.models import build_model
from cmkd.reporting.tables import INERT_MARK, collect, markdown_table, metrics_summary
from cmkd.training.activity import INERT_BELOW, ActivityCounter, MechanismSpec, part_record, summarise
from cmkd.training.config import TrainConfig
from cmkd.training.data import SplitData
from cmkd.training.distributed import seed_everything
from cmkd.training.loop import fit
from tests.test_methods_dkd_ctkd_mlkd_ntdh import TinySeg, classification_setup, segmentation_setup

C = 4
SPEC = MechanismSpec("mask", "passed", "valid training rows", "the base method")


def test_counter_counts_affected_valid_rows_and_resets():
    counter = ActivityCounter(SPEC)
    counter.add(torch.tensor([True, False, True, True]), torch.tensor([True, True, True, False]))
    counter.add(torch.tensor([[False, True], [True, True]]), torch.tensor([[True, True], [False, True]]))
    assert counter.take() == [2 + 2, 3 + 3]
    assert counter.unit() == "valid training pixels"  # a 2-D mask: pixels
    assert counter.take() == [0, 0]


def test_pssm_counts_rows_weighted_other_than_one():
    # rows: teacher right (1), wrong with cos 1 (weight (1 + 1) / 2 = 1: unchanged), wrong with
    # cos 0.9997 >= 0.99 ((1 + cos) / 2 < 1), wrong with cos 0 (weight 0), ignored (not counted)
    teacher = torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 3.0, 0.05, 0], [0, 0, 2.0, 0], [1.0, 0, 0, 0]])
    student = torch.tensor([[1.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 3.0, 0.0, 0], [2.0, 0, 0, 0], [1.0, 0, 0, 0]])
    target = torch.tensor([0, 0, 0, 0, -1])
    hook = PSSMSampleMask(cos_threshold=0.99)
    weights = hook({"target": target}, student, teacher)
    assert weights[0] == 1 and weights[1] == 1 and 0 < weights[2] < 1 and weights[3] == 0
    assert hook.activity.take() == [2, 4]


def test_sample_drop_counts_dropped_rows_and_is_inert_at_down_weight_one():
    student, teacher = torch.randn(8, C, generator=torch.Generator().manual_seed(0)), torch.zeros(8, C)
    target = torch.tensor([0, 1, 2, 3, 0, 1, -1, -1])
    drop = NonTargetSampleMask(drop_ratio=0.5, drop_wrong=False, down_weight=0.0)
    drop({"target": target}, student, teacher)
    assert drop.activity.take() == [3, 6]  # floor(0.5 * 6 valid rows)
    keep = NonTargetSampleMask(drop_ratio=0.5, drop_wrong=False, down_weight=1.0)
    keep({"target": target}, student, teacher)
    assert keep.activity.take() == [0, 6]


def test_mlkd_counts_valid_pixels_the_confidence_mask_passes():
    student, teacher, batch = segmentation_setup()
    distiller = build_distiller({"method": "mlkd", "strong_aug": False}, student, teacher, C)
    # teacher logits: confident (max p = e^3 / (e^3 + 3) = 0.87) on pixels of column 0, uniform elsewhere
    logits = torch.zeros(3, C, 5, 6)
    logits[:, 1, :, 0] = 3.0
    batch = {**batch, "teacher_logits": logits}
    distiller(batch)
    valid = batch["target"] >= 0
    assert distiller.take_activity() == {"confidence_mask": [int(valid[:, :, 0].sum()), int(valid.sum())]}
    parts = distiller.mechanism_parts({"confidence_mask": [5, 80]})
    assert parts[0]["unit"] == "valid training pixels" and parts[0]["active_share"] == 5 / 80


def test_c2kd_counts_the_rows_ofsd_keeps():
    student = build_model({"arch": "mlp", "hidden": [16]}, (5,), C)
    teacher = build_model({"arch": "mlp", "hidden": [16]}, (7,), C)
    _, _, batch = classification_setup()
    distiller = build_distiller({"method": "c2kd", "threshold": 0.2}, student, teacher, C)
    distiller(batch)
    affected, total = distiller.take_activity()["ofsd"]
    assert total == 11  # 12 rows, one ignored
    assert affected == round(distiller.last_kept_fraction * total)


def test_channel_masks_count_removed_channels():
    student, teacher, _ = classification_setup()
    mgkd = build_distiller({"method": "mgkd"}, student, teacher, C)
    mgkd.set_teacher(ChannelMasked(teacher, channel_mask([0, 2, 5], 7), "input"))
    (part,) = mgkd.mechanism_parts({})
    assert (part["affected"], part["total"], part["unit"]) == (4, 7, "teacher input channels")
    mgkd.set_teacher(ChannelMasked(teacher, channel_mask(list(range(7)), 7), "input"))  # k_fraction 1.0
    record = summarise([mgkd.mechanism_parts({})])
    assert record["inert"] and record["active_share"] == 0.0 and "removed 0 of 7 teacher input channels" in \
        record["reason"]
    ntdh = build_distiller({"method": "ntdh_mask", "mode": "both"}, student, teacher, C)
    ntdh.set_teacher(ChannelMasked(teacher, channel_mask([1], 7), "input"))
    parts = ntdh.mechanism_parts({"sample_mask": [0, 100]})
    assert [p["name"] for p in parts] == ["NTDH feature mask", "PSSM sample mask"]
    both = summarise([parts])
    assert not both["inert"] and both["active_share"] == 6 / 7  # inert only when every part is


def test_inert_below_the_declared_share_summed_over_seeds():
    def record(affected, total):
        return [part_record(SPEC, affected, total)]

    assert INERT_BELOW == 0.01
    active = summarise([record(6, 500), record(4, 500)])  # 10 of 1000 = 1 %
    assert not active["inert"] and active["reason"] == "" and active["active_share"] == 0.01
    inert = summarise([record(5, 500), record(4, 500)])
    assert inert["inert"] and inert["reason"] == "mask passed 9 of 1000 valid training rows (0.90%; inert below 1%)"
    assert set(inert) >= {"name", "active_share", "inert", "reason"} and inert["measures"] == "the base method"
    assert summarise([[], []]) is None


def _seg_split(n, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (n, 6, 8), generator=g)
    target[:, 0] = -1
    return SplitData.from_arrays(student_input=torch.randn(n, 2, 6, 8, generator=g),
                                 teacher_input=torch.randn(n, 3, 6, 8, generator=g), target=target)


def test_mlkd_run_whose_teacher_is_never_confident_records_inert(one_thread):
    """A teacher that knows nothing (all logits equal: max p = 1 / C = 0.25 < 0.5) passes no pixel:
    the run distils nothing, and its record says so."""
    seed_everything(0)
    student, teacher = TinySeg(2, C), TinySeg(3, C)
    with torch.no_grad():
        for p in teacher.head.parameters():
            p.zero_()
    distiller = build_distiller({"method": "mlkd", "confidence_threshold": 0.5}, student, teacher, C)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01, optimizer="adam", seed=0)
    result = fit(distiller, _seg_split(12, 0), _seg_split(4, 1), cfg, task="segmentation", num_classes=C,
                 progress=False)
    valid_pixels = 2 * 12 * 5 * 8  # two epochs, one ignored row of 8 per image
    assert result.activity == {"confidence_mask": [0, valid_pixels]}
    record = summarise([distiller.mechanism_parts(result.activity)])
    assert record["inert"] and record["active_share"] == 0.0
    assert record["reason"].startswith(f"MLKD confidence mask passed 0 of {valid_pixels} valid training pixels")
    assert record["measures"] == "CE on the student's views, no distillation"


def _step(cfg, setup, recording: bool, monkeypatch, teacher_channels=None):
    """One forward/backward: the losses and the student's gradients."""
    if not recording:
        monkeypatch.setattr(ActivityCounter, "add", lambda self, affected, considered: None)
    torch.manual_seed(0)
    student, teacher, batch = setup()
    distiller = build_distiller(cfg, student, teacher, C)
    distiller.train()
    torch.manual_seed(1)  # the strong view's draws
    losses = distiller(batch)
    sum(losses.values()).backward()
    monkeypatch.undo()
    return ({k: v.detach() for k, v in losses.items()},
            [p.grad.clone() for p in student.parameters() if p.grad is not None])


@pytest.mark.parametrize("cfg", [
    {"method": "mlkd", "confidence_threshold": 0.3, "strong_aug": True},
    {"method": "ntdh_mask", "base": {"method": "kd"}, "mode": "sample", "cos_threshold": 0.0},
    {"method": "ntdh_mask", "base": {"method": "dkd"}, "mode": "sample_drop"},
], ids=["mlkd", "pssm", "sample_drop"])
@pytest.mark.parametrize("setup", [classification_setup, segmentation_setup], ids=["cls", "seg"])
def test_recording_changes_no_loss_or_gradient(cfg, setup, monkeypatch):
    with_losses, with_grads = _step(cfg, setup, True, monkeypatch)
    without_losses, without_grads = _step(cfg, setup, False, monkeypatch)
    assert with_losses.keys() == without_losses.keys()
    assert all(torch.equal(with_losses[k], without_losses[k]) for k in with_losses)  # bit for bit
    assert len(with_grads) == len(without_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(with_grads, without_grads))


def test_c2kd_recording_changes_no_loss(monkeypatch):
    def step(recording):
        if not recording:
            monkeypatch.setattr(ActivityCounter, "add", lambda self, affected, considered: None)
        torch.manual_seed(0)
        student = build_model({"arch": "mlp", "hidden": [16]}, (5,), C)
        teacher = build_model({"arch": "mlp", "hidden": [16]}, (7,), C)
        _, _, batch = classification_setup()
        losses = build_distiller({"method": "c2kd"}, student, teacher, C)(batch)
        sum(losses.values()).backward()
        monkeypatch.undo()
        return losses, [p.grad.clone() for p in student.parameters()]

    (a, ga), (b, gb) = step(True), step(False)
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def _run_metrics(path, run, method, values, mechanism=None):
    seeds = {str(s): {"test": {"student" if run != "student" else "model": {"f1_weighted": v}}}
             for s, v in enumerate(values)}
    metrics = {"task": "classification", "run": run, "method": method, "seeds": seeds}
    if mechanism is not None:
        metrics["mechanism"] = mechanism
    (path / run).mkdir(parents=True)
    (path / run / "metrics.json").write_text(json.dumps(metrics))
    return path / run


def test_table_marks_inert_rows_and_collect_carries_the_record(tmp_path):
    inert = {"name": "PSSM sample mask", "active_share": 0.0, "inert": True,
             "reason": "PSSM sample mask reweighted (weight != 1) 0 of 900 valid training rows (0.00%; inert below 1%)",
             "measures": "the wrapped method without PSSM"}
    active = {**inert, "name": "MLKD confidence mask", "active_share": 0.8, "inert": False, "reason": ""}
    dirs = [_run_metrics(tmp_path, "student", "supervised", [0.5, 0.6, 0.55]),
            _run_metrics(tmp_path, "kdv1_ntdh", "ntdh_mask", [0.52, 0.61, 0.56], inert),
            _run_metrics(tmp_path, "mlkd", "mlkd", [0.53, 0.62, 0.57], active),
            _run_metrics(tmp_path, "kdv1", "kd", [0.52, 0.61, 0.56])]
    report = collect(dirs)
    assert report["rows"]["kdv1_ntdh"]["mechanism"] == inert
    assert report["rows"]["mlkd"]["mechanism"]["inert"] is False
    assert "mechanism" not in report["rows"]["kdv1"] and "mechanism" not in report["rows"]["student"]
    assert all("mechanism" not in entry for entry in metrics_summary(report).values())  # metrics/ unchanged
    table = markdown_table(report, "tiny", ("a", "b"))
    row_lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert f"| kdv1_ntdh {INERT_MARK}1" in row_lines and "| mlkd" in row_lines and "| kdv1" in row_lines
    assert table.count(INERT_MARK) == 2  # the mark and its one footnote
    assert (f"{INERT_MARK}1 kdv1_ntdh: mechanism inert: {inert['reason']}; this row measures the wrapped method "
            "without PSSM") in table
