"""The combined detector (``utils.combine``): a Gaussian on log per-layer norms fit on training images only."""
import json

import numpy as np
import pytest
from scipy import integrate, stats
from sklearn.metrics import roc_auc_score

import compute_gradient_metrics
from tests.test_compute_gradient_metrics import make_record, write
from utils.combine import combined_score, fit_gaussian, log_norms
from utils.gradients import gradient_path, load_gradients, save_gradients

LAYERS = tuple(f"layer{i}.weight" for i in range(4))


def record_from_log_norms(values: np.ndarray, dataset: str = "train") -> dict:
    """A gradients record whose per-layer norms are exp(values), values (N, L)."""
    norms = {name: np.exp(values[:, i]).astype(np.float32) for i, name in enumerate(LAYERS[:values.shape[1]])}
    n = len(values)
    return {"layers": norms, "num_samples": n, "dataset": dataset}


def test_the_score_is_the_mahalanobis_distance_under_the_shrunk_covariance():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(4, 4))
    train = record_from_log_norms(rng.normal(size=(300, 4)) @ mixing + 1.0)
    test = record_from_log_norms(rng.normal(size=(50, 4)) @ mixing + 1.5)
    fit = fit_gaussian(train)

    # Ledoit-Wolf: (1 − α)·S + α·tr(S)/L·I with S the (biased) sample covariance, α the fitted shrinkage
    x = log_norms(train)
    sample_covariance = np.cov(x, rowvar=False, bias=True)
    alpha = fit.shrinkage
    shrunk = (1 - alpha) * sample_covariance + alpha * np.trace(sample_covariance) / 4 * np.eye(4)
    np.testing.assert_allclose(fit.mean, x.mean(0), rtol=1e-12)
    assert 0 < alpha < 1

    centred = log_norms(test) - x.mean(0)
    expected = np.sqrt([c @ np.linalg.solve(shrunk, c) for c in centred])
    np.testing.assert_allclose(-combined_score(fit, test), expected, rtol=1e-8)
    stacked = np.stack([test["layers"][k] for k in LAYERS], 1).astype(np.float64)
    np.testing.assert_array_equal(log_norms(test), np.log(stacked))


def theoretical_auroc(dims: int, separation: float) -> float:
    """P(D_ood > D_id) for ID ~ N(0, I) and OOD ~ N(μ, I), ‖μ‖ = separation, with the exact Gaussian:
    D_id² ~ χ²_d and D_ood² ~ noncentral χ²_d(‖μ‖²)."""
    value, _ = integrate.quad(lambda t: stats.ncx2.sf(t, dims, separation ** 2) * stats.chi2.pdf(t, dims), 0, np.inf)
    return value


@pytest.mark.parametrize("separation", [1.0, 2.0])
def test_two_gaussians_of_known_separation_give_the_theoretical_auroc(separation):
    dims = 4
    rng = np.random.default_rng(1)
    direction = rng.normal(size=dims)
    mean = separation * direction / np.linalg.norm(direction)
    fit = fit_gaussian(record_from_log_norms(rng.normal(size=(20_000, dims))))
    id_scores = combined_score(fit, record_from_log_norms(rng.normal(size=(5_000, dims))))
    ood_scores = combined_score(fit, record_from_log_norms(rng.normal(size=(5_000, dims)) + mean))
    auroc = roc_auc_score(np.r_[np.ones(5_000), np.zeros(5_000)], np.r_[id_scores, ood_scores])
    assert auroc == pytest.approx(theoretical_auroc(dims, separation), abs=0.01)


def test_a_record_of_other_layers_is_refused():
    rng = np.random.default_rng(2)
    fit = fit_gaussian(record_from_log_norms(rng.normal(size=(50, 4))))
    with pytest.raises(ValueError, match="other layers"):
        combined_score(fit, record_from_log_norms(rng.normal(size=(5, 3))))


def run(gradients, results, *args):
    compute_gradient_metrics.main(["--name=resnet", "--saved_form=norm_single", "--score=min", "--dataset=all",
                                   f"--gradient-root={gradients}", f"--results-root={results}", *args])


def test_the_fit_never_sees_test_data_and_the_row_is_reported(tmp_path, capsys):
    gradients, results = tmp_path / "gradients", tmp_path / "results"
    write(make_record("train", 400, 0.0, 10), gradients)
    write(make_record("CIFAR-10", 300, 0.0, 0), gradients)
    write(make_record("LSUN", 200, 1.0, 1), gradients)
    run(gradients, results)
    first = json.loads((results / "CIFAR-10/resnet/norm_single-min/LSUN.json").read_text())
    assert "'combined': a Gaussian" in capsys.readouterr().out
    rows = {r["row"]: r for r in first["rows"]}
    assert rows["combined"]["kind"] == "combined" and rows["combined"]["AUROC"] > 60
    assert not (results / "CIFAR-10/resnet/norm_single-min/train.json").exists()  # never an OOD set

    # other ID and OOD test files: the fit (its mean and shrinkage) must not move; the row's numbers do
    write(make_record("CIFAR-10", 250, 0.3, 5), gradients)
    write(make_record("LSUN", 150, 2.0, 6), gradients)
    run(gradients, results)
    second = json.loads((results / "CIFAR-10/resnet/norm_single-min/LSUN.json").read_text())
    assert second["combined"] == first["combined"]
    assert {r["row"]: r for r in second["rows"]}["combined"]["AUROC"] != rows["combined"]["AUROC"]

    # the same score, computed independently from the three files
    records = {d: load_gradients(gradient_path("CIFAR-10", "resnet", "min", d, gradients))
               for d in ("train", "CIFAR-10", "LSUN")}
    fit = fit_gaussian(records["train"])
    expected = roc_auc_score(np.r_[np.ones(250), np.zeros(150)],
                             np.r_[combined_score(fit, records["CIFAR-10"]), combined_score(fit, records["LSUN"])])
    assert {r["row"]: r for r in second["rows"]}["combined"]["AUROC"] == pytest.approx(100 * expected)


def test_without_a_training_file_the_note_names_the_command(tmp_path, capsys):
    gradients, results = tmp_path / "gradients", tmp_path / "results"
    write(make_record("CIFAR-10", 100, 0.0, 0), gradients)
    write(make_record("LSUN", 100, 1.0, 1), gradients)
    run(gradients, results)
    out = capsys.readouterr().out
    assert "No 'combined' row" in out and "python track_gradient.py --name=resnet --dataset=train --score=min" in out
    rows = json.loads((results / "CIFAR-10/resnet/norm_single-min/LSUN.json").read_text())["rows"]
    assert "combined" not in {r["row"] for r in rows}
    run(gradients, results, "--combine=none")
    assert "No 'combined' row" not in capsys.readouterr().out


def test_oas_shrinkage_is_an_option(tmp_path, capsys):
    gradients, results = tmp_path / "gradients", tmp_path / "results"
    for dataset, n, shift, seed in (("train", 300, 0.0, 3), ("CIFAR-10", 100, 0.0, 0), ("LSUN", 100, 1.0, 1)):
        save_gradients(make_record(dataset, n, shift, seed), gradients / "CIFAR-10/resnet/min" / f"{dataset}.pkl")
    run(gradients, results, "--combine=oas")
    assert "(oas shrinkage" in capsys.readouterr().out


def test_the_study_script_compares_combined_with_single_rows(tmp_path):
    """bench/combine_study.py: its combined AUROC is compute_gradient_metrics.py's; the train-picked layer is the
    one whose log-norm varies least on the training file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("combine_study", "bench/combine_study.py")
    combine_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(combine_study)

    gradients = tmp_path / "gradients"
    train = make_record("train", 400, 0.0, 10)
    for record in (train, make_record("CIFAR-10", 300, 0.0, 0), make_record("LSUN", 200, 1.0, 1),
                   make_record("SVHN", 100, 0.5, 2)):
        write(record, gradients)
    run(gradients, tmp_path / "results")
    rows = combine_study.study(gradients / "CIFAR-10" / "resnet" / "min", "CIFAR-10")
    assert [r["OOD set"] for r in rows] == ["LSUN", "SVHN", "average"]
    table = json.loads((tmp_path / "results/CIFAR-10/resnet/norm_single-min/LSUN.json").read_text())
    assert rows[0]["combined"] == pytest.approx({r["row"]: r for r in table["rows"]}["combined"]["AUROC"])
    stds = {name: np.log(v.astype(np.float64)).std() for name, v in train["layers"].items()}
    assert rows[0]["picked"] == min(stds, key=stds.get)
