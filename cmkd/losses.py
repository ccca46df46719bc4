"""Loss functions shared by the methods. Pure functions of tensors.

Conventions: logits are [N, C] (classification) or [N, C, H, W] (segmentation); `mask` is an
optional [N] / [N, H, W] tensor of booleans or non-negative per-sample weights; a masked mean
divides by the mask's sum (the number of valid samples or pixels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmkd.utils import exactmath


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
    # float weights keep their precision (float64 inputs stay exact); bools become 0/1 floats
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    w = mask.reshape(-1).to(device=device, dtype=dtype)
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
    return (exactmath.exp(log_pt) * (log_pt - log_ps)).sum(dim=1)


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


# --- Decoupled and divergence losses (DKD, NTDH, MLKD) ---------------------------------------
#
# Everything below works on "rows" (one per sample or pixel) and keeps every intermediate finite:
# log-probabilities come from log_softmax / logsumexp, and the non-target distribution is built by
# gathering the C-1 non-target logits, so the target class is removed (not damped) and no
# 0 * log 0 or -inf - -inf ever reaches autograd.


def _target_rows(target: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten targets to rows; returns (clamped class indices, valid mask). Negative = ignore."""
    t = target.reshape(-1)
    if t.numel() != n_rows:
        raise ValueError(f"target has {t.numel()} entries for {n_rows} logit rows")
    valid = t >= 0
    return t.clamp_min(0).long(), valid


def non_target_logits(rows: torch.Tensor, target_rows: torch.Tensor) -> torch.Tensor:
    """[R, C] logits -> [R, C-1]: each row without its target column (order kept)."""
    c = rows.shape[1]
    offsets = torch.arange(c - 1, device=rows.device)
    index = offsets.unsqueeze(0) + (offsets.unsqueeze(0) >= target_rows.unsqueeze(1)).long()
    return rows.gather(1, index)


def decoupled_log_probs(rows: torch.Tensor, target_rows: torch.Tensor,
                        temperature=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Both DKD / NTDH distributions of p = softmax(z / T), from one pass over the logits:
    [R, 2] log [p_gt, 1 - p_gt] (stable via logsumexp) and [R, C-1] log-softmax over the
    non-target classes only (the target class removed)."""
    z = rows / temperature
    rest = non_target_logits(z, target_rows)
    log_total = exactmath.logsumexp(z, dim=1)
    log_rest_total = exactmath.logsumexp(rest, dim=1)
    log_gt = z.gather(1, target_rows.unsqueeze(1)).squeeze(1) - log_total
    binary = torch.stack([log_gt, log_rest_total - log_total], dim=1)
    return binary, rest - log_rest_total.unsqueeze(1)


def binary_target_log_probs(rows: torch.Tensor, target_rows: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """[R, 2] log [p_gt, 1 - p_gt] with p = softmax(z / T), computed stably with logsumexp."""
    return decoupled_log_probs(rows, target_rows, temperature)[0]


def non_target_log_probs(rows: torch.Tensor, target_rows: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """[R, C-1] log-softmax over the non-target classes only (the target class removed)."""
    return F.log_softmax(non_target_logits(rows / temperature, target_rows), dim=1)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities (finite inputs; p = 0 terms contribute 0)."""
    return (exactmath.exp(log_p) * (log_p - log_q)).sum(dim=1)


def js_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence (natural log, in [0, ln 2]) from log-probabilities."""
    log_m = exactmath.logaddexp(log_p, log_q) - math.log(2.0)
    js = 0.5 * kl_from_log_probs(log_p, log_m) + 0.5 * kl_from_log_probs(log_q, log_m)
    return js.clamp_min(0.0)  # rounding can leave -1e-9 where the rows are equal


def js_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) between probability rows along `dim`.

    0 log 0 is taken as 0; probabilities are clamped to the dtype's smallest normal number
    inside the logarithms only, so exact zeros give neither NaN values nor NaN gradients.
    """
    tiny = torch.finfo(p.dtype).tiny
    m = 0.5 * (p + q)
    log_m = exactmath.log(m.clamp_min(tiny))
    kl_pm = (p * (exactmath.log(p.clamp_min(tiny)) - log_m)).sum(dim=dim)
    kl_qm = (q * (exactmath.log(q.clamp_min(tiny)) - log_m)).sum(dim=dim)
    return (0.5 * kl_pm + 0.5 * kl_qm).clamp_min(0.0)


def _per_row_shape(logits: torch.Tensor) -> tuple[int, ...]:
    """Shape of a per-sample result: [N] for [N, C], [N, H, W] for [N, C, H, W]."""
    return (logits.shape[0], *logits.shape[2:])


DIVERGENCE_FORMS = ("js", "ntdh")


def _divergence_from_log_probs(log_ps: torch.Tensor, log_pt: torch.Tensor, form: str) -> torch.Tensor:
    """Per-row divergence between two distributions given as log-probabilities.

    "js": textbook Jensen-Shannon, 0.5 [KL(p_s || m) + KL(p_t || m)], in [0, ln 2].
    "ntdh": NTDH's code (its `js_divergence`, `F.kl_div(log p, m)` = KL(m || p)):
    0.5 [KL(m || p_s) + KL(m || p_t)], the KLs reversed; unbounded as a p tends to 0 where
    the other does not. m = (p_s + p_t) / 2 in both.
    """
    if form == "js":
        return js_from_log_probs(log_pt, log_ps)
    if form == "ntdh":
        log_m = exactmath.logaddexp(log_ps, log_pt) - math.log(2.0)
        div = 0.5 * kl_from_log_probs(log_m, log_ps) + 0.5 * kl_from_log_probs(log_m, log_pt)
        return div.clamp_min(0.0)  # rounding can leave -1e-9 where the rows are equal
    raise ValueError(f"unknown divergence form {form!r}; known: {list(DIVERGENCE_FORMS)}")


def target_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      temperature: float = 1.0, form: str = "js") -> torch.Tensor:
    """NTDH target divergence: per-sample (per-pixel) divergence between the binary target
    distributions [p_gt, 1 - p_gt] of teacher and student, p = softmax(z / T).

    `form`: "js" (textbook Jensen-Shannon) or "ntdh" (NTDH's own code, see
    `_divergence_from_log_probs`; NTDH defines its target divergence like its non-target one).
    Returns [N] or [N, H, W]; rows whose target is negative (ignore) get 0.
    """
    if form not in DIVERGENCE_FORMS:
        raise ValueError(f"unknown divergence form {form!r}; known: {list(DIVERGENCE_FORMS)}")
    s, t = to_rows(student_logits), to_rows(teacher_logits)
    tgt, valid = _target_rows(target, s.shape[0])
    div = _divergence_from_log_probs(binary_target_log_probs(s, tgt, temperature),
                                     binary_target_log_probs(t, tgt, temperature), form)
    return (div * valid).reshape(_per_row_shape(student_logits))


def non_target_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                          temperature: float = 1.0, form: str = "js") -> torch.Tensor:
    """NTDH non-target divergence: per-sample (per-pixel) divergence between teacher and
    student softmax over the non-target classes (target column removed, then renormalised),
    p = softmax(z / T).

    `form`: "js" (textbook Jensen-Shannon, 0.5 [KL(p_s || m) + KL(p_t || m)]) or "ntdh"
    (NTDH's definition as its code computes it: 0.5 [KL(m || p_s) + KL(m || p_t)]),
    m = (p_s + p_t) / 2. (NTDH's code only ever uses T = 1; it multiplies by T^2 without
    dividing the logits by T, so at T != 1 ours is the temperature-scaled distribution.)
    With C = 2 the non-target distribution has a single class, so the divergence is 0.
    Returns [N] or [N, H, W]; rows whose target is negative (ignore) get 0.
    """
    if form not in DIVERGENCE_FORMS:
        raise ValueError(f"unknown divergence form {form!r}; known: {list(DIVERGENCE_FORMS)}")
    s, t = to_rows(student_logits), to_rows(teacher_logits)
    tgt, valid = _target_rows(target, s.shape[0])
    div = _divergence_from_log_probs(non_target_log_probs(s, tgt, temperature),
                                     non_target_log_probs(t, tgt, temperature), form)
    return (div * valid).reshape(_per_row_shape(student_logits))


def pssm_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                 cos_threshold: float = 0.996) -> torch.Tensor:
    """NTDH's sample mask (PSSM, `pd_diff` in its code): one weight per sample (pixel).

    1 where the teacher is right (argmax of its logits == target); where it is wrong,
    (1 + cos(z_t, z_s)) / 2 if the cosine of the two raw logit rows is >= `cos_threshold`,
    else 0. A zero logit row has cosine 0. Rows whose target is negative (ignore) get 0.
    [N, C] -> [N]; [N, C, H, W] -> [N, H, W]. Pass detached logits for a mask (as a weight it
    is not meant to be trained through).
    """
    s, t = to_rows(student_logits), to_rows(teacher_logits)
    tgt, valid = _target_rows(target, s.shape[0])
    norms = s.norm(dim=1) * t.norm(dim=1)
    cos = (s * t).sum(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))  # 0 / 1 = 0 for a zero row
    right = t.argmax(dim=1) == tgt
    wrong_weight = torch.where(cos >= cos_threshold, (1.0 + cos) / 2.0, torch.zeros_like(cos))
    weights = torch.where(right, torch.ones_like(cos), wrong_weight)
    return (weights * valid).reshape(_per_row_shape(student_logits))


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's two terms (TCKD, NCKD), each T^2 * a KL averaged over valid, masked rows."""
    s, t = to_rows(student_logits), to_rows(teacher_logits)
    tgt, valid = _target_rows(target, s.shape[0])
    weights = valid.float() * mask_rows(mask, s.shape[0], s.device)
    binary_t, rest_t = decoupled_log_probs(t, tgt, temperature)
    binary_s, rest_s = decoupled_log_probs(s, tgt, temperature)
    tckd = kl_from_log_probs(binary_t, binary_s)
    nckd = kl_from_log_probs(rest_t, rest_s)
    scale = temperature**2
    return masked_mean(tckd, weights) * scale, masked_mean(nckd, weights) * scale


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD.

    TCKD = T^2 KL([p_gt^t, 1 - p_gt^t] || [p_gt^s, 1 - p_gt^s]); NCKD = T^2 KL(p^t_nt || p^s_nt)
    where p_nt is the softmax over the non-target classes with the target class removed.
    No CE and no warm-up here (the `dkd` method adds them). Rows whose target is negative are
    excluded; `mask` ([N] / [N, H, W], bool or weights) weights the remaining rows.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature, mask)
    return alpha * tckd + beta * nckd


def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature) -> torch.Tensor:
    """Per-sample (per-pixel) T^2 * KL(p_t || p_s), shape [N] or [N, H, W] (MLKD's instance term)."""
    s, t = to_rows(student_logits), to_rows(teacher_logits)
    return (kl_rows(s, t, temperature) * temperature**2).reshape(_per_row_shape(student_logits))


def batch_correlation_loss(student_probs: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor,
                           rows_per_sample: int = 1) -> torch.Tensor:
    """MLKD batch level: squared Frobenius distance of the row-similarity matrices P P^T.

    With row weights w (0/1 selects rows): sum_ij w_i w_j (S_s - S_t)_ij^2 / (sum(w) * r),
    S = P P^T. For classification (r = rows_per_sample = 1, all w = 1) this is MLKD's
    ||S_s - S_t||^2 / batch_size. Segmentation passes r = H*W so a pixel counts as 1/(H*W) of a
    sample and the term keeps the scale of a classification batch with the same number of images.

    Probabilities are [R, C] or [K, R, C] (K temperatures at once); the result is a scalar or
    [K]. Computed without the R x R matrices, via ||A A^T - B B^T||^2 = ||A^T A||^2 -
    2 ||A^T B||^2 + ||B^T B||^2 on C x C matrices (O(R C^2) time, O(C^2) memory), in float64
    against cancellation.
    """
    w = weights.reshape(-1, 1).to(torch.float64)
    root = w.clamp_min(0).sqrt()
    a = teacher_probs.to(torch.float64) * root
    b = student_probs.to(torch.float64) * root
    a_t, b_t = a.mT, b.mT
    dist = ((a_t @ a).square().sum((-2, -1)) - 2 * (a_t @ b).square().sum((-2, -1))
            + (b_t @ b).square().sum((-2, -1)))
    norm = (w.sum() * rows_per_sample).clamp_min(1e-12)
    return (dist.clamp_min(0.0) / norm).to(student_probs.dtype)


def class_correlation_loss(student_probs: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor,
                           rows_per_sample: int = 1) -> torch.Tensor:
    """MLKD class level: ||G_s - G_t||_F^2 / C with the C x C class-correlation G = P^T diag(w) P / r.

    For classification (r = 1, all w = 1) this is MLKD's ||P_s^T P_s - P_t^T P_t||^2 / C;
    segmentation passes r = H*W (see `batch_correlation_loss`). [K, R, C] inputs give [K].
    """
    w = weights.reshape(-1, 1).to(student_probs.dtype)
    g_s = student_probs.mT @ (student_probs * w)
    g_t = teacher_probs.mT @ (teacher_probs * w)
    return (g_s - g_t).div(rows_per_sample).square().sum((-2, -1)) / student_probs.shape[-1]


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
        raise ValueError(f"kendall_tau needs two [N, C] tensors of one shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    # float64 stays float64; anything else is ranked in float32 (sums of +-1 are exact below 2^24)
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    n, c = a.shape
    rows = max(1, chunk_elements // max(1, 2 * c * c))
    taus = [_kendall_tau_rows(torch.stack([a[start:start + rows],
                                           b[start:start + rows]])) for start in range(0, n, rows)]
    return taus[0] if len(taus) == 1 else torch.cat(taus)


def _kendall_tau_rows(ab: torch.Tensor) -> torch.Tensor:
    """[2, n, C] (a and b stacked) -> tau-b [n]; few, large ops (OFSD calls it every step)."""
    signs = _pairwise_signs(ab)  # [2, n, C, C]
    # Over ordered pairs every count doubles; the ratio is unchanged.
    untied = torch.count_nonzero(signs, dim=(2, 3)).to(ab.dtype)  # [2, n]
    concordance = (signs[0] * signs[1]).sum(dim=(1, 2))
    return concordance / exactmath.sqrt(untied[0] * untied[1])  # 0/0 -> NaN


def _pairwise_signs(x: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [..., C, C] matrix of sign(x_i - x_j)."""
    return (x.unsqueeze(-1) - x.unsqueeze(-2)).sign_()


# --- Feature-based losses (RKD, AT) ----------------------------------------------------------


def _pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[N, D] -> [N, N] Euclidean distances: 0 on the diagonal and between coinciding rows
    (squared distance <= eps), where the square root's gradient is cut to stay finite."""
    sq = x.pow(2).sum(dim=1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * x @ x.t()
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    apart = (d2 > eps) & ~eye
    return torch.where(apart, exactmath.sqrt(d2.clamp_min(eps)), torch.zeros_like(d2))


def _mean_normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise distances divided by their mean over the positive ones (RKD's mu); when no
    pair is apart (N = 1, or every row equal) the distances are all 0 and stay 0."""
    d = _pairwise_distances(x)
    positive = d > 0
    mean = (d * positive).sum() / positive.sum().clamp_min(1)
    return d / torch.where(positive.any(), mean, torch.ones_like(mean))


#: Rows i of the [N, N, N] angle tensor built at a time: ~128K entries (512 KiB in float32) stay
#: in cache, where the dozen elementwise passes of the loss and its gradient run ~1.5x faster
#: than over the whole tensor at once (benchmarks/rkd_angles.py).
_ANGLE_BLOCK_ENTRIES = 131072


def _angle_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the angles of `x` [N, D] are built from: the Gram matrix G of the centred rows,
    B[i, k] = G_ik - G_ii and 1 / |x_j - x_i| (0 for coinciding rows, whose cosines are 0).

    <x_j - x_i, x_k - x_i> = G_jk - G_ij - G_ik + G_ii, so the N^3 cosines cost O(N^3) instead
    of the O(N^3 D) of normalising all N^2 difference vectors and multiplying them. Centring
    (angles do not depend on it) keeps G at the scale of the differences, so float32 rounding
    stays at the differences' own precision."""
    xc = x - x.mean(dim=0, keepdim=True)
    g = xc @ xc.t()
    g = 0.5 * (g + g.t())  # exactly symmetric: G_ji - G_ij is 0, not a rounding residue
    b = g - g.diagonal().unsqueeze(1)
    d = _pairwise_distances(xc)
    # the clamp keeps the unused branch's gradient finite
    inv = torch.where(d > 0, d.clamp_min(1e-30).reciprocal(), torch.zeros_like(d))
    return g, b, inv


def _angles(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
    """Rows `rows` of the [N, N, N] cosines <e(x_j - x_i), e(x_k - x_i)> of unit difference
    vectors (a zero difference gives cosine 0), from `_angle_parts`. Grouped as
    (G_jk - G_ij) - (G_ik - G_ii) so that j = i and k = i give exactly 0."""
    g, b, inv = parts
    dots = (g.unsqueeze(0) - g[rows].unsqueeze(2)) - b[rows].unsqueeze(1)
    return dots * inv[rows].unsqueeze(2) * inv[rows].unsqueeze(1)


def _angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smooth L1 between the two sides' [N, N, N] angles, mean over all triples, built a block
    of rows at a time (`_ANGLE_BLOCK_ENTRIES`)."""
    n = s.shape[0]
    parts_s, parts_t = _angle_parts(s), _angle_parts(t)
    block = max(1, _ANGLE_BLOCK_ENTRIES // (n * n))
    total = s.new_zeros(())
    for start in range(0, n, block):
        rows = slice(start, start + block)
        total = total + F.smooth_l1_loss(_angles(parts_s, rows), _angles(parts_t, rows), reduction="sum")
    return total / n**3


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al., CVPR 2019) on [N, D_s] / [N, D_t] embeddings (any trailing
    dimensions are flattened; D_s and D_t may differ). Scalar:

        distance_weight * smoothL1(psi_D(s), psi_D(t))   over all N x N pairs, distances divided
                                                         by each side's mean positive distance
      + angle_weight * smoothL1(psi_A(s), psi_A(t))      over all N x N x N triples, cosines of
                                                         normalised difference vectors

    The teacher side is a target (detached), as in the authors' code.
    """
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(f"rkd_loss needs the same number of rows, got {student_emb.shape[0]} and "
                         f"{teacher_emb.shape[0]}")
    s = student_emb.reshape(student_emb.shape[0], -1)
    t = teacher_emb.detach().reshape(teacher_emb.shape[0], -1).to(s.dtype)
    distance = F.smooth_l1_loss(_mean_normalised_distances(s), _mean_normalised_distances(t))
    angle = _angle_loss(s, t)
    return distance_weight * distance + angle_weight * angle


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT's spatial attention (Zagoruyko & Komodakis, ICLR 2017): [N, C, H, W] -> [N, H*W],
    the channel mean of |x|^p, L2-normalised per sample (a zero map stays zero)."""
    if feat.dim() != 4:
        raise ValueError(f"attention maps need [N, C, H, W] features, got shape {tuple(feat.shape)}")
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), p=2, dim=1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: mean over samples and positions of the squared difference of the
    two attention maps (`attention_map`). Channel counts may differ; spatial sizes must match
    (the AT method interpolates first). The teacher side is detached."""
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(f"at_loss needs the same batch and spatial size, got {tuple(student_feat.shape)} and "
                         f"{tuple(teacher_feat.shape)}")
    a_s = attention_map(student_feat, p)
    a_t = attention_map(teacher_feat.detach().to(student_feat.dtype), p)
    return (a_s - a_t).pow(2).mean()
