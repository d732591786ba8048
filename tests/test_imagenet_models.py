"""ImageNet models through the engine: torchvision's ResNet-50 and BiT-S ResNet-v2 (GradNorm's ``resnetv2.py``
names), the weight-standardised convolution's rule against the float64 plain loop over the raw weights, the
closed forms of ``--layers last`` against the K-row engine, and the refusal of K = 1,000 rows."""
import pytest
import torch
import torchvision
from torch import nn

import models
from models.bit import StdConv2d
from models.normalize import Normalize
from utils.detectors import DETECTORS, cross_entropy_rows, get_detector, gradient_scores, last_layer_scores
from utils.errors import UserError
from utils.norm_rules import _std_explicit, _std_grouped, conv2d_paths
from utils.per_sample import weight_gradient_norms
from utils.tracking import refuse_every_layer_rows

TINY_BIT = {"block_units": (1, 1, 1, 1), "width": 32, "groups": 8}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial normalisation parameters and statistics, so that no layer is an identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = 0.2 * torch.randn(m.running_mean.shape, generator=g)
            m.running_var = 0.5 + torch.rand(m.running_var.shape, generator=g)
    return model.eval()


def tiny_bit(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return randomised(models.get_model("bit_r50x1", num_classes, (0.5,) * 3, (0.5,) * 3, **TINY_BIT))


def tiny_resnet50(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return randomised(models.get_model("resnet50", num_classes, layers=(1, 1, 1, 1)))


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_resnet50_is_torchvisions_own_with_the_normalisation_in_front():
    ours = models.get_model("resnet50", 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    theirs = torchvision.models.resnet50().eval()
    assert [type(m) for m in ours.children()] == [type(m) for m in theirs.children()] + [Normalize]  # its modules
    assert set(ours.state_dict()) == set(theirs.state_dict()) | {"normalize.mean", "normalize.std"}
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("normalize.")})
    x = torch.rand(2, 3, 64, 64)
    normalised = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    torch.testing.assert_close(ours(x), theirs(normalised))


def test_bit_module_names_are_gradnorms_resnetv2():
    keys = set(models.get_model("bit_r101x1", 1000).state_dict())
    units = {1: 3, 2: 4, 3: 23, 4: 3}
    expected = {"normalize.mean", "normalize.std", "root.conv.weight", "before_head.gn.weight", "before_head.gn.bias",
                "head.conv.weight", "head.conv.bias"}
    for block, count in units.items():
        for unit in range(1, count + 1):
            prefix = f"body.block{block}.unit{unit:02d}."
            expected |= {prefix + f"{layer}.{p}" for layer in ("gn1", "gn2", "gn3") for p in ("weight", "bias")}
            expected |= {prefix + f"conv{i}.weight" for i in (1, 2, 3)}
            if unit == 1:
                expected.add(prefix + "downsample.weight")
    assert keys == expected
    bit = models.get_model("bit_r50x1", 1000)
    assert bit.body.block2.unit01.conv2.stride == (2, 2) and bit.body.block2.unit01.conv1.stride == (1, 1)
    assert bit.body.block1.unit01.downsample.stride == (1, 1)
    assert bit.head.conv.weight.shape == (1000, 2048, 1, 1)


def test_groupnorm_weights_and_biases_are_not_tracked():
    tracked = models.tracked_parameters(models.get_model("bit_r50x1", 10))
    assert list(tracked)[0] == "root.conv.weight" and list(tracked)[-1] == "head.conv.weight"
    assert len(tracked) == 1 + 3 * 16 + 4 + 1 and not any(".gn" in name for name in tracked)


def test_std_conv2d_standardises_per_output_channel():
    conv = StdConv2d(4, 3, 3, padding=1, bias=False)
    w = conv.weight.detach()
    w_hat = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-10).sqrt()
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, w_hat, padding=1))


@pytest.mark.parametrize("score", ["pred", "gradnorm", pytest.param("max", marks=pytest.mark.slow)])
def test_every_tracked_layer_of_a_reduced_bit_equals_the_float64_loop(score):
    """Every StdConv2d (7x7 root, 1x1 bottleneck and shortcut, 3x3 strided) and the 1x1-conv head: the engine's
    per-sample norm of the raw weight's gradient equals ``p.grad`` of a batch of one, float64."""
    model = tiny_bit(3).double()
    x = torch.rand(2, 3, 36, 36, dtype=torch.float64)
    detector = get_detector(score)
    _, scores = gradient_scores(model, x, [detector])
    for i in range(len(x)):
        reference = detector.reference(model, x[i])
        for layer, values in scores[score].layers.items():
            assert values[i].item() == pytest.approx(reference[layer], rel=1e-10), layer
        assert scores[score].total[i].item() == pytest.approx(reference["total"], rel=1e-10)


@pytest.mark.parametrize("p", [1, 2])
def test_both_std_conv_paths_agree(p):
    torch.manual_seed(1)
    conv = StdConv2d(8, 6, 3, stride=2, padding=1, bias=False).double()
    inputs, grads = torch.randn(3, 8, 9, 9, dtype=torch.float64), torch.randn(2, 3, 6, 5, 5, dtype=torch.float64)
    assert set(conv2d_paths(conv, inputs, grads, p)) >= {"explicit", "grouped"}
    explicit = _std_explicit(conv, inputs, grads, p)
    torch.testing.assert_close(_std_grouped(conv, inputs, grads, p), explicit)
    for b in range(3):  # against autograd through the standardisation, one (row, sample) at a time
        for r in range(2):
            weight = conv.weight.detach().clone().requires_grad_()
            var, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
            out = nn.functional.conv2d(inputs[b:b + 1], (weight - mean) / (var + 1e-10).sqrt(), stride=2, padding=1)
            (grad,) = torch.autograd.grad(out, weight, grads[r, b:b + 1])
            assert explicit[r, b].item() == pytest.approx(grad.abs().pow(p).sum().item(), rel=1e-10)


@pytest.mark.parametrize("build", [tiny_bit, tiny_resnet50], ids=["bit-1x1-conv-head", "resnet50-linear-head"])
def test_last_layer_closed_forms_equal_the_k_row_engine(build):
    """--layers last for min/max/pred/exgrad/gradnorm, from ‖p − e_k‖·‖h‖ and ‖Kp − 1‖₁·‖h‖₁, against the engine's
    K per-class (and GradNorm's) rows back-propagated to the head, float64."""
    model = build(6).double()
    x = torch.rand(4, 3, 48, 48, dtype=torch.float64)
    head = list(models.tracked_parameters(model))[-1]
    names = ("min", "max", "pred", "exgrad", "gradnorm")
    logits, last = last_layer_scores(model, x, [DETECTORS[n].on_last_layer() for n in names])

    def rows(z: torch.Tensor) -> list[torch.Tensor]:
        return [cross_entropy_rows(z), DETECTORS["gradnorm"].output_gradients(z)]

    requests = ((0, 2, frozenset({head})), (0, 1, frozenset({head})), (1, 1, frozenset({head})))
    engine_logits, (l2, l1, gradnorm) = weight_gradient_norms(model, x, rows, requests)
    torch.testing.assert_close(logits, engine_logits)
    l2, l1, probs = l2[head], l1[head], logits.softmax(1).T  # (K, B)
    expected = {"min": l2.amin(0), "max": l2.amax(0), "pred": l2.gather(0, logits.argmax(1)[None])[0],
                "exgrad": (probs * l1).sum(0), "gradnorm": gradnorm[head][0]}
    for name in names:
        row = DETECTORS[name].on_last_layer().headline_row([head])
        got = last[name].extra[row] if row in last[name].extra else last[name].layers[head]
        torch.testing.assert_close(got, expected[name], rtol=1e-10, atol=0)
    torch.testing.assert_close(last["exgrad"].layers[head], (probs * l2).sum(0), rtol=1e-10, atol=0)


def test_closed_form_keeps_a_confident_predictions_tiny_gradient():
    logits = torch.tensor([[40.0, 0.0, -3.0, 1.0]])
    from utils.detectors.base import cross_entropy_row_norms
    rows = cross_entropy_rows(logits)  # the cancellation-free rows
    torch.testing.assert_close(cross_entropy_row_norms(logits, 2), rows.norm(dim=2), rtol=1e-5, atol=0)
    torch.testing.assert_close(cross_entropy_row_norms(logits, 1), rows.abs().sum(2), rtol=1e-5, atol=0)
    assert 0 < cross_entropy_row_norms(logits, 2)[0, 0] < 1e-15


def test_k_rows_through_every_layer_are_refused_in_one_paragraph():
    every_layer = [get_detector("min")]
    with pytest.raises(UserError) as error:
        refuse_every_layer_rows(every_layer, 1000, 256)
    message = str(error.value)
    assert "1,000 gradients per image" in message and "--layers last" in message and "--score=pred" in message
    assert "--score=gradnorm" in message and "--batch-size=1000" in message and "\n" not in message
    refuse_every_layer_rows(every_layer, 1000, 1000)  # the memory accepted
    refuse_every_layer_rows(every_layer, 10, 4)  # CIFAR's rows of one image fit, above --batch-size too
    refuse_every_layer_rows(every_layer, 100, 64)
    refuse_every_layer_rows([get_detector("gradnorm"), get_detector("pred")], 1000, 64)
    refuse_every_layer_rows([DETECTORS["min"].on_last_layer()], 1000, 64)


def test_every_tracked_layer_of_a_reduced_resnet50_equals_the_float64_loop():
    """torchvision's in-place ReLU and residual sum touch no tracked layer's input or output."""
    model = tiny_resnet50(3).double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    detector = get_detector("pred")
    _, scores = gradient_scores(model, x, [detector])
    for i in range(len(x)):
        reference = detector.reference(model, x[i])
        for layer, values in scores["pred"].layers.items():
            assert values[i].item() == pytest.approx(reference[layer], rel=1e-10), layer


def test_gaia_is_refused_on_torchvisions_in_place_resnet():
    model = tiny_resnet50(3)
    for name in ("gaia_a", "gaia_z"):
        with pytest.raises(ValueError, match="in place"):
            DETECTORS[name].activations(model)
