"""Every detector, batched, against its own batch-of-one definition (``Detector.reference``: ``zero_grad``,
forward, the paper's loss, ``backward()``, the norm of ``p.grad``), in float64; and each sample's value
inside a batch of mixed images equals its value alone — never one score per batch."""
import pytest
import torch
import torch.nn.functional as F

from tests.test_per_sample import calibrated_model
from utils.detectors import (
    CONFOUNDING,
    DETECTORS,
    TRACK_GRADIENT_SCORES,
    ExGrad,
    GradNorm,
    get_detector,
    gradient_scores,
    rows_per_sample,
)

# torch.backends.mkldnn.flags() warns about a TF32 setting that concerns only Intel GPUs
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")

NUM_CLASSES = 10


def as_rows(scores, i: int) -> dict[str, float]:
    return {**{k: v[i].item() for k, v in scores.layers.items()}, "total": scores.total[i].item(),
            **{k: v[i].item() for k, v in scores.extra.items()}, "class": int(scores.chosen[i])}


def assert_matches(batched: dict[str, float], reference: dict[str, float], tolerance: float) -> None:
    assert batched.keys() == reference.keys()
    assert batched["class"] == reference["class"]
    for key, expected in reference.items():
        assert batched[key] == pytest.approx(expected, rel=tolerance, abs=0), key


# WRN-40-2's float64 definitions take seconds each: its cases run in the full suite, not the fast loop.
@pytest.fixture(scope="module", params=["resnet20", pytest.param("wrn40_2", marks=pytest.mark.slow)])
def model_and_images(request):
    model = calibrated_model(request.param, torch.float64)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x


# GROOD and the low-dimensional gradient need a fit first: tests/test_grood_lowdim.py holds them to their definitions.
@pytest.mark.parametrize("name", [name for name, d in DETECTORS.items() if not d.fit_first])
def test_each_detector_equals_its_batch_of_one_definition(model_and_images, name):
    model, x = model_and_images
    detector = DETECTORS[name]
    _, scores = gradient_scores(model, x, [detector])
    for i, image in enumerate(x):
        assert_matches(as_rows(scores[name], i), detector.reference(model, image), 1e-10)


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_all_detectors_in_one_pass_equal_each_alone(model_and_images):
    model, x = model_and_images
    detectors = [DETECTORS[name] for name in TRACK_GRADIENT_SCORES if not DETECTORS[name].fit_first]
    logits, together = gradient_scores(model, x, detectors)
    for detector in detectors:
        alone_logits, alone = gradient_scores(model, x, [detector])
        torch.testing.assert_close(alone_logits, logits, rtol=0, atol=0)
        for i in range(len(x)):
            assert_matches(as_rows(together[detector.name], i), as_rows(alone[detector.name], i), 1e-12)


def test_gradnorm_follows_the_official_code_at_other_temperatures():
    model = calibrated_model("resnet20", torch.float64)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    detector = get_detector("gradnorm", temperature=1000.0)
    assert isinstance(detector, GradNorm) and detector.options() == {"temperature": 1000.0}
    _, scores = gradient_scores(model, x, [detector])
    for i, image in enumerate(x):
        assert_matches(as_rows(scores["gradnorm"], i), detector.reference(model, image), 1e-10)


def test_gradnorm_last_layer_is_the_rank_one_product():
    """The fc layer's per-sample gradient δhᵀ has ‖·‖₁ = ‖δ‖₁‖h‖₁, δ = (K·p − 1)/T: an independent check from the
    features and the softmax alone."""
    model = calibrated_model("resnet20", torch.float64)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    features = {}
    handle = model.fc.register_forward_hook(lambda m, args, out: features.update(h=args[0]))
    with torch.no_grad():
        probs = model(x).softmax(1)
    handle.remove()
    delta = NUM_CLASSES * probs - 1
    expected = delta.abs().sum(1) * features["h"].abs().sum(1)
    _, scores = gradient_scores(model, x, [DETECTORS["gradnorm"]])
    torch.testing.assert_close(scores["gradnorm"].layers["fc.weight"], expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["gradnorm", pytest.param("min", marks=pytest.mark.slow),
                                  pytest.param("exgrad", marks=pytest.mark.slow)])
def test_a_sample_scores_the_same_in_any_batch(name):
    """A per-sample score must never become a per-batch one: each image of a batch mixing digits-like images and
    noise gets exactly its batch-of-one value, whatever shares its batch."""
    model = calibrated_model("resnet20", torch.float64)
    generator = torch.Generator().manual_seed(4)
    x = torch.cat([torch.rand(3, 3, 32, 32, generator=generator, dtype=torch.float64),
                   torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64).clamp(0, 1)])
    detector = DETECTORS[name]
    _, batched = gradient_scores(model, x[torch.randperm(6, generator=generator)], [detector])
    _, reversed_batch = gradient_scores(model, x.flip(0), [detector])
    for i in range(6):
        _, alone = gradient_scores(model, x[i:i + 1], [detector])
        assert reversed_batch[name].total[5 - i].item() == pytest.approx(alone[name].total[0].item(), rel=1e-12)
    assert batched[name].total.unique().numel() == 6  # six different images, six different values


def test_detectors_state_their_sign_norm_and_headline():
    assert {name: d.sign for name, d in DETECTORS.items()} == {
        "min": -1, "max": +1, "pred": -1, "gradnorm": +1, "exgrad": -1, "odin": +1, "original": +1, "gaia_a": -1,
        "gaia_z": -1, "nac_ue": +1, "grood": +1, "lowdim": +1}
    assert {name: d.norm for name, d in DETECTORS.items()} == {
        "min": 2, "max": 2, "pred": 2, "gradnorm": 1, "exgrad": 2, "odin": None, "original": 2, "gaia_a": None,
        "gaia_z": None, "nac_ue": None, "grood": None, "lowdim": None}
    layers = ["conv1.weight", "fc.weight"]
    assert DETECTORS["gradnorm"].headline_row(layers) == "fc.weight"
    assert DETECTORS["exgrad"].headline_row(layers) == ExGrad.extra_row("fc.weight") == "fc.weight:L1"
    assert DETECTORS["min"].headline_row(layers) == "total"
    assert CONFOUNDING.method == "original" and CONFOUNDING.script == "track_gradient_original.py"
    assert "original" not in TRACK_GRADIENT_SCORES and get_detector(None) is CONFOUNDING
    with pytest.raises(ValueError, match="unknown detector"):
        get_detector("no_such_detector")


def test_rows_per_sample_counts_each_shared_set_of_rows_once():
    detectors = {name: DETECTORS[name] for name in TRACK_GRADIENT_SCORES}
    assert rows_per_sample([detectors["min"]], 10) == 10
    assert rows_per_sample([detectors["pred"]], 10) == 1
    assert rows_per_sample([detectors["min"], detectors["max"], detectors["exgrad"]], 10) == 10
    # K cross-entropy rows, pred, uniform, odin, GAIA's 3, NAC's KL
    assert rows_per_sample(list(detectors.values()), 10) == 17


def test_the_plain_bce_definition_is_the_confounding_label():
    """An independent spelling of the confounding label: BCE against all-ones, summed then divided by K."""
    model = calibrated_model("resnet20", torch.float64)
    image = torch.rand(3, 32, 32, dtype=torch.float64)
    logits = model(image[None])
    model.zero_grad()
    (F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="sum") / NUM_CLASSES).backward()
    expected = model.fc.weight.grad.norm().item()
    assert CONFOUNDING.reference(model, image)["fc.weight"] == pytest.approx(expected, rel=1e-12)
