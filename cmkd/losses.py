"""Loss functions shared by the methods. Pure functions of tensors.

Conventions: logits are [N, C] (classification) or [N, C, H, W] (segmentation); `mask` is an
optional [N] / [N, H, W] tensor of booleans or non-negative per-sample weights; a masked mean
divides by the mask's sum (the number of valid samples or pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [N, C]; [N, C, H, W] -> [N*H*W, C] (one row per pixel)."""
    if logits.dim() == 2:
        return logits
    c = logits.shape[1]
    return logits.movedim(1, -1).reshape(-1, c)


def mask_rows(mask: torch.Tensor | None, n_rows: int, device: torch.device) -> torch.Tensor:
    """Flatten a sample/pixel mask to one float weight per row (ones when `mask` is None)."""
    if mask is None:
        return torch.ones(n_rows, device=device)
    w = mask.reshape(-1).to(device=device, dtype=torch.float32)
    if w.numel() != n_rows:
        raise ValueError(f"mask has {w.numel()} entries for {n_rows} logit rows")
    return w


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of per-row values; 0 (with gradient) when every weight is 0."""
    total = weights.sum()
    return (values * weights).sum() / total.clamp_min(1e-12)


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(p_t || p_s) with p = softmax(z / T)."""
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton KD: T^2 * KL(p_t || p_s), mean over samples (or valid pixels)."""
    s, t = to_rows(student_logits), to_rows(teacher_logits)
    per_row = kl_rows(s, t, temperature) * temperature**2
    return masked_mean(per_row, mask_rows(mask, s.shape[0], s.device))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over samples or valid pixels. Negative targets are ignored."""
    rows = to_rows(logits)
    t = target.reshape(-1)
    valid = (t >= 0).float()
    weights = valid if mask is None else valid * mask_rows(mask, rows.shape[0], rows.device)
    per_row = F.cross_entropy(rows, t.clamp_min(0).long(), reduction="none")
    return masked_mean(per_row, weights)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """LSKD: z-score each sample's (pixel's) logits over the class dimension."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def kendall_tau(a: torch.Tensor, b: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Per-row Kendall rank correlation (tau-b, ties handled) of two [N, C] tensors -> [N].

    tau_b = sum_{i<j} s_a s_b / sqrt((n0 - t_a)(n0 - t_b)) with s = sign(x_i - x_j), n0 the
    number of pairs and t the pairs tied in a (resp. b); computed from [N, C, C] sign matrices
    on the tensors' device, in row chunks of at most `chunk_elements` entries. A row that is
    constant in `a` or `b` has no ranking: its tau is NaN (as scipy.stats.kendalltau), and
    NaN compares False with any threshold. No gradient flows (ranks are piecewise constant).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"kendall_tau needs two [N, C] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    # float64 stays float64; anything else is ranked in float32 (sums of +-1 are exact below 2^24)
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    n, c = a.shape
    rows = max(1, chunk_elements // max(1, c * c))
    out = torch.empty(n, dtype=dtype, device=a.device)
    for start in range(0, n, rows):
        sa = _pairwise_signs(a[start:start + rows])
        sb = _pairwise_signs(b[start:start + rows])
        # Over ordered pairs every count doubles; the ratio is unchanged.
        untied_a = torch.count_nonzero(sa, dim=(1, 2)).to(dtype)
        untied_b = torch.count_nonzero(sb, dim=(1, 2)).to(dtype)
        concordance = sa.mul_(sb).sum(dim=(1, 2))
        out[start:start + rows] = concordance / (untied_a * untied_b).sqrt()  # 0/0 -> NaN
    return out


def _pairwise_signs(x: torch.Tensor) -> torch.Tensor:
    """[n, C] -> [n, C, C] matrix of sign(x_i - x_j)."""
    return (x.unsqueeze(2) - x.unsqueeze(1)).sign_()
