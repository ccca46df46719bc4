"""A dataset's TEACHER and STUDENT networks, built from `models.<dataset>` for a split's inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cmkd.models import build_model
from cmkd.training.data import SplitData


def build_networks(attrs: Mapping[str, Any], train: SplitData, models: Mapping[str, Any], dataset: str):
    num_classes = len(attrs["class_names"])
    teacher = build_model(models["teacher"], train.sample_shape("teacher_input"), num_classes,
                          f"models.{dataset}.teacher")
    student = build_model(models["student"], train.sample_shape("student_input"), num_classes,
                          f"models.{dataset}.student")
    return teacher, student
