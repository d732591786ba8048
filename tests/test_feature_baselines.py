"""Mahalanobis and KNN on the penultimate features (``utils.feature_baselines``), against independent
computations (scikit-learn's ``NearestNeighbors``, scipy's Mahalanobis distance over loops), and their rows
in the per-layer tables and ``--compare``."""
import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.neighbors import NearestNeighbors

import compute_gradient_metrics
import track_gradient
from tests.test_compute_gradient_metrics import make_record, write
from tests.test_track_gradient import make_checkpoint
from utils.data import get_dataset
from utils.errors import UserError
from utils.feature_baselines import KNN, MAHALANOBIS, fit_features, knn_distances, knn_k, mahalanobis_distances
from utils.gradients import gradient_path, load_gradients
from utils.metrics import ood_metrics
from utils.runtime import run_script

DIMS, CLASSES = 6, 3


def features_record(features: np.ndarray, labels: np.ndarray) -> dict:
    return {"features": {"penultimate": features.astype(np.float32)}, "label": labels, "dataset": "x"}


def training_features(rng: np.random.Generator, n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % CLASSES
    centres = rng.normal(0, 3, size=(CLASSES, DIMS))
    return centres[labels] + rng.normal(size=(n, DIMS)) @ rng.normal(size=(DIMS, DIMS)), labels


def test_k_follows_the_papers_scaling():
    assert (knn_k(50_000), knn_k(5_000), knn_k(1_297), knn_k(778)) == (50, 5, 1, 1)


def test_mahalanobis_is_the_tied_covariance_distance_to_the_nearest_class_mean():
    rng = np.random.default_rng(0)
    train, labels = training_features(rng)
    test = rng.normal(0, 3, size=(40, DIMS))
    fit = fit_features(features_record(train, labels))
    train = train.astype(np.float32).astype(np.float64)  # what the file holds
    means = [train[labels == c].mean(0) for c in range(CLASSES)]
    covariance = np.zeros((DIMS, DIMS))
    for x, c in zip(train, labels):
        covariance += np.outer(x - means[c], x - means[c])
    inverse = np.linalg.inv(covariance / len(train))
    expected = [min(mahalanobis(x, m, inverse) ** 2 for m in means) for x in test.astype(np.float32)]
    np.testing.assert_allclose(mahalanobis_distances(fit, test.astype(np.float32)), expected, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 5])
def test_knn_is_the_distance_to_the_kth_nearest_normalised_training_feature(k):
    rng = np.random.default_rng(1)
    train, labels = training_features(rng)
    test = rng.normal(size=(2_100, DIMS))  # more than one distance block
    fit = fit_features(features_record(train, labels), k=k)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    neighbours = NearestNeighbors(n_neighbors=k).fit(unit(train.astype(np.float32).astype(np.float64)))
    expected = neighbours.kneighbors(unit(test))[0][:, -1]
    np.testing.assert_allclose(knn_distances(fit, test), expected, rtol=1e-6, atol=1e-7)


def test_bad_fits_are_user_errors():
    rng = np.random.default_rng(2)
    train, labels = training_features(rng, 30)
    assert fit_features({"label": labels}) is None  # a file of the seed's format: no features
    with pytest.raises(UserError, match="without a label"):
        fit_features(features_record(train, np.full(30, -1)))
    with pytest.raises(UserError, match="--knn-k"):
        fit_features(features_record(train, labels), k=31)


def with_features(record: dict, shift: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = record["num_samples"]
    labels = record["label"] if record["dataset"] != "train" else np.arange(n) % CLASSES
    return {**record, "label": labels, "features": {"penultimate": (
        rng.normal(size=(n, DIMS)) + shift * (-1) ** np.arange(DIMS)  # OOD: off the classes' line
        + 2.0 * (np.maximum(labels, 0) % CLASSES)[:, None]).astype(np.float32)}}


def test_rows_in_the_tables_and_the_comparison_fit_on_training_images_only(tmp_path, capsys):
    gradients, results = tmp_path / "gradients", tmp_path / "results"
    train = with_features(make_record("train", 400, 0.0, 10), 0.0, 10)
    id_record = with_features(make_record("CIFAR-10", 300, 0.0, 0), 0.0, 0)
    ood = with_features(make_record("LSUN", 200, 1.0, 1), 3.0, 1)
    for record in (train, id_record, ood):
        write(record, gradients)
    roots = [f"--gradient-root={gradients}", f"--results-root={results}"]
    compute_gradient_metrics.main(["--name=resnet", "--saved_form=norm_single", "--score=min", *roots])
    assert "Mahalanobis and KNN (k = 1)" in capsys.readouterr().out
    table_path = results / "CIFAR-10/resnet/norm_single-min/LSUN.json"
    rows = {r["row"]: r for r in json.loads(table_path.read_text())["rows"]}

    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    neighbours = NearestNeighbors(n_neighbors=1).fit(unit(train["features"]["penultimate"].astype(np.float64)))
    id_knn, ood_knn = (neighbours.kneighbors(unit(r["features"]["penultimate"].astype(np.float64)))[0][:, 0]
                       for r in (id_record, ood))
    expected = ood_metrics(-id_knn, -ood_knn)
    assert rows[KNN]["kind"] == "baseline" and rows[KNN]["AUROC"] == pytest.approx(100 * expected["AUROC"], abs=1e-9)
    assert rows[KNN]["FPR95"] == pytest.approx(100 * expected["FPR95"], abs=1e-9)
    assert rows[MAHALANOBIS]["AUROC"] > 90 and rows[KNN]["AUROC"] > 75  # well above chance (50)

    compute_gradient_metrics.main(["--name=resnet", "--compare", *roots])
    table = json.loads((results / "CIFAR-10/resnet/compare/comparison.json").read_text())
    compared = {row["name"]: row for row in table["rows"]}
    assert compared[KNN]["results"]["LSUN"]["AUROC"] == rows[KNN]["AUROC"]
    assert {"MSP", "Energy", MAHALANOBIS, KNN} <= set(compared)

    # only the training file moves the fit: the OOD numbers stay when the ID test file changes its labels
    write({**id_record, "label": np.zeros(300, np.int64)}, gradients)
    compute_gradient_metrics.main(["--name=resnet", "--saved_form=norm_single", "--score=min", *roots])
    again = {r["row"]: r for r in json.loads(table_path.read_text())["rows"]}
    assert again[MAHALANOBIS]["ood_mean"] == rows[MAHALANOBIS]["ood_mean"]


def test_tracking_stores_the_last_linear_layers_input(tmp_path):
    model = make_checkpoint(tmp_path / "c", "net")
    run_script(lambda: track_gradient.main(["--name=net", "--dataset=train", "--score=all", "--limit=11",
                                            "--in-dataset=digits", "--gpu=-1", f"--checkpoint-root={tmp_path / 'c'}",
                                            f"--gradient-root={tmp_path / 'g'}"]))
    record = load_gradients(gradient_path("digits", "net", "min", "digits", tmp_path / "g"))
    images = torch.stack([get_dataset("digits")[i][0] for i in range(11)])
    with torch.no_grad():
        logits = model(images).double().numpy()
    features = record["features"]["penultimate"].astype(np.float64)
    assert features.shape == (11, model.fc.in_features)
    weight, bias = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    np.testing.assert_allclose(features @ weight.T + bias, logits, rtol=1e-4, atol=1e-5)
    train = load_gradients(gradient_path("digits", "net", "gradnorm", "train", tmp_path / "g"))
    assert train["features"]["penultimate"].shape == (11, model.fc.in_features)
