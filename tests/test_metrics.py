import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from cmkd.training.metrics import MetricAccumulator


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 2 * np.eye(4)[target] * (rng.random(200) < 0.6)[:, None]
    acc = MetricAccumulator("classification", 4)
    for s in range(0, 200, 64):  # batch by batch
        acc.update(torch.tensor(logits[s:s + 64]), torch.tensor(target[s:s + 64]))
    out = acc.compute()
    preds = logits.argmax(1)
    assert abs(out["f1_weighted"] - f1_score(target, preds, average="weighted")) < 1e-6
    assert abs(out["accuracy"] - accuracy_score(target, preds)) < 1e-6


def test_miou_ignores_pixels_and_absent_classes():
    # 1 image 2x3, 4 classes; -1 pixels are ignored; class 3 never occurs.
    target = torch.tensor([[[0, 0, 1], [2, -1, 1]]])
    preds = torch.tensor([[[0, 1, 1], [2, 3, 0]]])
    logits = torch.nn.functional.one_hot(preds, 4).permute(0, 3, 1, 2).float()
    acc = MetricAccumulator("segmentation", 4, ignore_index=-1)
    acc.update(logits, target)
    out = acc.compute()
    # By hand over the 5 valid pixels: class0 tp1 fp1 fn1 -> 1/3; class1 tp1 fp1 fn1 -> 1/3; class2 -> 1.
    assert abs(out["miou"] - (1 / 3 + 1 / 3 + 1) / 3) < 1e-9
    assert abs(out["accuracy"] - 3 / 5) < 1e-9
    assert out["iou_per_class"][3] is None
