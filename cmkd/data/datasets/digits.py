"""digits -> digits-M: scikit-learn's bundled 8x8 digits (gray, the teacher modality) and a
colour version made the way MNIST-M is made from MNIST (the student modality).

MNIST-M (Ganin et al. 2016) replaces each digit by |patch - digit|, with `patch` a random crop
of a natural image (BSDS500). Here the patches come from scikit-learn's bundled sample images,
so nothing is downloaded. `blend` scales the patch: 0 gives the gray digit on three channels
(no gap), 1 is MNIST-M. `noise_std` adds Gaussian noise to both modalities (NTDH's noise test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cmkd.data.registry import register_dataset
from cmkd.utils.atomic import write_json
from cmkd.data.h5 import PreparedWriter
from cmkd.data.splits import stratified_split
from cmkd.errors import ConfigError


def validate(cfg: Mapping[str, Any], key: str) -> None:
    if not 0.0 <= float(cfg.get("blend", 0.5)) <= 1.0:
        raise ConfigError(f"{key}.blend", f"must be in [0, 1], got {cfg.get('blend')}")
    if float(cfg.get("noise_std", 0.0)) < 0:
        raise ConfigError(f"{key}.noise_std", f"must be >= 0, got {cfg.get('noise_std')}")
    if int(cfg.get("image_size", 16)) < 8:
        raise ConfigError(f"{key}.image_size", "must be at least 8")


def gray_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as float32 [N, 1, S, S] in [0, 1] and their labels."""
    # Imported where used: torch and scikit-learn cost seconds to import, which the
    # download stage and the params validation of every stage do not need.
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).numpy(), digits.target.astype(np.int64)


def random_patches(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n random size x size crops of the bundled sample images, float32 [n, 3, size, size] in [0, 1]."""
    from sklearn.datasets import load_sample_images

    images = [img.astype(np.float32) / 255.0 for img in load_sample_images().images]
    which = rng.integers(0, len(images), n)
    out = np.empty((n, size, size, 3), np.float32)
    for k, img in enumerate(images):  # one vectorised gather per source image
        sel = np.flatnonzero(which == k)
        h, w = img.shape[:2]
        ys = rng.integers(0, h - size, len(sel))
        xs = rng.integers(0, w - size, len(sel))
        rows = ys[:, None, None] + np.arange(size)[None, :, None]
        cols = xs[:, None, None] + np.arange(size)[None, None, :]
        out[sel] = img[rows, cols]
    return out.transpose(0, 3, 1, 2)


def make_digits_m(gray: np.ndarray, patches: np.ndarray, blend: float) -> np.ndarray:
    """MNIST-M's rule, |patch - digit| per channel, with the patch scaled by `blend`."""
    return np.abs(blend * patches - gray).astype(np.float32)


def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True) -> None:
    """Nothing to fetch: scikit-learn ships the digits and the sample images."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_json(raw_dir / "SOURCE.json", {"source": "scikit-learn bundled: load_digits, load_sample_images"})


@register_dataset("digits")
def prepare(cfg: Mapping[str, Any], raw_dir: Path, out_path: Path, progress: bool = True) -> None:
    validate(cfg, "data.digits")
    seed = int(cfg.get("seed", 0))
    rng = np.random.default_rng(seed)
    size = int(cfg.get("image_size", 16))
    gray, labels = gray_digits(size)
    colour = make_digits_m(gray, random_patches(len(gray), size, rng), float(cfg.get("blend", 0.5)))
    noise = float(cfg.get("noise_std", 0.0))
    if noise:
        gray = gray + rng.normal(0, noise, gray.shape).astype(np.float32)
        colour = colour + rng.normal(0, noise, colour.shape).astype(np.float32)
    # Standardise each modality with its training-split statistics (computed below).
    splits = stratified_split(labels, cfg.get("split", [0.6, 0.2, 0.2]), seed)
    tr = splits["train"]
    g_mean, g_std = gray[tr].mean(), gray[tr].std()
    c_mean, c_std = colour[tr].mean(axis=(0, 2, 3), keepdims=True), colour[tr].std(axis=(0, 2, 3), keepdims=True)
    gray = (gray - g_mean) / g_std
    colour = (colour - c_mean) / c_std
    attrs = {
        "task": "classification",
        "class_names": [str(i) for i in range(10)],
        "modalities": ["gray", "digits_m"],
        "teacher_modality": "gray",
        "student_modality": "digits_m",
        "ignore_index": None,
        "source_checksum": "sklearn-bundled",
    }
    with PreparedWriter(out_path, attrs) as writer:
        for split, idx in splits.items():
            writer.write(split, {"gray": gray[idx], "digits_m": colour[idx].astype(np.float32), "labels": labels[idx]})
