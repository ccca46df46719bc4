"""The seg_resnet architecture: shapes, the features/head split, registry wiring."""

from __future__ import annotations

import pytest
import torch

from cmkd.models import available_archs, build_model
from cmkd.models.resnet import BasicBlock


@pytest.mark.parametrize("stem_stride", [1, 2, 4])
@pytest.mark.parametrize("size", [(32, 96), (29, 61)])
def test_output_matches_input_size_and_features_head_split(stem_stride, size):
    torch.manual_seed(0)
    model = build_model({"arch": "seg_resnet", "width": 4, "stem_stride": stem_stride}, (5, *size), 19).eval()
    x = torch.randn(2, 5, *size)
    logits = model(x)
    feats = model.features(x)
    assert logits.shape == (2, 19, *size)
    assert feats.shape == (2, model.feature_dim, *size)
    assert torch.equal(model.head(feats), logits)
    assert isinstance(model.head, torch.nn.Conv2d) and model.head.kernel_size == (1, 1)


def test_registry_encoder_and_training_step():
    assert "seg_resnet" in available_archs()
    model = build_model({"arch": "seg_resnet", "width": 4, "blocks": 2, "decoder_dim": 6}, (3, 16, 32), 5)
    assert model.feature_dim == 6
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 8  # 4 stages x 2 blocks
    target = torch.randint(-1, 5, (2, 16, 32))
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 32)), target, ignore_index=-1)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_float16_inputs_are_cast():
    model = build_model({"arch": "seg_resnet", "width": 4}, (5, 16, 32), 3).eval()
    x = torch.randn(2, 5, 16, 32).half()
    out = model(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, model(x.float()))


def test_bad_stem_stride():
    with pytest.raises(ValueError, match="stem_stride"):
        build_model({"arch": "seg_resnet", "stem_stride": 3}, (3, 16, 16), 2)


def test_integer_inputs_are_refused():
    """Stored uint8 images reach models normalised (cmkd.training.data.load_split), never raw."""
    model = build_model({"arch": "seg_resnet", "width": 4}, (3, 16, 32), 3).eval()
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(1, 3, 16, 32, dtype=torch.uint8))
