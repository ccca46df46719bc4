"""The intermediate-feature API every architecture exposes (cmkd.models: forward_stages)."""

import pytest
import torch

from cmkd.errors import ConfigError
from cmkd.models import build_model, stage_outputs

CASES = [
    ({"arch": "mlp", "hidden": [16, 8]}, (12,), ["hidden1", "features"]),
    ({"arch": "mlp", "hidden": [16, 8, 4], "dropout": 0.1}, (12,), ["hidden1", "hidden2", "features"]),
    ({"arch": "mlp", "hidden": []}, (12,), ["features"]),
    ({"arch": "small_cnn", "width": 4}, (1, 16, 16), ["block1", "block2", "block3", "features"]),
    ({"arch": "resnet18", "width": 4, "small_input": True}, (3, 16, 16),
     ["stem", "layer1", "layer2", "layer3", "layer4", "features"]),
    ({"arch": "seg_resnet", "width": 4, "stem_stride": 2}, (5, 16, 32),
     ["stem", "layer1", "layer2", "layer3", "layer4", "features"]),
    ({"arch": "resnet34", "width": 4, "small_input": True}, (3, 16, 16),
     ["stem", "layer1", "layer2", "layer3", "layer4", "features"]),
    ({"arch": "seg_resnet", "width": 4, "blocks": [3, 4, 6, 3], "stem_stride": 2}, (3, 16, 32),
     ["stem", "layer1", "layer2", "layer3", "layer4", "features"]),
    ({"arch": "fusion_resnet18", "split": [3, 1], "width": 4, "small_input": True}, (4, 16, 16),
     ["stem", "layer1", "layer2", "layer3", "layer4", "features"]),
]


@pytest.mark.parametrize("cfg,shape,names", CASES, ids=[c[0]["arch"] + str(i) for i, c in enumerate(CASES)])
def test_forward_stages_matches_forward(cfg, shape, names):
    torch.manual_seed(0)
    model = build_model(cfg, shape, 5).eval()
    x = torch.randn(3, *shape)
    assert model.stage_names == names
    assert model.intermediate_stage in names
    out = model.forward_stages(x)
    assert list(out) == names + ["logits"]
    assert torch.equal(out["logits"], model(x))
    assert torch.equal(out["features"], model.features(x))
    for name in names:
        assert out[name].shape[0] == 3
        assert out[name].shape[1] == model.stage_channels[name], name
    # a subset is the same tensors, and the logits come along
    sub = model.forward_stages(x, [model.intermediate_stage])
    assert list(sub) == [model.intermediate_stage, "logits"]
    assert torch.equal(sub[model.intermediate_stage], out[model.intermediate_stage])


def test_intermediate_stage_is_not_the_penultimate_for_deep_nets():
    resnet = build_model({"arch": "resnet18", "width": 4, "small_input": True}, (3, 16, 16), 5)
    maps = resnet.forward_stages(torch.randn(2, 3, 16, 16), ["layer3"])
    assert maps["layer3"].dim() == 4 and maps["layer3"].shape[1] == 16  # 4 * width channels, spatial


def test_stage_outputs_names_unknown_stage():
    model = build_model({"arch": "small_cnn", "width": 4}, (1, 8, 8), 3)
    with pytest.raises(ConfigError, match="no stage 'layer3'.*block1"):
        stage_outputs(model, torch.randn(2, 1, 8, 8), ["layer3"])


def test_resnet34_has_the_papers_block_layout():
    """ResNet-34 = BasicBlocks [3, 4, 6, 3]: 21.8M parameters at width 64 with 1000 classes
    (torchvision's resnet34 has 21,797,672), in the classifier and the segmentation encoder."""
    net = build_model({"arch": "resnet34"}, (3, 224, 224), 1000)
    assert [len(stage) for stage in net.stages] == [3, 4, 6, 3]
    assert sum(p.numel() for p in net.parameters()) == 21_797_672
    seg = build_model({"arch": "seg_resnet", "width": 64, "blocks": [3, 4, 6, 3], "stem_stride": 2}, (3, 64, 128), 19)
    assert [len(stage) for stage in seg.stages] == [3, 4, 6, 3]
    with pytest.raises(ConfigError, match="blocks"):
        build_model({"arch": "seg_resnet", "blocks": [3, 4]}, (3, 16, 16), 2)
