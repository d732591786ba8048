"""ODIN (input perturbation) and ``--layers last`` (the last layer's rank-one gradient from the features):
each against an independent computation in float64, each sample's value independent of its batch, and the
scripts' files (options, folders, metrics, ``--compare``) end to end on tiny data."""
import numpy as np
import pytest
import torch

import compute_gradient_metrics
import models
import track_gradient
from models import tracked_parameters
from tests.test_detectors import as_rows, assert_matches
from tests.test_track_gradient import load, make_checkpoint, run
from utils.detectors import DETECTORS, ODIN, ce_losses, get_detector, gradient_scores, rows_per_sample
from utils.errors import UserError
from utils.gradients import gradient_path, load_gradients
from utils.per_sample import reference_norms

pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar_normalised(arch: str) -> torch.nn.Module:
    """A float64 model that normalises with CIFAR-10's mean and std (so the units of ε matter), its BatchNorm
    statistics estimated on random images as in ``calibrated_model``."""
    torch.manual_seed(0)
    model = models.get_model(arch, 10, CIFAR_MEAN, CIFAR_STD)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(32, 3, 32, 32))
    return model.to(torch.float64).eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module", params=["resnet20", pytest.param("wrn40_2", marks=pytest.mark.slow)])
def model(request):
    return cifar_normalised(request.param)


@pytest.mark.parametrize("temperature, epsilon", [(1000.0, 0.0014), pytest.param(1.0, 0.01, marks=pytest.mark.slow)])
def test_odin_equals_the_official_path_through_the_normalised_image(model, temperature, epsilon):
    """The batched step of ε on [0, 1] images equals the official code's step of ε/σ on normalised images, with
    its backward() to the normalised input; the official ε/σ copied onto [0, 1] images would not."""
    detector = get_detector("odin", odin_temperature=temperature, epsilon=epsilon)
    x = images(3, 1)
    _, scores = gradient_scores(model, x, [detector])
    for i, image in enumerate(x):
        assert_matches(as_rows(scores["odin"], i), detector.reference(model, image), 1e-10)
    _, misread = gradient_scores(model, x, [ODIN(temperature, epsilon / CIFAR_STD[0])])
    assert not torch.allclose(misread["odin"].total, scores["odin"].total, rtol=1e-6, atol=0)


def test_odin_scores_a_sample_the_same_in_any_batch():
    model = cifar_normalised("resnet20")
    generator = torch.Generator().manual_seed(4)
    x = torch.cat([torch.rand(3, 3, 32, 32, generator=generator, dtype=torch.float64),
                   torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64).clamp(0, 1)])
    detector = DETECTORS["odin"]
    order = torch.randperm(6, generator=generator)
    _, mixed = gradient_scores(model, x[order], [detector])
    for position, i in enumerate(order.tolist()):
        _, alone = gradient_scores(model, x[i:i + 1], [detector])
        assert mixed["odin"].total[position].item() == pytest.approx(alone["odin"].total[0].item(), rel=1e-12)
        assert mixed["odin"].chosen[position] == alone["odin"].chosen[0]
    assert mixed["odin"].total.unique().numel() == 6


def test_odin_moves_the_image_towards_a_more_confident_prediction():
    """The step lowers CE(f(x)/T, ŷ), so the perturbed max softmax at T exceeds the unperturbed one (the reason
    ID images, whose softmax moves more, score higher); its sign is +1 and its options are T and ε."""
    model = cifar_normalised("resnet20")
    x = images(4, 2)
    detector = get_detector("odin", odin_temperature=1000.0, epsilon=0.0005)
    logits, scores = gradient_scores(model, x, [detector])
    assert (scores["odin"].total > (logits / 1000).softmax(1).amax(1)).all()
    assert torch.equal(scores["odin"].chosen, logits.argmax(1))
    assert detector.sign == +1 and detector.options() == {"temperature": 1000.0, "epsilon": 0.0005}
    assert DETECTORS["odin"].options() == {"temperature": 1000.0, "epsilon": 0.0014}
    assert rows_per_sample([detector], 10) == 1
    with pytest.raises(ValueError, match="--layers last does not apply"):
        detector.on_last_layer()


@pytest.mark.parametrize("name", ["gradnorm", "exgrad", "pred", "original"])
def test_last_layer_equals_the_full_engine_on_that_layer(model, name):
    """--layers last (features and softmax, no backward pass) against the engine's back-propagated values of the
    last layer; for GradNorm and ExGrad that is the paper's score."""
    x = images(4, 3)
    full = gradient_scores(model, x, [DETECTORS[name]])[1][name]
    last_detector = DETECTORS[name].on_last_layer()
    last = gradient_scores(model, x, [last_detector])[1][name]
    fc = list(tracked_parameters(model))[-1]
    assert list(last.layers) == [fc] and last.extra.keys() == full.extra.keys()
    torch.testing.assert_close(last.layers[fc], full.layers[fc], rtol=1e-12, atol=0)
    torch.testing.assert_close(last.total, full.layers[fc], rtol=1e-12, atol=0)  # the one layer is the total
    for row, values in full.extra.items():
        torch.testing.assert_close(last.extra[row], values, rtol=1e-12, atol=0)
    assert last_detector.options() == {**DETECTORS[name].options(), "layers": "last"}
    assert last_detector.folder == f"{name}-last" and DETECTORS[name].folder == name


@pytest.mark.parametrize("name", ["min", "max"])
def test_last_layer_min_and_max_keep_the_class_by_that_layer(name):
    """With the last layer alone tracked, min/max keep the label whose fc gradient (batch of one, backward())
    is smallest/largest."""
    model = cifar_normalised("resnet20")
    x = images(3, 5)
    last = gradient_scores(model, x, [DETECTORS[name].on_last_layer()])[1][name]
    for i, image in enumerate(x):
        fc_norms = reference_norms(model, image, ce_losses)[:, -1]  # (K,)
        k = int(fc_norms.argmin() if name == "min" else fc_norms.argmax())
        assert int(last.chosen[i]) == k
        assert last.total[i].item() == pytest.approx(fc_norms[k].item(), rel=1e-10)


def test_last_layer_with_other_detectors_in_one_call_is_unchanged():
    model = cifar_normalised("resnet20")
    x = images(3, 6)
    detectors = [DETECTORS["gradnorm"].on_last_layer(), DETECTORS["exgrad"].on_last_layer()]
    logits, together = gradient_scores(model, x, detectors)
    for detector in detectors:
        alone_logits, alone = gradient_scores(model, x, [detector])
        torch.testing.assert_close(alone_logits, logits, rtol=0, atol=0)
        torch.testing.assert_close(alone[detector.name].total, together[detector.name].total, rtol=0, atol=0)
    assert rows_per_sample(detectors, 10) == 1  # nothing back-propagated: an image counts once


# --- the scripts, on a random model checkpointed for digits and the generated OOD sets ---

@pytest.fixture
def roots(tmp_path):
    return {"checkpoint": tmp_path / "checkpoints", "gradient": tmp_path / "gradients", "data": tmp_path / "datasets",
            "results": tmp_path / "results"}


def metrics(roots: dict, *args: str) -> None:
    compute_gradient_metrics.main(["--name=net", "--in-dataset=digits", *args,
                                   f"--gradient-root={roots['gradient']}", f"--results-root={roots['results']}"])


def test_odin_options_are_recorded_and_other_options_retrack(roots):
    make_checkpoint(roots["checkpoint"], "net")
    common = ("--name=net", "--dataset=gaussian", "--score=odin", "--limit=4")
    run(track_gradient, roots, *common)
    record = load(roots, "net", "odin", "digits")
    assert record["options"] == {"temperature": 1000.0, "epsilon": 0.0014} and record["norm"] == "none"
    assert list(record["layers"]) == ["perturbed_msp"]
    np.testing.assert_array_equal(record["layers"]["perturbed_msp"], record["total"])
    np.testing.assert_array_equal(record["class"], record["pred"])
    run(track_gradient, roots, *common, "--epsilon=0.01", "--odin-temperature=10")
    retracked = load(roots, "net", "odin", "digits")
    assert retracked["options"] == {"temperature": 10.0, "epsilon": 0.01}
    assert not np.allclose(retracked["total"], record["total"])
    run(track_gradient, roots, "--name=net", "--dataset=gaussian", "--score=gradnorm", "--limit=4",
        "--odin-temperature=10")  # GradNorm keeps its own temperature
    assert load(roots, "net", "gradnorm", "digits")["options"] == {"temperature": 1.0}


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_last_layer_files_live_beside_the_full_ones_and_equal_their_last_layer(roots):
    make_checkpoint(roots["checkpoint"], "net")
    common = ("--name=net", "--dataset=gaussian", "--limit=5", "--batch-size=4")
    for score in ("gradnorm", "exgrad"):
        run(track_gradient, roots, *common, f"--score={score}")
        full_file = gradient_path("digits", "net", score, "digits", roots["gradient"])
        written = full_file.stat().st_mtime_ns
        run(track_gradient, roots, *common, f"--score={score}", "--layers=last")
        assert full_file.stat().st_mtime_ns == written  # not stale, not replaced
        for dataset in ("digits", "gaussian"):
            full = load(roots, "net", score, dataset)
            last = load_last(roots, score, dataset)
            assert last["options"] == {**full["options"], "layers": "last"}
            assert list(last["layers"]) == ["fc.weight"] and list(last["extra"]) == list(full["extra"])
            np.testing.assert_allclose(last["layers"]["fc.weight"], full["layers"]["fc.weight"], rtol=1e-5)
            for row, values in full["extra"].items():
                np.testing.assert_allclose(last["extra"][row], values, rtol=1e-5)
            for key in ("pred", "label"):
                np.testing.assert_array_equal(last[key], full[key])
    metrics(roots, "--saved_form=norm_single", "--score=exgrad", "--layers=last", "--dataset=gaussian")
    metrics(roots, "--compare", "--layers=last")
    compared = (roots["results"] / "digits" / "net" / "compare-last" / "comparison.csv").read_text()
    assert "gradnorm,detector,fc.weight" in compared and "exgrad,detector,fc.weight:L1" in compared
    with pytest.raises(UserError, match=r"layers 'all' \(expected 'last'\)"):  # a full ID file is not a last-layer one
        full_id = gradient_path("digits", "net", "gradnorm", "digits", roots["gradient"])
        gradient_path("digits", "net", "gradnorm", "digits", roots["gradient"], True).write_bytes(full_id.read_bytes())
        metrics(roots, "--saved_form=norm_single", "--score=gradnorm", "--layers=last", "--dataset=gaussian")


def load_last(roots: dict, score: str, dataset: str) -> dict:
    return load_gradients(gradient_path("digits", "net", score, dataset, roots["gradient"], True))


def test_score_all_with_last_layer_equals_single_runs_and_leaves_odin_out(roots, capsys):
    make_checkpoint(roots["checkpoint"], "net")
    common = ("--name=net", "--dataset=blobs", "--limit=5", "--layers=last")
    run(track_gradient, roots, *common, "--score=all")
    folder = roots["gradient"] / "digits" / "net"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{d}-last" for d in ("min", "max", "pred", "gradnorm", "exgrad"))
    together = {d: load_last(roots, d, "blobs") for d in ("min", "max", "pred", "gradnorm", "exgrad")}
    roots["gradient"] = roots["gradient"].with_name("alone")
    for score, expected in together.items():
        run(track_gradient, roots, *common, f"--score={score}")
        alone = load_last(roots, score, "blobs")
        for key in ("total", "class"):
            np.testing.assert_array_equal(alone[key], expected[key])
    with pytest.raises(SystemExit):
        run(track_gradient, roots, *common, "--score=odin")
    assert "ODIN perturbs the input" in capsys.readouterr().err


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_odin_reads_in_the_per_layer_tables_and_the_comparison(roots, capsys):
    make_checkpoint(roots["checkpoint"], "net")
    for score in ("odin", "gradnorm"):
        run(track_gradient, roots, "--name=net", "--dataset=rademacher", f"--score={score}", "--limit=6")
    metrics(roots, "--saved_form=norm_single", "--score=odin", "--dataset=rademacher", "--plot")
    out = capsys.readouterr().out
    assert "detection score = +value;" in out and "perturbed_msp" in out and "none norms" not in out
    metrics(roots, "--compare", "--plot")
    out = capsys.readouterr().out
    assert "odin: total (+value)" in out and "gradnorm: fc.weight (+norm L1)" in out
    assert (roots["results"] / "digits" / "net" / "compare" / "odin_layers.png").is_file()
