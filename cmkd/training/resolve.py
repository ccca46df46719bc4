"""The model and the training of each role (teacher, student) of a dataset: what every stage
that trains, diagnoses, tunes or reports uses, from this one function (`resolve_roles`).

A registered dataset has them in params.yaml (`models.<name>.<role>`, `train.<name>.<role>`),
used as they are. A user's paired data (`data.<name>.kind: paired`) needs neither block: the
defaults are chosen from the inputs' shapes and the task,

    vectors (D,)                          mlp, hidden [128, 128]     (the synthetic dataset's)
    images, classification, <= 32 px      small_cnn, width 32        (digits')
    images, classification, larger        resnet18, width 64
    segmentation, <= 128 px               seg_resnet, width 16
    segmentation, larger                  seg_resnet, width 32, 2 blocks, stem stride 2 (nyudv2's)

with the training of the same rows, and any `models.<name>.<role>` / `train.<name>.<role>` keys
given in params.yaml override them (a model block with another `arch` replaces the default).
The `resolve` stage writes the result to data/resolved/<name>/<role>.json, which the training
stages depend on instead of params keys that a paired dataset does not have.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from cmkd.errors import ConfigError

ROLES = ("teacher", "student")
SMALL_IMAGE_PX = 32
SMALL_SEGMENTATION_PX = 128

_VECTOR = ({"arch": "mlp", "hidden": [128, 128]},
           {"epochs": 20, "batch_size": 128, "lr": 0.001, "weight_decay": 0.0, "optimizer": "adam"})
_SMALL_IMAGE = ({"arch": "small_cnn", "width": 32},
                {"epochs": 10, "batch_size": 64, "lr": 0.002, "weight_decay": 0.0, "optimizer": "adam"})
_LARGE_IMAGE = ({"arch": "resnet18", "width": 64, "small_input": False},
                {"epochs": 30, "batch_size": 64, "lr": 0.001, "weight_decay": 0.0, "optimizer": "adam"})
_SMALL_SEGMENTATION = ({"arch": "seg_resnet", "width": 16},
                       {"epochs": 30, "batch_size": 8, "lr": 0.001, "weight_decay": 0.0001, "optimizer": "adam",
                        "eval_batch_size": 16})
_LARGE_SEGMENTATION = ({"arch": "seg_resnet", "width": 32, "blocks": 2, "stem_stride": 2},
                       {"epochs": 30, "batch_size": 8, "lr": 0.001, "weight_decay": 0.0001, "optimizer": "adam",
                        "eval_batch_size": 16})


def default_role(task: str, shape: Sequence[int]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(model, training, what it was chosen for) for inputs of one sample's `shape`."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 1:
        chosen, what = _VECTOR, f"vectors of {shape[0]}"
    else:
        what = f"{'x'.join(map(str, shape))} images"
        side = max(shape[1:])
        if task == "segmentation":
            chosen = _SMALL_SEGMENTATION if side <= SMALL_SEGMENTATION_PX else _LARGE_SEGMENTATION
        else:
            chosen = _SMALL_IMAGE if side <= SMALL_IMAGE_PX else _LARGE_IMAGE
    return copy.deepcopy(chosen[0]), copy.deepcopy(chosen[1]), what


def _block(params: Mapping[str, Any], section: str, ds: str, role: str) -> Mapping[str, Any] | None:
    node = (params.get(section) or {}).get(ds)
    if node is None:
        return None
    if not isinstance(node, Mapping):
        raise ConfigError(f"{section}.{ds}", "must be a mapping with `teacher` and / or `student` entries")
    value = node.get(role)
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"{section}.{ds}.{role}", f"must be a mapping, got {value!r}")
    return value


def resolve_roles(params: Mapping[str, Any], ds: str,
                  shapes: tuple[str, Sequence[int], Sequence[int]] | None = None) -> dict[str, dict[str, Any]]:
    """{role: {"model": ..., "train": ..., "origin": ...}} for both roles of dataset `ds`.

    `shapes` (task, teacher sample shape, student sample shape) is needed for a paired dataset
    only (cmkd.data.datasets.paired.input_shapes reads it from the source headers,
    `prepared_shapes` from the prepared file: the same shapes)."""
    from cmkd.data.datasets.paired import is_paired

    data = (params.get("data") or {}).get(ds)
    out = {}
    if not is_paired(data):
        for role in ROLES:
            model, train = _block(params, "models", ds, role), _block(params, "train", ds, role)
            if model is None:
                raise ConfigError(f"models.{ds}.{role}", "missing")
            if train is None:
                raise ConfigError(f"train.{ds}.{role}", "missing")
            out[role] = {"model": copy.deepcopy(dict(model)), "train": copy.deepcopy(dict(train)), "origin": "params"}
        return out
    if shapes is None:
        raise ValueError(f"resolve_roles: the paired dataset {ds!r} needs its input shapes")
    task = shapes[0]
    for role, shape in zip(ROLES, shapes[1:]):
        model, train, what = default_role(task, shape)
        origin = f"{model['arch']} chosen from the input shapes ({what})"
        given_model, given_train = _block(params, "models", ds, role), _block(params, "train", ds, role)
        if given_model:
            same_arch = given_model.get("arch", model["arch"]) == model["arch"]
            model = {**model, **given_model} if same_arch else dict(given_model)  # another arch: replaced
        if given_train:
            train = {**train, **given_train}
        overrides = [f"{s}.{ds}.{role}" for s, given in (("models", given_model), ("train", given_train)) if given]
        if overrides:
            origin += f", overridden by {' and '.join(overrides)}"
        out[role] = {"model": copy.deepcopy(model), "train": copy.deepcopy(train), "origin": origin}
    return out


def prepared_shapes(prepared) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(task, teacher sample shape, student sample shape) of a prepared file."""
    from cmkd.data.h5 import read_attrs, sample_shapes

    attrs = read_attrs(prepared)
    roots = attrs.get("seed_roots") or [""]
    shapes = sample_shapes(prepared, "train", roots[0])
    return attrs["task"], shapes[attrs["teacher_modality"]], shapes[attrs["student_modality"]]


def roles_for_prepared(params: Mapping[str, Any], ds: str, prepared) -> dict[str, dict[str, Any]]:
    """`resolve_roles` for the stages that have the prepared file (its shapes are read only
    for a paired dataset)."""
    from cmkd.data.datasets.paired import is_paired

    paired = is_paired((params.get("data") or {}).get(ds))
    return resolve_roles(params, ds, prepared_shapes(prepared) if paired else None)


def models_of(roles: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{"teacher": model, "student": model}: what `models.<name>` holds for a registered dataset."""
    return {role: roles[role]["model"] for role in ROLES}


def origin_note(roles: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One line for reports when the models were not all given in params.yaml, else None."""
    if all(r["origin"] == "params" for r in roles.values()):
        return None
    return "Models and training: " + "; ".join(f"{role} {roles[role]['origin']}" for role in ROLES) + "."
