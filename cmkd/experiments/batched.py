"""Train many small independent networks at once: one network per (sweep point, seed) slice.

The synthetic experiments need hundreds of tiny trainings (MFH's sweeps alone: 6 points x ~30
seeds x 3 networks), far too many to run one by one on a 2-core CPU. A `BatchedMLP` holds S
independent MLPs as stacked weights; its input is [N, S, D] (row n of slice s is sample n of
that slice's own data) and its output is laid out like a segmentation map, [N, C, S, 1], with
targets [N, S, 1]. The project's distillers and loss functions work on that layout unchanged
(they flatten [N, C, H, W] to one row per "pixel"), so KD, CE and the masks are exactly the
ones the pipeline uses.

Why the slices stay independent: every loss is a mean over the N * S rows, i.e. the mean over
slices of each slice's own mean loss; `train_batched` multiplies it by S, so each slice's
parameters receive exactly the gradient they would get if trained alone (no parameter is
shared), and Adam / SGD update each parameter element-wise. tests/test_analysis.py checks a
slice against a network trained alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cmkd.models import build_model
from cmkd.models.mlp import MLP


class BatchedMLP(nn.Module):
    """S independent MLPs (Linear -> ReLU ... -> Linear) evaluated in one pass."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]):
        super().__init__()
        # weights[l]: [S, in, out]; biases[l]: [S, out]
        self.weights = nn.ParameterList([nn.Parameter(w.clone()) for w in weights])
        self.biases = nn.ParameterList([nn.Parameter(b.clone()) for b in biases])

    @property
    def n_slices(self) -> int:
        return self.weights[0].shape[0]

    @classmethod
    def from_models(cls, models: Sequence[MLP]) -> BatchedMLP:
        """Stack networks built by `cmkd.models.build_model` (arch mlp, no dropout)."""
        per_model = [_linear_layers(m) for m in models]
        depth = len(per_model[0])
        if any(len(layers) != depth for layers in per_model):
            raise ValueError("all networks must have the same layers")
        weights = [torch.stack([layers[i].weight.detach().t() for layers in per_model]) for i in range(depth)]
        biases = [torch.stack([layers[i].bias.detach() for layers in per_model]) for i in range(depth)]
        return cls(weights, biases)

    @classmethod
    def build(cls, model_cfg: Mapping, in_features: int, num_classes: int, seeds: Sequence[int]) -> BatchedMLP:
        """One network per seed, each initialised as `build_model` does after torch.manual_seed(seed)."""
        if dict(model_cfg).get("arch") != "mlp" or float(dict(model_cfg).get("dropout", 0.0)):
            raise ValueError("batched training supports the `mlp` arch without dropout")
        models = []
        for seed in seeds:
            torch.manual_seed(int(seed))
            models.append(build_model(model_cfg, (in_features,), num_classes))
        return cls.from_models(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, S, D] -> logits [N, C, S, 1]."""
        # Slice-major [S, N, D] inside, so every layer is one batched matrix product with its
        # bias (baddbmm) and no per-layer permutes (3x faster than einsum on [N, S, D]).
        h = x.flatten(2).transpose(0, 1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b.unsqueeze(1), h, w)
            if i < last:
                h = torch.relu_(h)
        return h.permute(1, 2, 0).unsqueeze(-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, S, D] -> the input of the last layer, slice-major [S, N, H] (the inputs
        themselves for a network without hidden layers)."""
        h = x.flatten(2).transpose(0, 1)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = torch.relu(torch.baddbmm(b.unsqueeze(1), h, w))
        return h

    def unstack(self, index: int) -> MLP:
        """Slice `index` as a plain `cmkd.models.mlp.MLP` on [N, D] inputs (with `features`,
        `head` and `feature_dim`, for tools that take one network)."""
        hidden = [w.shape[2] for w in self.weights[:-1]]
        net = MLP(self.weights[0].shape[1], self.weights[-1].shape[2], hidden)
        with torch.no_grad():
            for lin, w, b in zip(_linear_layers(net), self.weights, self.biases):
                lin.weight.copy_(w[index].t())
                lin.bias.copy_(b[index])
        return net.eval()


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    if not isinstance(model, MLP) or any(isinstance(m, nn.Dropout) for m in model.modules()):
        raise ValueError("batched training supports cmkd.models.mlp.MLP without dropout")
    return [m for m in model.body if isinstance(m, nn.Linear)] + [model.head]


def train_batched(
    distiller: nn.Module,
    batch: Mapping[str, torch.Tensor],
    n_slices: int,
    epochs: int,
    lr: float,
    optimizer: str = "adam",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
) -> list[float]:
    """Train the distiller's student on `batch` (tensors [N, S, ...]); full-batch when
    batch_size is None. Returns the per-epoch total loss per slice (the mean over slices)."""
    params = [p for p in distiller.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)  # exact sqrt: engine._optimizer
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    n = next(iter(batch.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    history = []
    distiller.train()
    for epoch in range(epochs):
        distiller.on_epoch_start(epoch, epochs)
        order = torch.randperm(n, generator=gen) if batch_size else None
        total = 0.0
        for start in range(0, n, batch_size or n):
            rows = order[start:start + batch_size] if order is not None else slice(None)
            losses = distiller({k: v[rows] for k, v in batch.items()})
            loss = sum(losses.values()) * n_slices  # per-slice gradients, as if trained alone
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) / n_slices
        history.append(total)
    distiller.eval()
    return history


@torch.no_grad()
def slice_accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [N, C, S, 1], target [N, S, 1] -> accuracy of each slice [S]."""
    return (logits.argmax(1) == target).float().mean(dim=(0, 2))
