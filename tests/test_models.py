import pytest
import torch
from torch import nn

import models

PUBLISHED_PARAMS = {  # millions, as published (He et al. 2016; Zagoruyko & Komodakis 2016)
    "resnet20": 0.27, "resnet32": 0.46, "resnet56": 0.85, "resnet18": 11.2, "wrn40_2": 2.2,
    # at 10 classes: torchvision's 25.557 M (ResNet-50) and BiT's 25.5 M / 44.5 M at 1,000, less 990 x 2,049 head
    "resnet50": 23.53, "bit_r50x1": 23.52, "bit_r101x1": 42.51,
}


@pytest.mark.parametrize("arch", models.ARCHS)
def test_parameter_count_matches_published(arch):
    model = models.get_model(arch, 10)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED_PARAMS[arch], rel=0.03)


IMAGENET_ARCHS = ("resnet50", "bit_r50x1", "bit_r101x1")  # full-size: their forward is slow for the fast loop


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in IMAGENET_ARCHS else a
                                  for a in models.ARCHS])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(arch, num_classes):
    model = models.get_model(arch, num_classes).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, num_classes)


def test_resnet20_has_twenty_tracked_weight_tensors():
    model = models.get_model("resnet20", 10)
    tracked = models.tracked_parameters(model)
    assert len(tracked) == 20
    assert list(tracked)[0] == "conv1.weight" and list(tracked)[-1] == "fc.weight"
    assert all(p.dim() in (2, 4) for p in tracked.values())


def test_cifar_resnets_use_bias_free_convolutions_and_parameter_free_shortcuts():
    model = models.get_model("resnet56", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 55 and all(c.bias is None for c in convs)
    assert all(sum(p.numel() for p in block.shortcut.parameters()) == 0
               for block in model.modules() if hasattr(block, "shortcut"))


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = models.get_model("resnet20", 10).layer2[0]
    x = torch.randn(1, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_normalisation_lives_in_the_model_and_its_state_dict():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    model = models.get_model("resnet20", 10, mean, std).eval()
    plain = models.get_model("resnet20", 10).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")},
                          strict=False)
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), plain(normalised))
    assert torch.equal(model.state_dict()["normalize.std"].flatten(), torch.tensor(std))


def test_wrn_dropout_is_configurable():
    assert models.get_model("wrn40_2", 10, drop_rate=0.0).block1[0].drop_rate == 0.0
    assert models.get_model("wrn40_2", 10).block1[0].drop_rate == 0.3


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnet20"):
        models.get_model("vgg16", 10)
