"""Metrics, computed with torchmetrics: weighted F1 and accuracy (classification); mIoU with
an ignore index and pixel accuracy (segmentation)."""

from __future__ import annotations

import torch


class MetricAccumulator:
    """Accumulate predictions batch by batch; `compute()` returns plain floats."""

    def __init__(self, task: str, num_classes: int, ignore_index: int | None = -1, device: torch.device | str = "cpu"):
        # Imported here, where metrics are computed: torchmetrics imports scipy.signal and
        # matplotlib (slow to import), which stages that only read params or results do not need.
        from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

        self.task = task
        self.num_classes = num_classes
        if task == "classification":
            self.f1 = MulticlassF1Score(num_classes, average="weighted").to(device)
            self.acc = MulticlassAccuracy(num_classes, average="micro").to(device)
        elif task == "segmentation":
            # The confusion matrix gives IoU per class; mIoU averages the classes that occur
            # (non-empty union), so a scene without, e.g., bicycles is not scored 0 for them.
            self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index).to(device)
        else:
            raise ValueError(f"unknown task {task!r}")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        preds = logits.argmax(dim=1)
        if self.task == "classification":
            self.f1.update(preds, target)
            self.acc.update(preds, target)
        else:
            self.confusion.update(preds, target.long())

    def compute(self) -> dict[str, float]:
        if self.task == "classification":
            return {"f1_weighted": float(self.f1.compute()), "accuracy": float(self.acc.compute())}
        cm = self.confusion.compute().double()
        return segmentation_scores(cm)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU (over classes present in prediction or ground truth), pixel accuracy, per-class IoU."""
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
    total = confusion.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "iou_per_class": [float(v) if p else None for v, p in zip(iou, present)],
    }


def primary_metric(task: str) -> str:
    """The metric tables report and model selection maximises."""
    return "f1_weighted" if task == "classification" else "miou"
