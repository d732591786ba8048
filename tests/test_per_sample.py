"""The batched engine against the plain loop it replaces (``utils.per_sample.reference_norms``: a batch of one,
``loss.backward()`` per loss, ``p.grad`` read per layer). Every value is compared: each tracked layer's L2 and
L1 norm for every class and the confounding label; the chosen class and total (through ``utils.detectors``)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from utils import norm_rules
from utils.detectors import DETECTORS, cross_entropy_rows, gradient_scores
from utils.norm_rules import norm_rule
from utils.per_sample import reference_norms, tf32_settings, tracked_layers, weight_gradient_norms

# torch.backends.mkldnn.flags() warns about a TF32 setting that concerns only Intel GPUs
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")

NUM_CLASSES = 10
NUM_IMAGES = 2
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


def every_loss(logits: torch.Tensor) -> list[torch.Tensor]:
    """The K cross-entropy losses (label k), then the confounding label's BCE."""
    return [*(F.cross_entropy(logits, torch.tensor([k])) for k in range(logits.shape[1])),
            F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))]


def every_row(logits: torch.Tensor) -> torch.Tensor:
    """The same losses' dL/dlogits, as the engine back-propagates them: (K + 1, B, K)."""
    return torch.cat([cross_entropy_rows(logits), DETECTORS["original"].output_gradients(logits)])


def plain_loop(model: nn.Module, x: torch.Tensor, p: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer p-norms (N, K + 1, L) of every loss, one image at a time, and the logits (N, K)."""
    with torch.no_grad():
        logits = model(x)
    return torch.stack([reference_norms(model, image, every_loss, p) for image in x]), logits


def engine(model: nn.Module, x: torch.Tensor, p: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    logits, (norms,) = weight_gradient_norms(model, x, every_row, ((0, p, None),))
    return torch.stack(list(norms.values()), 2).transpose(0, 1), logits  # (N, K + 1, L)


# WRN-40-2's plain loop takes tens of seconds: its cases run in the full suite, not the fast loop.
ARCHS = ["resnet20", pytest.param("wrn40_2", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=[pytest.param((arch, dtype), marks=pytest.mark.slow if arch == "wrn40_2" else ())
                                        for arch in ("resnet20", "wrn40_2")
                                        for dtype in (torch.float64, torch.float32)],
                ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def case(request):
    """Model, images, the loop's L2 results and the tolerance. In float32 oneDNN is off: its convolutions round
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
    norms, engine_logits = engine(model, x)
    assert relative_error(norms, reference) < tolerance
    torch.testing.assert_close(engine_logits, logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_l1_norms_of_every_class_and_layer_match_the_loop(arch):
    model = calibrated_model(arch, torch.float64)
    x = torch.rand(NUM_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference, _ = plain_loop(model, x, p=1)
    assert relative_error(engine(model, x, p=1)[0], reference) < 1e-10


@pytest.mark.parametrize("score", ["min", "max", "pred", "original"])
def test_the_chosen_gradient_matches_the_loop(case, score):
    model, x, reference, logits, tolerance = case
    totals = reference[:, :NUM_CLASSES].pow(2).sum(2).sqrt()  # (N, K)
    expected_class = {"min": totals.argmin(1), "max": totals.argmax(1), "pred": logits.argmax(1),
                      "original": torch.full((NUM_IMAGES,), -1)}[score]
    row = expected_class.clamp_min(0) if score != "original" else torch.full((NUM_IMAGES,), NUM_CLASSES)
    expected = reference[torch.arange(NUM_IMAGES), row]  # (N, L)

    _, scores = gradient_scores(model, x, [DETECTORS[score]])
    out = scores[score]
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
        z.backward(DETECTORS["pred"].output_gradients(z.detach())[0])  # the exact dCE/dz for the predicted label
        expected.append(torch.stack([p.grad.norm() for p in params]))
    expected = torch.stack(expected)
    assert expected.max() < 1e-15

    with torch.backends.mkldnn.flags(enabled=False):
        _, scores = gradient_scores(model.float(), x.float(), [DETECTORS["pred"]])
    assert relative_error(torch.stack(list(scores["pred"].layers.values()), 1).double(), expected) < 1e-4


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_tracking_runs_in_eval_mode_and_leaves_the_model_as_it_was():
    model = calibrated_model("wrn40_2", torch.float32).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    _, out = gradient_scores(model, x, [DETECTORS["pred"]])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN statistics untouched
    _, again = gradient_scores(model.eval(), x, [DETECTORS["pred"]])
    assert torch.equal(out["pred"].total, again["pred"].total)  # dropout off, running statistics used


@pytest.mark.parametrize("p", [1, 2])
def test_any_stride_padding_dilation_and_shape_matches_the_loop(p):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=(1, 2), dilation=(2, 1)), nn.ReLU(),
                          nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(6, 5, 1, stride=2), nn.Flatten(), nn.Linear(5 * 3 * 6, NUM_CLASSES)).double()
    x = torch.rand(NUM_IMAGES, 3, 11, 9, dtype=torch.float64)
    reference, _ = plain_loop(model, x, p)
    assert relative_error(engine(model, x, p)[0], reference) < 1e-10


@pytest.mark.parametrize("p", [1, 2])
def test_a_batch_cut_into_chunks_of_samples_gives_the_same_norms(monkeypatch, p):
    """The rules work on chunks of samples of at most ``RULE_CHUNK_ELEMENTS`` gradient elements (so that a large
    batch stays in cache): one sample a chunk gives what the whole batch does."""
    model = calibrated_model("resnet20", torch.float64)
    x = torch.rand(NUM_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    whole, _ = engine(model, x, p)
    monkeypatch.setattr(norm_rules, "RULE_CHUNK_ELEMENTS", 1)
    chunked, _ = engine(model, x, p)
    assert relative_error(chunked, whole) < 1e-12


@pytest.mark.parametrize("p", [1, 2])
def test_every_convolution_path_gives_the_same_norms(p):
    """The Conv2d rule's paths — the Gram identity over the patches or over the padded input, one grouped
    convolution, the patch matrix — on odd shapes (dilation, asymmetric padding and kernels, stride, R = 2 rows):
    which one it takes is a matter of speed only."""
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 4, 3, padding=(1, 2), dilation=(2, 1)), nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1),
                 nn.Conv2d(5, 3, 1)):
        conv = conv.double()
        x = torch.rand(3, conv.in_channels, 11, 9, dtype=torch.float64)
        grads = torch.randn(2, *conv(x).shape, dtype=torch.float64)  # (R, B, O, H', W')
        explicit = norm_rules._conv_explicit(conv, x, grads, p)
        paths = {"grouped": norm_rules._grouped(conv, x, grads, p)}
        if p == 2:
            paths["gram"] = norm_rules._conv_gram(conv, x, grads, p)
            paths["input_gram"] = norm_rules._conv_input_gram(conv, x, grads, p)
        for name, values in paths.items():
            assert relative_error(values, explicit) < 1e-12, (conv, name)


@pytest.mark.parametrize("p", [1, 2])
def test_a_linear_layer_over_positions_matches_the_loop(p):
    """A Linear applied at every position of a sequence (input (B, S, I)): the rank-one shortcut does not
    apply, the Gram identity (L2) or the explicit gradient (L1) must."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(2), Transpose(), nn.Linear(3, 5), nn.Tanh(), nn.Flatten(),
                          nn.Linear(5 * 16, NUM_CLASSES)).double()
    x = torch.rand(NUM_IMAGES, 3, 4, 4, dtype=torch.float64)
    reference, _ = plain_loop(model, x, p)
    assert relative_error(engine(model, x, p)[0], reference) < 1e-10


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def test_an_untrackable_layer_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="1.weight"):
        gradient_scores(model, torch.rand(2, 3, 8, 8), [DETECTORS["min"]])


def test_a_new_layer_type_is_one_registered_rule():
    """``norm_rule`` registers a layer type: here a Linear subclass, with the rank-one rule of a Linear."""
    class Scaled(nn.Linear):
        pass

    model = nn.Sequential(nn.Flatten(), Scaled(12, NUM_CLASSES)).double()
    with pytest.raises(ValueError, match="register a rule"):
        tracked_layers(model)

    @norm_rule(Scaled)
    def scaled_norms(module, inputs, grads, p):  # (R, B, O) and (B, I)
        return grads.abs().pow(p).sum(2) * inputs.abs().pow(p).sum(1)

    try:
        x = torch.rand(NUM_IMAGES, 3, 2, 2, dtype=torch.float64)
        reference, _ = plain_loop(model, x, 2)
        assert relative_error(engine(model, x, 2)[0].pow(2), reference.pow(2)) < 1e-10
    finally:
        del norm_rules.RULES[Scaled]


MATMUL, CUDNN = torch.backends.cuda.matmul, torch.backends.cudnn
NEW_TF32_API = hasattr(CUDNN, "conv")  # torch >= 2.9: a precision per operation, over the allow_tf32 flags


def tf32_state() -> tuple:
    """TF32 for matrix products and convolutions, as the kernels read it (and the new API's global setting)."""
    return (*(getattr(owner, name) for owner, name in tf32_settings()),
            *([torch.backends.fp32_precision] if NEW_TF32_API else []))


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_is_off_while_tracking_unless_asked_and_the_settings_come_back(tf32):
    """On Ampere and later GPUs PyTorch runs convolutions in TF32 by default, ~1e-3 relative: the engine turns
    TF32 off for matrix products and convolutions while it tracks (on with ``tf32``, to measure it) and gives the
    caller's settings back, whichever API set them. The settings are read inside the forward pass; on the CPU
    they change nothing."""
    model = calibrated_model("resnet20", torch.float32)
    seen = []
    model.conv1.register_forward_hook(lambda *_: seen.append(tf32_state()[:2]))
    expected = ("tf32", "tf32") if tf32 else ("ieee", "ieee")
    setups = [(MATMUL, "allow_tf32", True), (CUDNN, "allow_tf32", True), (CUDNN, "allow_tf32", False)]
    if NEW_TF32_API:  # the new API alone, per operation and globally; then the two APIs disagree
        setups += [(CUDNN.conv, "fp32_precision", "ieee"), (MATMUL, "fp32_precision", "tf32"),
                   (torch.backends, "fp32_precision", "tf32")]
    legacy = MATMUL.allow_tf32, CUDNN.allow_tf32
    caller = tf32_state()
    try:
        for owner, name, value in setups:
            setattr(owner, name, value)
            before = tf32_state()
            _, out = gradient_scores(model, torch.rand(2, 3, 32, 32), [DETECTORS["min"]], tf32=tf32)
            assert seen.pop() == (expected if NEW_TF32_API else (tf32, tf32)), (name, value)
            assert tf32_state() == before, (name, value)
            assert out["min"].total.isfinite().all()
    finally:
        MATMUL.allow_tf32, CUDNN.allow_tf32 = legacy
        if NEW_TF32_API:
            MATMUL.fp32_precision, CUDNN.conv.fp32_precision, torch.backends.fp32_precision = caller
    assert tf32_state() == caller
