"""Model registry. Every model exposes `features(x)` (penultimate representation) and `head`
(the classifier on it), with `forward(x) == head(features(x))`; methods that need features
(C2KD proxies, feature masks, DisCoM-KD) rely on that split.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from cmkd.errors import ConfigError

_ARCHS: dict[str, Callable[..., nn.Module]] = {}


def register_arch(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ARCHS[name] = builder
        return builder

    return wrap


def available_archs() -> list[str]:
    _load_builtin()
    return sorted(_ARCHS)


def build_model(cfg: Mapping[str, Any], in_shape: Sequence[int], num_classes: int, key: str = "models") -> nn.Module:
    """Build `cfg["arch"]` for inputs of shape `in_shape` (without the batch dimension)."""
    _load_builtin()
    cfg = dict(cfg)
    arch = cfg.pop("arch", None)
    if arch not in _ARCHS:
        raise ConfigError(f"{key}.arch", f"unknown architecture {arch!r}; known: {sorted(_ARCHS)}")
    return _ARCHS[arch](in_shape=tuple(in_shape), num_classes=num_classes, **cfg)


def _load_builtin() -> None:
    # Imported here so `import cmkd.models` stays cheap and side-effect free.
    from cmkd.models import mlp, cnn, resnet, fusion  # noqa: F401
    try:
        from cmkd.models import segmentation  # noqa: F401
    except ImportError:
        pass
