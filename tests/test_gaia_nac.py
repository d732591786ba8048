"""GAIA-A and GAIA-Z (Chen et al., NeurIPS 2023) and NAC-UE (Liu et al., ICLR 2024): the official layer choice
mapped onto our architectures, independent checks of what is differentiated, batched values against the
official-style batch-of-one definition (``reference``: hooks on module outputs, ``backward()``) in float64, batch
independence, NAC's coverage against the official estimator, its fit on the training file only, and the files end
to end.
(Every detector's reference on ResNet-20 and WRN-40-2, and ``--score all`` against single runs, are also held in
tests/test_detectors.py, which runs over every unit.)"""
import json

import numpy as np
import pytest
import torch
from torch import nn

import compute_gradient_metrics
import track_gradient
from tests.test_detectors import as_rows, assert_matches
from tests.test_per_sample import calibrated_model
from tests.test_track_gradient import load, make_checkpoint, roots  # noqa: F401  (the roots fixture)
from tests.test_track_gradient import run as run_tracking
from utils.activation_rules import FEATURES
from utils.coverage import coverage_scores, fit_record, nac_states, score_record, thresholds
from utils.detectors import DETECTORS, NAC_HYPER, batchnorms, gaia_a_targets, gradient_scores, nac_layers
from utils.gradients import save_gradients
from utils.metrics import ood_metrics
from utils.tables import detection_score

pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")

GAIA = ("gaia_a", "gaia_z")


def bn_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{name}" for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_the_official_layer_choice_is_mapped_onto_each_architecture():
    """hook.py: resnet18/34/50 hook the BatchNorms of layer3 and layer4, then layer4's output; wrn_40_2 every
    BatchNorm, then the pooled features; cal_zero's bn hooks are every BatchNorm."""
    resnet18 = calibrated_model("resnet18", torch.float32)
    expected = bn_names(resnet18.layer3, "layer3") + bn_names(resnet18.layer4, "layer4")
    assert gaia_a_targets(resnet18) == (tuple(expected), "layer4")
    assert len(expected) == 10 and "layer4.0.shortcut.1" in expected  # 2 blocks × 2, and each stage's shortcut BN
    resnet20 = calibrated_model("resnet20", torch.float32)
    last_two = bn_names(resnet20.layer2, "layer2") + bn_names(resnet20.layer3, "layer3")
    assert gaia_a_targets(resnet20) == (tuple(last_two), "layer3")
    wrn = calibrated_model("wrn40_2", torch.float32)
    every = tuple(name for name, m in wrn.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert gaia_a_targets(wrn) == (every, FEATURES) and len(every) == 37 and every[-1] == "bn"
    assert DETECTORS["gaia_z"].activations(wrn) == (("nonzero", every),) and batchnorms(wrn) == every


@pytest.mark.parametrize("arch", ["resnet20", pytest.param("wrn40_2", marks=pytest.mark.slow)])
def test_gaia_a_output_component_is_the_head_gradient(arch):
    """An independent check of o: dΣ_k log softmax_k/dh = Wᵀ(1 − K·p) at the pooled features h (a ResNet's last
    feature map is averaged into h: its spatial mean of the gradient is that over H·W). The inner component does
    not depend on the head, so two models that differ only in the head's weights have totals in the ratio of
    their o², computed here from the logits and the head alone."""
    model = calibrated_model(arch, torch.float64)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scaled = calibrated_model(arch, torch.float64)
    with torch.no_grad():
        scaled.fc.weight.mul_(torch.linspace(0.5, 2.0, 10, dtype=torch.float64)[:, None])
    pixels = 1 if arch == "wrn40_2" else (x.shape[-1] // 4) ** 2  # ResNet-20's last stage is at 1/4 resolution

    def output_component(net: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            probs = net(x).softmax(1)
        return ((1 - 10 * probs) @ net.fc.weight / pixels).abs().mean(1).sqrt()

    _, first = gradient_scores(model, x, [DETECTORS["gaia_a"]])
    _, second = gradient_scores(scaled, x, [DETECTORS["gaia_a"]])
    ratio = first["gaia_a"].total / second["gaia_a"].total
    torch.testing.assert_close(ratio, (output_component(scaled) / output_component(model)) ** 2, rtol=1e-10, atol=0)


def test_gaia_z_counts_the_relus_that_are_on_after_the_last_batchnorm():
    """WRN's last BatchNorm feeds relu → average pool → fc: the max logit's gradient there is W[argmax]ᵀ/HW on
    the entries where the ReLU is on and zero elsewhere, so its non-zero fraction per channel is the fraction of
    positive entries of that BatchNorm's output (every fc weight of a random model is non-zero)."""
    model = calibrated_model("wrn40_2", torch.float64)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    kept = {}
    handle = model.bn.register_forward_hook(lambda m, args, out: kept.update(a=out.detach()))
    _, scores = gradient_scores(model, x, [DETECTORS["gaia_z"]])
    handle.remove()
    assert (model.fc.weight != 0).all()
    expected = (kept["a"] > 0).to(torch.float64).mean((2, 3)).pow(2).mean(1)
    torch.testing.assert_close(scores["gaia_z"].layers["bn"], expected, rtol=0, atol=0)


@pytest.mark.slow
def test_resnet18_stage_choice_equals_its_official_definition():
    model = calibrated_model("resnet18", torch.float64)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _, scores = gradient_scores(model, x, [DETECTORS[name] for name in GAIA])
    for name in GAIA:
        for i, image in enumerate(x):
            assert_matches(as_rows(scores[name], i), DETECTORS[name].reference(model, image), 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "wrn40_2"])
def test_a_sample_scores_the_same_in_any_batch(arch):
    """The official code scores a batch at once (eval mode makes samples independent): each image of a batch
    mixing images and noise gets its batch-of-one value."""
    model = calibrated_model(arch, torch.float64)
    generator = torch.Generator().manual_seed(8)
    x = torch.cat([torch.rand(2, 3, 16, 16, generator=generator, dtype=torch.float64),
                   torch.randn(2, 3, 16, 16, generator=generator, dtype=torch.float64).clamp(0, 1)])
    detectors = [DETECTORS[name] for name in (*GAIA, "nac_ue")]
    _, batched = gradient_scores(model, x.flip(0), detectors)
    for i in range(len(x)):
        _, alone = gradient_scores(model, x[i:i + 1], detectors)
        for name in (*GAIA, "nac_ue"):
            assert_matches(as_rows(batched[name], len(x) - 1 - i), as_rows(alone[name], 0), 1e-12)
        for layer, states in alone["nac_ue"].features.items():
            # rtol: σ(α·x) far in its tail is exp(−α·x), which multiplies x's relative rounding by α·|x|
            torch.testing.assert_close(batched["nac_ue"].features[layer][len(x) - 1 - i], states[0], rtol=1e-9, atol=0)
    assert batched["gaia_a"].total.unique().numel() == len(x)


def test_gaia_signs_follow_the_official_ranking():
    """eval.py ranks by −cal_grad_value / −cal_zero (higher = in-distribution): ID has the smaller value."""
    assert DETECTORS["gaia_a"].sign == DETECTORS["gaia_z"].sign == -1 and DETECTORS["nac_ue"].sign == +1
    assert DETECTORS["gaia_a"].headline_row(["conv1.weight"]) == "total"
    assert list(detection_score(np.array([1.0, 2.0]), "norm_single", "gaia_a")) == [-1.0, -2.0]


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_tracked_files_are_read_by_the_per_layer_tables_and_the_comparison(roots, capsys):  # noqa: F811
    """track_gradient.py --score=gaia_a/gaia_z/nac_ue writes the real format (GAIA: rows per BatchNorm; NAC: rows
    per layer and the states in features; the official score in total); compute_gradient_metrics.py scores them
    with their sign, per layer and in --compare."""
    model = make_checkpoint(roots["checkpoint"], "net")
    for name in (*GAIA, "nac_ue"):
        run_tracking(track_gradient, roots, "--name=net", "--dataset=gaussian", f"--score={name}", "--limit=6")
    records = {name: (load(roots, "net", name, "digits"), load(roots, "net", name, "gaussian"))
               for name in (*GAIA, "nac_ue")}
    assert list(records["nac_ue"][0]["layers"]) == list(nac_states(records["nac_ue"][0])) == [
        "features", "layer2", "layer1"]
    assert "penultimate" in records["nac_ue"][0]["features"]  # every file's, beside NAC's states
    assert list(records["gaia_z"][0]["layers"]) == list(batchnorms(model))
    assert list(records["gaia_a"][0]["layers"]) == list(gaia_a_targets(model)[0])
    results = roots["gradient"].parent / "results"
    common = [f"--gradient-root={roots['gradient']}", f"--results-root={results}", "--in-dataset=digits",
              "--name=net", "--dataset=gaussian"]
    for name, (id_record, ood_record) in records.items():
        compute_gradient_metrics.main([*common, "--saved_form=norm_single", f"--score={name}"])
        table = json.loads((results / "digits/net" / f"norm_single-{name}" / "gaussian.json").read_text())
        total = next(r for r in table["rows"] if r["row"] == "total")
        sign = DETECTORS[name].sign
        expected = ood_metrics(sign * id_record["total"].astype(np.float64),
                               sign * ood_record["total"].astype(np.float64))
        assert total["AUROC"] == pytest.approx(100 * expected["AUROC"])
        assert table["gradient_score"] == ("-value" if sign < 0 else "+value")  # not norms: the file says "none"
    compute_gradient_metrics.main([*common, "--compare"])
    comparison = json.loads((results / "digits/net/compare/comparison.json").read_text())
    assert {(r["name"], r["row"]) for r in comparison["rows"] if r["kind"] == "detector"} == {
        ("gaia_a", "total"), ("gaia_z", "total"), ("nac_ue", "total")}
    assert "gaia_a: total" in capsys.readouterr().out


# ---- NAC-UE -------------------------------------------------------------------------------------------------

@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_nac_layers_map_the_official_choice():
    """Official CIFAR ResNet-18: avgpool, layer3, layer2, layer1 (every stage but the last, and the pooled features)."""
    assert nac_layers(calibrated_model("resnet18", torch.float32)) == (FEATURES, "layer3", "layer2", "layer1")
    assert nac_layers(calibrated_model("resnet20", torch.float32)) == (FEATURES, "layer2", "layer1")
    assert nac_layers(calibrated_model("wrn40_2", torch.float32)) == (FEATURES, "block2", "block1")
    assert NAC_HYPER[10][0] == (100, 50, 50)  # nac_cifar10.yml, avgpool: sig_alpha 100, M 50, O 50


@pytest.mark.parametrize("arch", ["resnet20", "wrn40_2", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_nac_states_equal_the_official_definition(arch):
    model = calibrated_model(arch, torch.float64)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    _, scores = gradient_scores(model, x, [DETECTORS["nac_ue"]])
    for i, image in enumerate(x):
        expected = DETECTORS["nac_ue"].reference_states(model, image)
        assert list(scores["nac_ue"].features) == list(expected)
        for layer, states in expected.items():
            torch.testing.assert_close(scores["nac_ue"].features[layer][i], states, rtol=1e-10, atol=1e-300)


def test_nac_features_state_is_the_head_gradient_times_the_features():
    """An independent spelling of the pooled-features layer: dKL/dh = Wᵀ(p − 1/K), state = σ(α · h ⊙ that)."""
    model = calibrated_model("resnet20", torch.float64)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    kept = {}
    handle = model.fc.register_forward_pre_hook(lambda m, args: kept.update(h=args[0].detach()))
    _, scores = gradient_scores(model, x, [DETECTORS["nac_ue"]])
    handle.remove()
    with torch.no_grad():
        grad = (model(x).softmax(1) - 0.1) @ model.fc.weight
    torch.testing.assert_close(scores["nac_ue"].features[FEATURES], torch.sigmoid(100 * kept["h"] * grad),
                               rtol=1e-12, atol=1e-300)


def official_estimator(train: np.ndarray, test: np.ndarray, bins: int, full: int) -> np.ndarray:
    """coverage.py's Estimator, as written there: every state against every interval at once, t_act the counts,
    n_coverage = min(t_act / O, 1), ood_test the covered interval's value averaged over the neurons."""
    edges = torch.from_numpy(thresholds(bins)).view(bins, -1).repeat(1, train.shape[1])

    def intervals(states: np.ndarray) -> torch.Tensor:
        s = torch.from_numpy(states).unsqueeze(1)
        return (s >= edges[:bins - 1].unsqueeze(0)) & (s < edges[1:bins].unsqueeze(0))

    coverage = torch.min(intervals(train).sum(0) / full, torch.ones(bins - 1, train.shape[1], dtype=torch.float64))
    return (intervals(test) * coverage.unsqueeze(0)).sum(1).mean(1).numpy()


def test_thresholds_follow_the_official_logspace():
    edges = thresholds(50)
    assert len(edges) == 50 and edges[0] == 0 and list(edges[-2:]) == [1.01, 1.2] and (np.diff(edges) > 0).all()
    np.testing.assert_allclose(edges[1:24] + edges[47:24:-1], 1, rtol=1e-12)  # symmetric about 1/2 below 1


def test_coverage_scores_equal_the_official_estimator():
    rng = np.random.default_rng(0)
    train = {"a": rng.beta(0.5, 0.5, (200, 6)).astype(np.float32), "b": rng.random((200, 4)).astype(np.float32)}
    test = {"a": rng.random((30, 6)).astype(np.float32), "b": rng.beta(2, 5, (30, 4)).astype(np.float32)}
    record = {"features": train, "model": {"num_classes": 10}}
    fit = fit_record(record)
    layers, total = coverage_scores(fit, test)
    (_, m_a, o_a), (_, m_b, o_b) = NAC_HYPER[10][:2]
    expected = {"a": official_estimator(train["a"], test["a"], m_a, o_a),
                "b": official_estimator(train["b"], test["b"], m_b, o_b)}
    for name, values in expected.items():  # the official t_act / O is float32
        np.testing.assert_allclose(layers[name], values, rtol=1e-6)
    np.testing.assert_allclose(total, (expected["a"] + expected["b"]) / 2, rtol=1e-6)
    assert fit.num_samples == 200 and total.max() > 0


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_nac_is_fit_on_the_training_file_only(roots):  # noqa: F811
    """track_gradient.py --score=nac_ue tracks the training split first and scores every set under its fit; more
    test sets leave the fit (and train.pkl) unchanged, another training file changes every score."""
    make_checkpoint(roots["checkpoint"], "net")
    run_tracking(track_gradient, roots, "--name=net", "--dataset=gaussian", "--score=nac_ue", "--limit=6")
    train, gaussian = load(roots, "net", "nac_ue", "train"), load(roots, "net", "nac_ue", "gaussian")
    assert train["num_samples"] == 6 and train["fit"]["num_train"] == 6 and gaussian["fit"] == train["fit"]
    _, total = coverage_scores(fit_record(train), nac_states(gaussian))
    np.testing.assert_allclose(gaussian["total"], total, rtol=1e-6)
    train_bytes = (roots["gradient"] / "digits/net/nac_ue/train.pkl").read_bytes()

    run_tracking(track_gradient, roots, "--name=net", "--dataset=rademacher", "--score=nac_ue", "--limit=6")
    assert (roots["gradient"] / "digits/net/nac_ue/train.pkl").read_bytes() == train_bytes
    np.testing.assert_array_equal(load(roots, "net", "nac_ue", "gaussian")["total"], gaussian["total"])

    run_tracking(track_gradient, roots, "--name=net", "--dataset=train", "--score=nac_ue", "--limit=9")
    run_tracking(track_gradient, roots, "--name=net", "--dataset=gaussian", "--score=nac_ue", "--limit=9")
    run_tracking(track_gradient, roots, "--name=net", "--dataset=gaussian", "--score=nac_ue", "--limit=6")
    again, digits = load(roots, "net", "nac_ue", "gaussian"), load(roots, "net", "nac_ue", "digits")
    assert again["fit"] == digits["fit"] == load(roots, "net", "nac_ue", "train")["fit"]  # the ID file re-scored
    assert again["fit"]["num_train"] == 9

    train = load(roots, "net", "nac_ue", "train")  # another training file of the same size: the ID file is stale
    train["features"] = {layer: states / 2 for layer, states in train["features"].items()}
    changed = score_record(train, fit_record(train))
    save_gradients(changed, roots["gradient"] / "digits/net/nac_ue/train.pkl")
    run_tracking(track_gradient, roots, "--name=net", "--dataset=gaussian", "--score=nac_ue", "--limit=9")
    assert load(roots, "net", "nac_ue", "digits")["fit"] == changed["fit"] != again["fit"]
    for layer, states in gaussian["features"].items():
        np.testing.assert_array_equal(again["features"][layer], states)  # the states do not depend on the fit
    assert not np.array_equal(again["total"], gaussian["total"])
