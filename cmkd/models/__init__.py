"""Model registry (one module per architecture family, `@register_arch("name")` on a builder:
cmkd/utils/registry.py). Every model exposes `features(x)` (penultimate representation) and `head`
(the classifier on it), with `forward(x) == head(features(x))`; methods that need features
(C2KD proxies, feature masks, DisCoM-KD) rely on that split.

Intermediate features, one small API for every architecture (no per-method model surgery):

    model.stage_names          ordered names of the network's stages, the last is "features"
    model.stage_channels       {name: channels of that stage's output}
    model.intermediate_stage   the stage an "intermediate" method uses by default (C2KD's
                               proxies: the output of layer3 of a ResNet)
    model.forward_stages(x, names=None) -> {name: output, ..., "logits": logits}

`forward_stages` runs the network once and returns the requested stages (all when `names` is
None) plus the logits, identical to `forward(x)`. Vector stages are [N, D]; image stages
[N, C, H, W]. `stage_outputs(model, x, names)` is the same as a function, with a clear error for
unknown names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from cmkd.errors import ConfigError
from cmkd.utils.registry import Registry

#: `@register_arch("name")` on a builder (in_shape, num_classes, **cfg) -> nn.Module in a module of
#: this package (cmkd/utils/registry.py); `models.<dataset>.<role>.arch` names it.
MODELS = Registry("architecture", ["cmkd.models"], decorator="register_arch")
register_arch = MODELS.register


def available_archs() -> list[str]:
    """Every architecture name (read from the source; nothing imported)."""
    return MODELS.names()


def build_model(cfg: Mapping[str, Any], in_shape: Sequence[int], num_classes: int, key: str = "models") -> nn.Module:
    """Build `cfg["arch"]` for inputs of shape `in_shape` (without the batch dimension)."""
    cfg = dict(cfg)
    builder: Callable[..., nn.Module] = MODELS.lookup(cfg.pop("arch", None), f"{key}.arch")
    return builder(in_shape=tuple(in_shape), num_classes=num_classes, **cfg)


def select_stages(outputs: dict[str, Any], names: Sequence[str] | None, logits) -> dict[str, Any]:
    """The requested stages (all when `names` is None) of an ordered {name: output}, plus logits."""
    picked = dict(outputs) if names is None else {n: outputs[n] for n in names}
    picked["logits"] = logits
    return picked


def stage_outputs(model: nn.Module, x, names: Sequence[str] | None = None) -> dict[str, Any]:
    """`model.forward_stages(x, names)` with the names checked: {name: output, "logits": ...}."""
    known = list(getattr(model, "stage_names", ()))
    if not known or not hasattr(model, "forward_stages"):
        raise ConfigError("models", f"{type(model).__name__} does not expose intermediate stages (forward_stages)")
    unknown = [n for n in (names or ()) if n not in known]
    if unknown:
        raise ConfigError("models", f"{type(model).__name__} has no stage {unknown[0]!r}; known: {known}")
    return model.forward_stages(x, names)

