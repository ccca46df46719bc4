""""Will KD work here?": indicators measured before any student is distilled
(docs/diagnosis.md).

Everything here is computed from a TRAINED TEACHER and the NO-KD STUDENT on held-out data
(never from a KD student, which would not exist yet). Inputs may carry a leading slice
dimension: logits [S, N, C], target [S, N], features [S, N, D] give one value per slice in one
vectorised pass (the batched experiments of cmkd/experiments/analysis.py); [N, C] / [N] / [N, D] give one.

Indicators (which paper's hypothesis each measures):

- `acc_gap` teacher minus student accuracy, `agreement` share of rows where their argmax agree.
- `target_div`, `non_target_div`: NTDH's target and non-target divergence (its own form,
  0.5 [KL(m || p_s) + KL(m || p_t)]) between teacher and student (NTDH: KD helps when the
  non-target divergence is small).
- `teacher_ece`, `student_ece`: expected calibration error (top-label, L1, equal-width bins,
  torchmetrics' binning) - C2KD's concern that soft labels are unreliable across modalities.
- `probe_r2`: the cross-modal complementarity probe: how well a ridge map from the student's
  features predicts the teacher's log-probabilities *beyond the hard label* (the teacher's
  log-probs minus the mean teacher log-prob vector of the row's true class), R^2 on a held-out
  half. High: the teacher's soft labels carry label-free information the student modality can
  see (arXiv 2510.13182: KD helps then).
- `general_r2`: a cheap estimate of MFH's modality-general share: R^2 of a ridge map from the
  student's features to the teacher's logits (held-out half). Algorithm 1 ranks teacher channels
  by how much permuting them changes the teacher-student distance of a jointly trained pair;
  the teacher decision that is linearly predictable from the student modality is the part built
  on modality-general features, so both grow with the true share (the validation stage checks
  the rank agreement with the known share on the mfh_alg1 sweep).

The predictor of the KD gain from them: cmkd/diagnosis/predictor.py.
"""

from __future__ import annotations

from typing import Any

import torch

from cmkd.losses import non_target_divergence, target_divergence

INDICATORS = ("teacher_acc", "student_acc", "acc_gap", "agreement", "target_div", "non_target_div",
              "teacher_ece", "student_ece", "probe_r2", "general_r2")
MIN_PROBE_ROWS = 4


# --------------------------------------------------------------------------- indicators

def _batched(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, bool]:
    """Add a leading slice dimension when `x` has only `dims` dimensions."""
    x = torch.as_tensor(x)
    return (x.unsqueeze(0), True) if x.dim() == dims else (x, False)


def calibration_error(logits: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Top-label L1 expected calibration error per slice: logits [S, N, C], target [S, N] -> [S].

    The binning is torchmetrics' (`multiclass_calibration_error`, norm l1): confidences
    bucketised on linspace(0, 1, n_bins + 1), right-closed; here for all slices at once by
    scatter_add into [S, n_bins] (tests compare with torchmetrics slice by slice)."""
    probs = logits.double().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == target).double()
    bounds = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    idx = (torch.bucketize(conf, bounds, right=True) - 1).clamp(0, n_bins - 1)
    s = conf.shape[0]
    conf_sum = torch.zeros(s, n_bins, dtype=conf.dtype).scatter_add_(1, idx, conf)
    acc_sum = torch.zeros(s, n_bins, dtype=conf.dtype).scatter_add_(1, idx, correct)
    return (conf_sum - acc_sum).abs().sum(1) / conf.shape[1]


def _standardise(fit: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = fit.mean(1, keepdim=True)
    std = fit.std(1, keepdim=True).clamp_min(1e-8)
    return (fit - mean) / std, (other - mean) / std


def ridge_r2(x: torch.Tensor, y: torch.Tensor, penalty: float = 1.0) -> torch.Tensor:
    """Per slice: ridge from x [S, N, D] to y [S, N, K] fit on the even rows, R^2 on the odd rows
    (1 - SSE / SS around the fit rows' mean, pooled over the K outputs). Batched solve. [S]."""
    x, y = x.double(), y.double()
    xf, xh = _standardise(x[:, 0::2], x[:, 1::2])
    yf, yh = y[:, 0::2], y[:, 1::2]
    y_mean = yf.mean(1, keepdim=True)
    d = xf.shape[2]
    gram = xf.transpose(1, 2) @ xf + penalty * torch.eye(d, dtype=xf.dtype)
    w = torch.linalg.solve(gram, xf.transpose(1, 2) @ (yf - y_mean))
    pred = xh @ w + y_mean
    sse = (yh - pred).pow(2).sum((1, 2))
    sst = (yh - y_mean).pow(2).sum((1, 2)).clamp_min(1e-12)
    return 1.0 - sse / sst


def residual_soft_labels(teacher_logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Teacher log-probs minus the mean teacher log-prob vector of each row's true class, the
    class means taken over the even (fit) rows only: what the soft label says beyond the label.
    [S, N, C] -> [S, N, C]."""
    logp = teacher_logits.double().log_softmax(-1)
    onehot = torch.nn.functional.one_hot(target, num_classes).double()  # [S, N, C]
    fit_hot, fit_logp = onehot[:, 0::2], logp[:, 0::2]
    sums = fit_hot.transpose(1, 2) @ fit_logp  # [S, C(class), C]
    counts = fit_hot.sum(1).unsqueeze(-1)  # [S, C, 1]
    means = torch.where(counts > 0, sums / counts.clamp_min(1), fit_logp.mean(1, keepdim=True))
    return logp - onehot @ means


@torch.no_grad()
def indicators(teacher_logits: torch.Tensor, student_logits: torch.Tensor, target: torch.Tensor,
               student_features: torch.Tensor | None = None, *, temperature: float = 1.0, ece_bins: int = 15,
               probe_penalty: float = 1.0) -> dict[str, Any]:
    """The indicators of one teacher / no-KD student pair on held-out rows, or of S pairs at once.

    teacher_logits, student_logits: [N, C] or [S, N, C]; target: [N] or [S, N];
    student_features: [N, D] or [S, N, D] (the student's penultimate features; its logits when
    None). Returns {name: float} for unbatched input, {name: np.ndarray [S]} for batched.
    Rows whose target is negative (ignore) must be removed by the caller.
    """
    zt, single = _batched(teacher_logits, 2)
    zs, _ = _batched(student_logits, 2)
    y, _ = _batched(target, 1)
    y = y.long()
    if zt.shape != zs.shape or zt.shape[:2] != y.shape:
        raise ValueError(f"teacher logits {tuple(zt.shape)}, student logits {tuple(zs.shape)} and target "
                         f"{tuple(y.shape)} do not match")
    s, n, c = zt.shape
    if n < MIN_PROBE_ROWS:
        raise ValueError(f"need at least {MIN_PROBE_ROWS} rows, got {n}")
    feats = zs if student_features is None else _batched(student_features, 2)[0]
    feats = feats.reshape(s, n, -1)
    pred_t, pred_s = zt.argmax(-1), zs.argmax(-1)
    out = {
        "teacher_acc": (pred_t == y).double().mean(1),
        "student_acc": (pred_s == y).double().mean(1),
        "agreement": (pred_t == pred_s).double().mean(1),
    }
    out["acc_gap"] = out["teacher_acc"] - out["student_acc"]
    rows_t, rows_s, rows_y = zt.reshape(-1, c), zs.reshape(-1, c), y.reshape(-1)
    out["target_div"] = target_divergence(rows_s, rows_t, rows_y,
                                          temperature, form="ntdh").reshape(s, n).double().mean(1)
    out["non_target_div"] = non_target_divergence(rows_s, rows_t, rows_y,
                                                  temperature, form="ntdh").reshape(s, n).double().mean(1)
    out["teacher_ece"] = calibration_error(zt, y, ece_bins)
    out["student_ece"] = calibration_error(zs, y, ece_bins)
    out["probe_r2"] = ridge_r2(feats, residual_soft_labels(zt, y, c), probe_penalty)
    out["general_r2"] = ridge_r2(feats, zt, probe_penalty)
    out = {k: out[k].numpy() for k in INDICATORS}
    return {k: float(v[0]) for k, v in out.items()} if single else out
