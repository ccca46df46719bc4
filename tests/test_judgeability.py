"""Can a dataset's KD rows be judged (cmkd/reporting/judgeability.py)? The chance levels against
the project's own metrics on the exact confusion matrices of the label-blind guesses, the rule on
constructed reports (a teacher below chance, below STUDENT, or far above both), and the note in
the table and the diagnosis."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from cmkd.diagnosis.report import dataset_report, diagnosis_markdown
from cmkd.reporting.judgeability import (
    NOTE,
    chance_level,
    chance_levels,
    judgeability,
    judgeability_note,
    split_class_counts,
)
from cmkd.reporting.tables import markdown_table
from cmkd.training.metrics import MetricAccumulator, segmentation_scores

SEEDS = ["0", "1", "2", "3", "4"]


def _from_confusion(confusion: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(one-hot logits, targets) whose confusion matrix (rows: truth, columns: prediction) is `confusion`."""
    truth, pred = [], []
    for i, j in np.ndindex(confusion.shape):
        truth += [i] * int(confusion[i, j])
        pred += [j] * int(confusion[i, j])
    return torch.nn.functional.one_hot(torch.tensor(pred), confusion.shape[0]).float(), torch.tensor(truth)


def _expected_confusions(counts: np.ndarray) -> dict[str, np.ndarray]:
    """The guesses' expected confusion matrices; `counts` chosen so that they are integers."""
    k, p = len(counts), counts / counts.sum()
    majority = np.zeros((k, k))
    majority[:, np.argmax(counts)] = counts
    return {"majority": majority, "uniform": np.outer(counts, np.full(k, 1 / k)), "proportional": np.outer(counts, p)}


@pytest.mark.parametrize("counts", [[3, 3, 3], [3, 1, 1], [3, 1, 2, 4]])
def test_chance_levels_are_the_metrics_of_the_guesses_confusion_matrices(counts):
    counts = np.asarray(counts, dtype=np.float64) * len(counts) * sum(counts)  # integer expected confusions
    levels_cls, levels_seg = chance_levels(counts, "classification"), chance_levels(counts, "segmentation")
    for guess, confusion in _expected_confusions(counts).items():
        assert np.allclose(confusion, np.round(confusion))
        logits, target = _from_confusion(np.round(confusion))
        acc = MetricAccumulator("classification", len(counts))
        acc.update(logits, target)
        assert levels_cls[guess] == pytest.approx(acc.compute()["f1_weighted"], abs=1e-6), guess
        miou = segmentation_scores(torch.as_tensor(np.round(confusion), dtype=torch.float64))["miou"]
        assert levels_seg[guess] == pytest.approx(miou, abs=1e-9), guess


def test_chance_level_of_balanced_classes_is_one_over_k():
    assert chance_level([7] * 10, "classification") == pytest.approx(0.1)
    # the majority guess of skewed classes beats the uniform one, and chance is the best guess
    skewed = chance_levels([90, 5, 5], "classification")
    assert chance_level([90, 5, 5], "classification") == max(skewed.values()) == skewed["majority"] > 1 / 3
    with pytest.raises(ValueError, match="class counts"):
        chance_level([0, 0], "classification")
    with pytest.raises(ValueError, match="unknown task"):
        chance_level([1, 2], "detection")


def _row(values, method="supervised"):
    values = [v / 100 for v in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"method": method, "f1_weighted": {"mean": float(np.mean(values)), "std": std,
                                              "values": values, "n": len(values), "seeds": SEEDS[:len(values)]}}


def _report(teacher, student, kd=None):
    rows = {"teacher": _row(teacher), "student": _row(student)}
    if kd is not None:
        rows["kdv1"] = _row(kd, "kd")
    return {"task": "classification", "metric": "f1_weighted", "rows": rows, "provenance": None}


BALANCED = {s: [20] * 10 for s in SEEDS}  # 10 classes: chance 10.00


def test_a_teacher_below_chance_and_below_the_student_is_not_judgeable():
    """sunrgbd-sample's numbers: TEACHER 3.38, STUDENT 17.91 weighted F1 on 10 classes."""
    report = _report([3.1, 3.5, 3.2, 3.6, 3.5], [17.0, 18.5, 17.9, 18.2, 17.95], kd=[16, 17, 18, 19, 17])
    record = judgeability(report, BALANCED)
    assert not record["judgeable"] and not record["above_chance"] and not record["above_student"]
    assert record["chance"] == pytest.approx(0.1) and record["teacher"] == pytest.approx(0.0338)
    assert record["teacher_vs_chance"]["ci95"][1] < 0 and record["teacher_vs_student"]["n"] == 5
    note = judgeability_note(record)
    assert note.startswith("**Nothing can be judged here:** the teacher (3.38) is not above chance (10.00; ")
    assert "/ not above the student (17.91; " in note and "every KD row distils noise" in note
    report["judgeability"] = record
    table = markdown_table(report, "sunrgbd-sample", ("rgbd", "rgb"), "**Smoke test.**\n\n")
    assert table.startswith(note + "**Smoke test.**\n\n### sunrgbd-sample")
    diagnosis = {"dataset": "sunrgbd-sample", "split": "val", "seeds": [0, 1], "indicators": {"acc_gap": -0.1},
                 "predicted_kd_gain": {"mean": 0.01, "ci95": [-0.02, 0.04]}, "judgeability": record}
    assert note.rstrip() in diagnosis_markdown(diagnosis)
    assert note.rstrip() in diagnosis_markdown(dataset_report(diagnosis, None))


def test_a_teacher_above_chance_but_not_above_the_student_is_not_judgeable():
    record = judgeability(_report([30, 32, 31, 29, 30], [30, 33, 30, 31, 29]), BALANCED)
    assert record["above_chance"] and not record["above_student"] and not record["judgeable"]
    note = judgeability_note(record)
    assert "not above chance" not in note and "is not above the student (30.60; paired difference -0.20" in note


def test_a_teacher_far_above_chance_and_the_student_leaves_the_table_unchanged():
    """synthetic and digits: no note; the table is the one without a record."""
    report = _report([90, 91, 92, 90.5, 91], [70, 72, 71, 69, 70], kd=[75, 76, 74, 75, 77])
    plain = markdown_table(report, "synthetic", ("a", "b"))
    report["judgeability"] = judgeability(report, {s: [50, 30, 20] for s in SEEDS})
    assert report["judgeability"]["judgeable"] and report["judgeability"]["rule"].startswith("judge")
    assert judgeability_note(report["judgeability"]) == ""
    assert markdown_table(report, "synthetic", ("a", "b")) == plain
    diagnosis = {"dataset": "synthetic", "split": "val", "seeds": [0], "indicators": {},
                 "judgeability": report["judgeability"]}
    assert "Nothing can be judged" not in diagnosis_markdown(diagnosis)


def test_the_interval_not_the_mean_decides_and_one_seed_decides_by_the_point_difference():
    # mean 1.4 points above chance, but the seeds scatter: the paired lower bound is below 0
    noisy = judgeability(_report([2, 20, 4, 18, 13], [1, 1, 1, 1, 1]), BALANCED)
    assert noisy["teacher"] > noisy["chance"] and noisy["teacher_vs_chance"]["ci95"][0] < 0
    assert not noisy["judgeable"]
    one = judgeability(_report([40], [20]), BALANCED)
    assert one["judgeable"] and one["teacher_vs_chance"]["ci95"] is None and "one seed" in one["rule"]
    assert "(one seed)" in judgeability_note(judgeability(_report([40], [50]), BALANCED))


def test_segmentation_chance_is_the_miou_of_the_guesses():
    """semantickitti-sample's numbers: TEACHER 4.14 below STUDENT 5.07 mIoU."""
    report = _report([4.0, 4.3, 4.1, 4.2, 4.1], [5.0, 5.1, 5.2, 4.9, 5.15])
    report.update(task="segmentation", metric="miou")
    for row in report["rows"].values():
        row["miou"] = row.pop("f1_weighted")
    counts = {s: [5000, 3000, 1000, 500, 0] for s in SEEDS}
    record = judgeability(report, counts)
    assert record["chance"] == pytest.approx(chance_level(counts["0"], "segmentation"))
    assert not record["above_student"] and not record["judgeable"] and record["metric"] == "miou"
    assert "miou × 100" in judgeability_note(record)


def test_no_record_without_both_baselines_and_an_error_for_missing_counts():
    report = _report([50, 51], [40, 41])
    del report["rows"]["teacher"]
    assert judgeability(report, BALANCED) is None and judgeability_note(None) == ""
    with pytest.raises(ValueError, match=r"seed\(s\) \['4'\]"):
        judgeability(_report([50] * 5, [40] * 5), {s: [1, 1] for s in SEEDS[:4]})
    assert "{teacher}" in NOTE


def split_class_counts_from_the_prepared_file(tmp_path):
    from cmkd.data.h5 import PreparedSplit
    from tests.conftest import tiny_synthetic_file

    path = tiny_synthetic_file(tmp_path / "d.h5")
    labels = PreparedSplit(path, "test").load(["labels"])["labels"]
    counts = split_class_counts(path, [0, 3])
    assert counts["0"] == counts["3"] == np.bincount(labels, minlength=3).tolist() and sum(counts["0"]) == 50


def test_the_record_from_trained_runs_as_the_stages_read_them(tmp_path, one_thread):
    """evaluate's and diagnose's path: the runs' own metrics.json (collect) and the prepared test split."""
    from cmkd.config import STUDENT_RUN, TEACHER_RUN
    from cmkd.pipeline.train import train_run
    from cmkd.reporting.tables import collect
    from cmkd.training.config import TrainConfig
    from tests.conftest import tiny_synthetic_file

    path = tiny_synthetic_file(tmp_path / "d.h5")
    models = {"teacher": {"arch": "mlp", "hidden": [16]}, "student": {"arch": "mlp", "hidden": [16]}}
    common = dict(dataset="synthetic", prepared=path, models=models, train_cfg=TrainConfig(epochs=3, batch_size=32),
                  seeds=[0, 1], checkpoint_root=None, progress=False)
    train_run(run_name="teacher", run_cfg=TEACHER_RUN, out_dir=tmp_path / "teacher", **common)
    train_run(run_name="student", run_cfg=STUDENT_RUN, out_dir=tmp_path / "student", **common)
    report = collect([tmp_path / "teacher", tmp_path / "student"])
    record = judgeability(report, split_class_counts(path, [0, 1]))
    assert record["seeds"] == ["0", "1"] and record["teacher_vs_student"]["n"] == 2
    teacher = report["rows"]["teacher"]["f1_weighted"]
    assert record["teacher"] == pytest.approx(teacher["mean"])
    with h5py.File(path, "r") as f:
        labels = np.bincount(f["test/labels"][()], minlength=3)
    assert record["chance"] == pytest.approx(chance_level(labels, "classification"))
