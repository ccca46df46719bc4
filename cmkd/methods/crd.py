"""CRD, contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020).

Both networks' penultimate embeddings (stage `features`; a segmentation network's per-pixel
features averaged over space) go through a linear embedding head each (trained; the teacher
network itself stays frozen) to `feat_dim` and are L2-normalised. A momentum memory bank per
side holds one embedding per training row. For a batch row i (its `index` in the split), the
positive is row i's entry in the *other* side's memory and the K negatives are K rows drawn
uniformly (with replacement) from the rows of other classes (the paper's CIFAR sampling;
`negatives: any` draws from every other row, which segmentation always uses). Scores are
exp(<v, m> / T) / Z with Z fixed from the first batch (mean score times the number of rows),
and the NCE loss of the paper's eq. 19 (noise distribution uniform over the rows, K noise
samples per positive) is summed over the two directions (student against the teacher's bank,
teacher head against the student's bank). After the loss each bank's rows of the batch move
to normalise(m * old + (1 - m) * new).

Defaults as the paper and RepDistiller: feat_dim 128, K = 16384 (capped at the number of rows
a sample can be contrasted with on small datasets), T = 0.07, momentum 0.5, weight 0.8 with CE 1.
The banks are sized when training starts (`on_train_start`, from the training split) and are
saved in checkpoints, so a resumed run continues with the same banks. Data-parallel ranks would
each update their own banks: CRD is meant for one process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import ConfigError
from cmkd.methods import register
from cmkd.methods.feature import FeatureDistiller, pooled
from cmkd.utils import exactmath

NEGATIVES = ("other_class", "any")


class Embed(nn.Module):
    """Linear projection to feat_dim followed by L2 normalisation."""

    def __init__(self, dim_in: int, feat_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), p=2, dim=1)


class ContrastMemory(nn.Module):
    """The two memory banks [rows, feat_dim] and the fixed normalisers Z. The banks start
    empty and are sized by `reset(rows)`; loading a state dict takes the saved size."""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.feat_dim = feat_dim
        self.register_buffer("student", torch.zeros(0, feat_dim))
        self.register_buffer("teacher", torch.zeros(0, feat_dim))
        self.register_buffer("z", torch.full((2,), -1.0))  # student direction, teacher direction

    @property
    def rows(self) -> int:
        return self.student.shape[0]

    def reset(self, rows: int) -> None:
        # the authors' initialisation: uniform in +-1/sqrt(feat_dim / 3)
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        device = self.student.device
        self.student = (torch.rand(rows, self.feat_dim) * 2 * bound - bound).to(device)
        self.teacher = (torch.rand(rows, self.feat_dim) * 2 * bound - bound).to(device)
        self.z = torch.full((2,), -1.0, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("student", "teacher"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty(saved.shape, dtype=saved.dtype, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update(self, index: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor, momentum: float) -> None:
        for bank, v in ((self.student, v_student), (self.teacher, v_teacher)):
            mixed = bank.index_select(0, index) * momentum + v.detach() * (1 - momentum)
            bank.index_copy_(0, index, F.normalize(mixed, p=2, dim=1))


def nce_loss(scores: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The paper's NCE loss for [B, 1 + K] normalised scores (column 0 the positive), with a
    uniform noise distribution 1 / n_rows: -(sum log h(pos) + sum log(1 - h(neg))) / B, where
    h(x) = x / (x + K / n_rows)."""
    b, k1 = scores.shape
    noise = (k1 - 1) / n_rows
    eps = 1e-7
    log_pos = exactmath.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_neg = exactmath.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / b


@register("crd")
class CRD(FeatureDistiller):
    defaults = {"ce_weight": 1.0, "crd_weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                "nce_m": 0.5, "stage": "features", "negatives": "other_class"}

    @classmethod
    def validate(cls, cfg, key):
        super().validate(cfg, key)
        merged = {**cls.defaults, **cfg}
        for name in ("feat_dim", "nce_k"):
            if not isinstance(merged[name], int) or merged[name] < 1:
                raise ConfigError(f"{key}.{name}", f"must be a positive integer, got {merged[name]!r}")
        if not float(merged["nce_t"]) > 0:
            raise ConfigError(f"{key}.nce_t", f"must be > 0, got {merged['nce_t']}")
        if not 0.0 <= float(merged["nce_m"]) < 1.0:
            raise ConfigError(f"{key}.nce_m", f"a momentum must lie in [0, 1), got {merged['nce_m']}")
        if merged["negatives"] not in NEGATIVES:
            raise ConfigError(f"{key}.negatives", f"must be one of {list(NEGATIVES)}, got {merged['negatives']!r}")

    def __init__(self, student, teacher, cfg, num_classes):
        super().__init__(student, teacher, cfg, num_classes)
        self.student_stage = self.resolve_stage(student, str(self.cfg["stage"]), "student", "stage")
        self.teacher_stage = self.resolve_stage(teacher, str(self.cfg["stage"]), "teacher", "stage")
        dim = int(self.cfg["feat_dim"])
        self.embed_student = Embed(student.stage_channels[self.student_stage], dim)
        self.embed_teacher = Embed(teacher.stage_channels[self.teacher_stage], dim)
        self.memory = ContrastMemory(dim)
        # Negative pools, rebuilt from the training labels by on_train_start (not saved):
        # row r of `pool` lists the rows a sample of class r may be contrasted with.
        self.register_buffer("pool", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("pool_size", torch.zeros(0, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ negatives

    def on_train_start(self, train) -> None:
        """Size the banks (unless restored from a checkpoint of this split) and build the pools."""
        n = len(train)
        if n < 2:
            raise ConfigError(self.key("nce_k"), f"CRD needs at least 2 training rows, got {n}")
        labels = None
        if self.cfg["negatives"] == "other_class":
            labels = torch.empty(n, dtype=torch.long)
            for batch in train.batches(4096):
                if batch["target"].dim() != 1:
                    labels = None  # segmentation: no image label, every other row is a negative
                    break
                labels[batch["index"]] = batch["target"].long()
        device = self.memory.student.device
        if self.memory.rows != n:
            self.memory.reset(n)
        if labels is None:
            self.pool, self.pool_size = (torch.zeros(0, 0, dtype=torch.long, device=device),
                                         torch.zeros(0, dtype=torch.long, device=device))
            return
        classes = int(labels.max()) + 1
        members = [torch.nonzero(labels != c).flatten() for c in range(classes)]
        width = max(len(m) for m in members)
        pool = torch.zeros(classes, max(width, 1), dtype=torch.long)
        for c, m in enumerate(members):
            pool[c, :len(m)] = m
        sizes = torch.tensor([len(m) for m in members])
        if bool((sizes[torch.unique(labels)] == 0).any()):
            raise ConfigError(self.key("negatives"),
                              "every training row has the same class: no other-class negatives (use negatives: any)")
        self.pool, self.pool_size = pool.to(device), sizes.to(device)

    def n_negatives(self) -> int:
        return max(1, min(int(self.cfg["nce_k"]), self.memory.rows - 1))

    def sample_negatives(self, index: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[B, K] row indices, uniform with replacement over each row's negatives."""
        b, k, n = index.shape[0], self.n_negatives(), self.memory.rows
        u = torch.rand(b, k, device=index.device)
        if self.pool.numel() and target.dim() == 1:
            sizes = self.pool_size[target]
            pick = (u * sizes[:, None]).long().clamp_max((sizes - 1)[:, None])
            return self.pool[target[:, None], pick]
        # any other row: draw from n - 1 and skip the row itself
        r = (u * (n - 1)).long().clamp_max(n - 2)
        return r + (r >= index[:, None]).long()

    # ------------------------------------------------------------------ loss

    def forward(self, batch):
        if self.memory.rows == 0:
            raise RuntimeError("CRD's memory bank is empty: on_train_start(train) must run before training")
        s_out, t_out = self.run_both(batch, [self.student_stage], [self.teacher_stage])
        v_s = self.embed_student(pooled(s_out[self.student_stage]))
        v_t = self.embed_teacher(pooled(t_out[self.teacher_stage]))
        index = batch["index"].to(v_s.device).long()
        idx = torch.cat([index[:, None], self.sample_negatives(index, batch["target"].to(v_s.device))], dim=1)
        temperature, n = float(self.cfg["nce_t"]), self.memory.rows
        # student embedding against the teacher's bank, and the teacher's against the student's:
        # every row's dot product with the whole bank in one [B, D] x [D, rows] product, then the
        # sampled columns. The same numbers as gathering [B, 1 + K, D] bank rows for a batched
        # product, without that copy: K is up to 16384 (or all rows of a small dataset) per row.
        # The banks are cloned (rows x D, far less than B x K x D) because the update below
        # changes them in place while backward still needs these values.
        scores_s = exactmath.exp((v_s @ self.memory.teacher.detach().clone().T).gather(1, idx) / temperature)
        scores_t = exactmath.exp((v_t @ self.memory.student.detach().clone().T).gather(1, idx) / temperature)
        with torch.no_grad():
            if self.memory.z[0] < 0:  # fixed once, from the first batch, as the authors' code
                self.memory.z.copy_(torch.stack([scores_s.mean(), scores_t.mean()]) * n)
        loss = nce_loss(scores_s / self.memory.z[0], n) + nce_loss(scores_t / self.memory.z[1], n)
        self.memory.update(index, v_s, v_t, float(self.cfg["nce_m"]))
        return {"ce": self.ce(s_out, batch), "crd": self.cfg["crd_weight"] * loss}
