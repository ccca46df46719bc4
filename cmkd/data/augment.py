"""The one augmentation, shared by the in-memory and the streamed (cmkd.data.loader) batch paths."""

from __future__ import annotations

import torch


def augment_batch(batch: dict[str, torch.Tensor], mode: str | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The same random flip / 90-degree rotation for every image-shaped tensor of a sample
    (both modalities and a segmentation target stay aligned). Vectorised per batch."""
    if mode is None:
        return batch
    keys = [k for k in ("teacher_input", "student_input", "target") if k in batch and batch[k].dim() >= 3]
    if not keys:
        return batch
    n = batch[keys[0]].shape[0]
    out = dict(batch)
    flip = torch.rand(n, generator=generator) < 0.5
    for k in keys:
        x = out[k]
        f = flip.view(-1, *([1] * (x.dim() - 1)))
        out[k] = torch.where(f, x.flip(-1), x)
    if mode == "flip_rot90":
        turns = torch.randint(0, 4, (n,), generator=generator)
        for k in keys:
            x = out[k]
            if x.shape[-1] != x.shape[-2]:
                raise ValueError("flip_rot90 needs square images")
            rotated = x.clone()
            for t in (1, 2, 3):  # four groups, each rotated with one call
                sel = (turns == t).nonzero().flatten()
                if len(sel):
                    rotated[sel] = torch.rot90(x[sel], t, dims=(-2, -1))
            out[k] = rotated
    return out
