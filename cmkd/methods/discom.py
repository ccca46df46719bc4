"""DisCoM-KD (Ienco & Dantas, 2024): cross-modal KD without a teacher, by disentanglement.

Two branches, one per modality (M1 = the student modality, M2 = the teacher modality), are
trained jointly; each is deployable alone. A branch (paper, Fig. 2) has

- a modality-specific encoder: the network the pipeline built for that modality, whose
  `features()` embedding is split in two halves, z_irr (first half, modality-irrelevant) and
  z_inf (second half, modality-informative);
- a modality-invariant encoder: a second, re-initialised copy of the same network, whose
  `features()` go through a linear projection head to z_inv, the size of one half;
- a main task classifier Cl_m on [z_inv || z_inf].

Shared auxiliary heads (single linear layers): an adversarial modality classifier on z_inv behind
a gradient-reversal layer (GRL), modality classifiers on z_inf and on z_irr, and an auxiliary task
classifier over z_inv and z_inf of both modalities. The loss (Eq. 2-7), each term summed over the
two modalities, CE averaged over samples:

    L_cl   = sum_m CE(Cl_m([z_inv || z_inf]), y)
    L_adv  = sum_m CE(Cl_adv(GRL(z_inv_m)), m)
    L_mod  = sum_m CE(Cl_inf(z_inf_m), m) + CE(Cl_irr(z_irr_m), m)
    L_aux  = sum_m sum_{i in inv, inf} CE(Cl_aux(z_i_m), y)
    L_orth = sum_m mean_n o(z_inv, z_inf) + o(z_inf, z_irr)

Modality targets are the modality's class index: 0 for every sample of M1 (student modality),
1 for every sample of M2 (the reference code's targets were wrong).

Orthogonality: `orthogonality: abs` (default) uses o = |cos|, minimised by orthogonal vectors.
`orthogonality: signed` is the printed Eq. 6, o = cos; note that the signed cosine is minimised
by anti-parallel vectors (cos = -1), not orthogonal ones, so it does not enforce orthogonality.

Ablations: `use_adv`, `use_mod`, `use_aux`, `use_orth` drop one term each (the paper's Table 3
"w/o" rows); `representation: inv_only | inf_only` feeds only z_inv or only z_inf to the main
classifiers (Table 4).

Classification only: the paper notes that dense tasks need the method rethought.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import ConfigError
from cmkd.losses import cross_entropy
from cmkd.methods import register
from cmkd.methods.base import Distiller

#: modality class index of each branch (targets of the modality classifiers)
STUDENT_MODALITY = 0
TEACHER_MODALITY = 1
REPRESENTATIONS = ("both", "inv_only", "inf_only")
ORTHOGONALITY = ("abs", "signed")


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


def grad_reverse(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -strength backward (Ganin et al., 2016)."""
    return _GradientReversal.apply(x, float(strength))


def orthogonality_loss(a: torch.Tensor, b: torch.Tensor, mode: str = "abs") -> torch.Tensor:
    """Mean over rows of |cos(a, b)| (`abs`) or cos(a, b) (`signed`, the printed Eq. 6).

    The signed form is minimised (-1) by anti-parallel vectors, not by orthogonal ones.
    """
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-8)
    if mode == "abs":
        return cos.abs().mean()
    if mode == "signed":
        return cos.mean()
    raise ValueError(f"orthogonality mode must be one of {ORTHOGONALITY}, got {mode!r}")


def modality_targets(n: int, modality: int, device: torch.device) -> torch.Tensor:
    """[n] int64 filled with the modality's class index (0: student modality, 1: teacher modality)."""
    return torch.full((n,), modality, dtype=torch.long, device=device)


def reinitialised_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every parameter and buffer re-initialised (fresh, trainable
    weights; BatchNorm statistics reset). Draws from torch's global generator."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()
    return clone.requires_grad_(True).train()


class DisComBranch(nn.Module):
    """One modality's extractor: z_inv, z_inf, z_irr, each [N, E], and its main classifier.

    A deployable single-modality model: `features(x)` is the main classifier's input
    ([z_inv || z_inf], or one of them per `representation`), `head` the classifier,
    forward = head(features(x)).
    """

    def __init__(self, specific: nn.Module, embedding_dim: int, num_classes: int, representation: str):
        super().__init__()
        spec_dim = specific.feature_dim
        self.specific = specific
        # Paper: the specific encoder's embedding is split in halves; a linear map to 2E is added
        # only when its width is not 2E (e.g. an odd feature width).
        self.specific_projection = (nn.Identity() if spec_dim == 2 * embedding_dim
                                    else nn.Linear(spec_dim, 2 * embedding_dim))
        self.invariant = reinitialised_copy(specific)
        self.invariant_projection = nn.Linear(self.invariant.feature_dim, embedding_dim)
        self.embedding_dim = embedding_dim
        self.representation = representation
        in_dim = 2 * embedding_dim if representation == "both" else embedding_dim
        self.head = nn.Linear(in_dim, num_classes)
        self.feature_dim = in_dim

    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.specific_projection(self.specific.features(x))
        if spec.dim() != 2:
            raise ConfigError("runs", f"discom_kd needs [N, D] features, the network returned {tuple(spec.shape)}")
        z_irr, z_inf = spec[:, : self.embedding_dim], spec[:, self.embedding_dim :]
        z_inv = self.invariant_projection(self.invariant.features(x))
        return {"inv": z_inv, "inf": z_inf, "irr": z_irr}

    def classifier_input(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.representation == "inv_only":
            return z["inv"]
        if self.representation == "inf_only":
            return z["inf"]
        return torch.cat([z["inv"], z["inf"]], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier_input(self.embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("discom_kd")
class DisComKD(Distiller):
    """DisCoM-KD. `student` and `teacher` are freshly built (untrained) networks of the student
    and teacher modality's architectures; both become modality-specific encoders and are
    trained. Deployables: "student" (student modality) and "teacher_modality" (the other).
    """

    needs_teacher = False
    trains_teacher = True  # the teacher-modality branch is trained (and never frozen)
    uses_teacher_logits_only = False
    # The paper defines per-sample embeddings and classifiers only; on a segmentation dataset
    # the run is skipped with this reason and its row reads n/a (cmkd/pipeline/train.py).
    tasks = ("classification",)
    defaults = {
        "embedding_dim": None,  # None: half the specific encoders' feature width
        "grl_strength": 1.0,
        "orthogonality": "abs",
        "representation": "both",
        "use_adv": True,
        "use_mod": True,
        "use_aux": True,
        "use_orth": True,
        "cl_weight": 1.0,
        "adv_weight": 1.0,
        "mod_weight": 1.0,
        "aux_weight": 1.0,
        "orth_weight": 1.0,
    }

    @classmethod
    def validate(cls, cfg, key):
        super().validate(cfg, key)
        merged = {**cls.defaults, **cfg}
        if merged["orthogonality"] not in ORTHOGONALITY:
            raise ConfigError(f"{key}.orthogonality",
                              f"must be one of {list(ORTHOGONALITY)}, got {merged['orthogonality']!r}")
        if merged["representation"] not in REPRESENTATIONS:
            raise ConfigError(f"{key}.representation",
                              f"must be one of {list(REPRESENTATIONS)}, got {merged['representation']!r}")
        for name in ("use_adv", "use_mod", "use_aux", "use_orth"):
            if not isinstance(merged[name], bool):
                raise ConfigError(f"{key}.{name}", f"must be true or false, got {merged[name]!r}")
        e = merged["embedding_dim"]
        if e is not None and (not isinstance(e, int) or e < 1):
            raise ConfigError(f"{key}.embedding_dim", f"must be null or a positive integer, got {e!r}")

    def __init__(self, student, teacher, cfg, num_classes):
        if teacher is None:
            raise ConfigError("runs", "method 'discom_kd' needs a (fresh) network for the teacher modality: it trains "
                                      "one branch per modality")
        super().__init__(student, teacher, cfg, num_classes)
        dims = []
        for name, net in (("student", student), ("teacher", teacher)):
            dim = getattr(net, "feature_dim", None)
            if not isinstance(dim, int):
                raise ConfigError("models", f"the {name}-modality network ({type(net).__name__}) has no integer "
                                            "`feature_dim`; discom_kd needs it")
            dims.append(dim)
        e = self.cfg["embedding_dim"]
        if e is None:
            if dims[0] != dims[1] or dims[0] % 2:
                raise ConfigError("runs.embedding_dim",
                                  f"feature widths {dims} are unequal or odd; set embedding_dim explicitly")
            e = dims[0] // 2
        rep = self.cfg["representation"]
        self.student_branch = DisComBranch(student, e, num_classes, rep)
        self.teacher_branch = DisComBranch(teacher, e, num_classes, rep)
        self.adversary = nn.Linear(e, 2)
        self.inf_modality = nn.Linear(e, 2)
        self.irr_modality = nn.Linear(e, 2)
        self.aux_classifier = nn.Linear(e, num_classes)

    def embeddings(self, batch) -> list[tuple[int, DisComBranch, dict[str, torch.Tensor]]]:
        """(modality index, branch, {inv, inf, irr}) for the student and teacher modality."""
        return [
            (STUDENT_MODALITY, self.student_branch, self.student_branch.embed(batch["student_input"])),
            (TEACHER_MODALITY, self.teacher_branch, self.teacher_branch.embed(batch["teacher_input"])),
        ]

    def forward(self, batch):
        target = batch["target"]
        if target.dim() != 1:
            raise ConfigError("runs", "discom_kd supports classification only (the paper leaves dense tasks open); got "
                                      "segmentation targets")
        cfg = self.cfg
        enabled = [name for name, on in (("cl", True), ("adv", cfg["use_adv"]), ("mod", cfg["use_mod"]),
                                         ("aux", cfg["use_aux"]), ("orth", cfg["use_orth"])) if on]
        terms: dict[str, list[torch.Tensor]] = {name: [] for name in enabled}
        n = target.shape[0]
        for modality, branch, z in self.embeddings(batch):
            m = modality_targets(n, modality, target.device)
            terms["cl"].append(cross_entropy(branch.head(branch.classifier_input(z)), target))
            if "adv" in terms:
                terms["adv"].append(F.cross_entropy(self.adversary(grad_reverse(z["inv"], cfg["grl_strength"])), m))
            if "mod" in terms:
                terms["mod"].append(F.cross_entropy(self.inf_modality(z["inf"]), m)
                                    + F.cross_entropy(self.irr_modality(z["irr"]), m))
            if "aux" in terms:
                terms["aux"].append(cross_entropy(self.aux_classifier(z["inv"]), target)
                                    + cross_entropy(self.aux_classifier(z["inf"]), target))
            if "orth" in terms:
                mode = cfg["orthogonality"]
                terms["orth"].append(orthogonality_loss(z["inv"], z["inf"], mode)
                                     + orthogonality_loss(z["inf"], z["irr"], mode))
        return {name: cfg[f"{name}_weight"] * torch.stack(vals).sum() for name, vals in terms.items()}

    def deployables(self):
        return {
            "student": (self.student_branch, "student_input"),
            "teacher_modality": (self.teacher_branch, "teacher_input"),
        }
