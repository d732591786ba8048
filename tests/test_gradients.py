"""The batched engine against the plain loop it replaces: a batch of one, ``loss.backward()`` per loss, ``p.grad``
read per layer. Every value is compared: each tracked layer's norm for every class, the chosen class, the total."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from utils.gradients import GradientNorms, gradient_norms, output_gradients, weight_gradient_norms

# torch.backends.mkldnn.flags() warns about a TF32 setting that concerns only Intel GPUs
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")

NUM_CLASSES = 10
NUM_IMAGES = 2
SCORES = ("min", "max", "pred", None)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def calibrated_model(arch: str, dtype: torch.dtype) -> nn.Module:
    """A random model whose BatchNorm statistics were estimated on random images, as training would leave
    them (with the initial ones, a random WRN's logits reach the hundreds). WRN keeps its dropout: eval
    mode must switch it off."""
    torch.manual_seed(0)
    model = models.get_model(arch, NUM_CLASSES)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(torch.rand(32, 3, 32, 32))
    return model.to(dtype).eval()


def plain_loop(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image: per-layer norms (N, K + 1, L) of the K cross-entropy gradients (label k) and the
    confounding-label gradient (last), and the logits (N, K)."""
    params = list(models.tracked_parameters(model).values())
    norms, logits = [], []
    for image in x:
        z = model(image[None])
        rows = []
        for k in range(NUM_CLASSES + 1):
            model.zero_grad()
            loss = (F.cross_entropy(z, torch.tensor([k])) if k < NUM_CLASSES
                    else F.binary_cross_entropy_with_logits(z, torch.ones_like(z)))
            loss.backward(retain_graph=True)
            rows.append(torch.stack([p.grad.norm() for p in params]))
        norms.append(torch.stack(rows))
        logits.append(z.detach()[0])
    return torch.stack(norms), torch.stack(logits)


@pytest.fixture(scope="module", params=[(arch, dtype) for arch in ("resnet20", "wrn40_2")
                                        for dtype in (torch.float64, torch.float32)],
                ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def case(request):
    """Model, images, the loop's results and the tolerance. In float32 oneDNN is off: its convolutions round
    a batch of one and a larger batch differently in the last bit, which can flip a ReLU whose input is
    ~0 and move that sample's gradient by far more than float32 precision in the loop and the engine alike.
    """
    arch, dtype = request.param
    model = calibrated_model(arch, dtype)
    x = torch.rand(NUM_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.backends.mkldnn.flags(enabled=dtype != torch.float32):
        reference, logits = plain_loop(model, x)
        yield model, x, reference, logits, TOLERANCE[dtype]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs() / reference.abs()).max().item()


def test_every_class_and_layer_matches_the_loop(case):
    model, x, reference, logits, tolerance = case
    engine_logits, ce = weight_gradient_norms(model, x, lambda z: output_gradients(z, "min"))
    _, bce = weight_gradient_norms(model, x, lambda z: output_gradients(z, None))
    per_class = torch.stack(list(ce.values()), 2).transpose(0, 1)  # (N, K, L)
    confounding = torch.stack(list(bce.values()), 2).transpose(0, 1)  # (N, 1, L)
    assert relative_error(torch.cat([per_class, confounding], 1), reference) < tolerance
    torch.testing.assert_close(engine_logits, logits)


@pytest.mark.parametrize("score", SCORES)
def test_the_chosen_gradient_matches_the_loop(case, score):
    model, x, reference, logits, tolerance = case
    totals = reference[:, :NUM_CLASSES].pow(2).sum(2).sqrt()  # (N, K)
    expected_class = {"min": totals.argmin(1), "max": totals.argmax(1), "pred": logits.argmax(1),
                      None: torch.full((NUM_IMAGES,), -1)}[score]
    row = expected_class.clamp_min(0) if score is not None else torch.full((NUM_IMAGES,), NUM_CLASSES)
    expected = reference[torch.arange(NUM_IMAGES), row]  # (N, L)

    out = gradient_norms(model, x, score)
    assert isinstance(out, GradientNorms)
    assert list(out.layers) == list(models.tracked_parameters(model))
    assert torch.equal(out.chosen, expected_class)
    assert relative_error(torch.stack(list(out.layers.values()), 1), expected) < tolerance
    assert relative_error(out.total, expected.pow(2).sum(1).sqrt()) < tolerance


def test_confident_predictions_keep_float32_precision():
    """When softmax(z) is within float precision of one-hot, autograd's softmax − e_k rounds p_k − 1 to 0 and
    the squared gradient underflows; the engine still matches the exact float64 gradient."""
    model = calibrated_model("resnet20", torch.float64)
    with torch.no_grad():
        model.fc.weight.mul_(25)  # the top logit ~50 above the next: p_k = 1 − 1e-22
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = list(models.tracked_parameters(model).values())
    expected = []
    for image in x:
        z = model(image[None])
        model.zero_grad()
        z.backward(output_gradients(z.detach(), "pred")[0])  # the exact dCE/dz for the predicted label
        expected.append(torch.stack([p.grad.norm() for p in params]))
    expected = torch.stack(expected)
    assert expected.max() < 1e-15

    with torch.backends.mkldnn.flags(enabled=False):
        out = gradient_norms(model.float(), x.float(), "pred")
    assert relative_error(torch.stack(list(out.layers.values()), 1).double(), expected) < 1e-4


def test_tracking_runs_in_eval_mode_and_leaves_the_model_as_it_was():
    model = calibrated_model("wrn40_2", torch.float32).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    out = gradient_norms(model, x, "pred")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN statistics untouched
    again = gradient_norms(model.eval(), x, "pred")
    assert torch.equal(out.total, again.total)  # dropout off, running statistics used: deterministic


def test_any_stride_padding_dilation_and_shape_matches_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=(1, 2), dilation=(2, 1)), nn.ReLU(),
                          nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(6, 5, 1, stride=2), nn.Flatten(), nn.Linear(5 * 3 * 6, NUM_CLASSES)).double()
    x = torch.rand(NUM_IMAGES, 3, 11, 9, dtype=torch.float64)
    reference, _ = plain_loop(model, x)
    _, ce = weight_gradient_norms(model, x, lambda z: output_gradients(z, "min"))
    assert relative_error(torch.stack(list(ce.values()), 2).transpose(0, 1), reference[:, :NUM_CLASSES]) < 1e-10


def test_an_untrackable_layer_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="1.weight"):
        gradient_norms(model, torch.rand(2, 3, 8, 8), "min")
