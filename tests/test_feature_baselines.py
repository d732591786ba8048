"""The feature baselines (``utils.feature_baselines``) against independent computations: Mahalanobis and KNN
against scipy's distance and scikit-learn's ``NearestNeighbors``; ReAct, ASH, SCALE, ViM, fDBD, GEN and RMDS
against OpenOOD's postprocessors (``openood/postprocessors/<name>_postprocessor.py``, ``networks/ash_net.py``,
``networks/scale_net.py``), their semantics written here again in torch and numpy on the same features and a
random head; and their rows in the per-layer tables and ``--compare``, fit on training images only."""
import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

import compute_gradient_metrics
import track_gradient
from tests.test_compute_gradient_metrics import make_record, write
from tests.test_track_gradient import make_checkpoint
from utils.data import get_dataset
from utils.errors import UserError
from utils.feature_baselines import (
    ASH,
    BASELINES,
    FDBD,
    GEN,
    HEAD_BASELINES,
    KNN,
    RMDS,
    SCALE,
    Head,
    Mahalanobis,
    ReAct,
    Training,
    ViM,
    fit_features,
    knn_k,
    principal_dim,
)
from utils.feature_baselines.base import kept_count
from utils.gradients import GradientFileError, gradient_path, load_gradients
from utils.metrics import ood_metrics
from utils.runtime import run_script

DIMS, CLASSES = 6, 3
ROWS = [b.name for b in BASELINES]


def features_record(features: np.ndarray, labels: np.ndarray, head: Head | None = None) -> dict:
    record = {"features": {"penultimate": features.astype(np.float32)}, "label": labels, "dataset": "x"}
    if head is not None:
        record["head"] = {"weight": head.weight, "bias": head.bias}
    return record


def training_features(rng: np.random.Generator, n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % CLASSES
    centres = rng.normal(0, 3, size=(CLASSES, DIMS))
    return centres[labels] + rng.normal(size=(n, DIMS)) @ rng.normal(size=(DIMS, DIMS)), labels


def relu_features(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    """Pooled ReLU activations: non-negative, many exactly 0 (ties at 0), float32 as the files hold them."""
    return np.maximum(rng.normal(0.3, 1.0, size=(n, dims)) * rng.lognormal(0, 0.5, size=(n, 1)), 0).astype(
        np.float32).astype(np.float64)


def random_head(rng: np.random.Generator, classes: int, dims: int) -> Head:
    return Head(rng.normal(0, 0.5, size=(classes, dims)), rng.normal(0, 0.5, size=classes))


def training(rng: np.random.Generator, n: int = 300, dims: int = 24, classes: int = 5) -> Training:
    labels = np.arange(n) % classes
    features = relu_features(rng, n, dims) + np.eye(classes, dims)[labels]
    return Training(features, labels, random_head(rng, classes, dims))


def fc(head: Head, features: torch.Tensor) -> torch.Tensor:
    """OpenOOD's ``net.fc`` (``get_fc_layer()``) as a torch Linear layer with the head's weights."""
    layer = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(head.weight))
        layer.bias.copy_(torch.from_numpy(head.bias))
        return layer(features)


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float64))


# --- Mahalanobis and KNN -----------------------------------------------------------------------------------------

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
    np.testing.assert_allclose(fit.baselines["Mahalanobis"].values(test.astype(np.float32)), expected, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 5])
def test_knn_is_the_distance_to_the_kth_nearest_normalised_training_feature(k):
    rng = np.random.default_rng(1)
    train, labels = training_features(rng)
    test = rng.normal(size=(2_100, DIMS))  # more than one distance block
    fit = fit_features(features_record(train, labels), k=k)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    neighbours = NearestNeighbors(n_neighbors=k).fit(unit(train.astype(np.float32).astype(np.float64)))
    expected = neighbours.kneighbors(unit(test))[0][:, -1]
    np.testing.assert_allclose(fit.baselines["KNN"].values(test), expected, rtol=1e-6, atol=1e-7)


def test_bad_fits_are_user_errors():
    rng = np.random.default_rng(2)
    train, labels = training_features(rng, 30)
    assert fit_features({"label": labels}) is None  # a file of the seed's format: no features
    with pytest.raises(UserError, match="without a label"):
        fit_features(features_record(train, np.full(30, -1)))
    with pytest.raises(UserError, match="--knn-k"):
        fit_features(features_record(train, labels), k=31)
    with pytest.raises(UserError, match="head maps 5 features"):
        fit_features(features_record(train, labels, random_head(rng, 3, 5)))


# --- the leaderboard's baselines, against OpenOOD's postprocessors --------------------------------------------------

def test_react_clips_at_the_90th_percentile_of_the_training_activations():
    rng = np.random.default_rng(3)
    train = training(rng)
    test = relu_features(rng, 50, 24) * 3
    # OpenOOD: setup() collects features, np.percentile(activation_log.flatten(), 90); postprocess() is
    # logsumexp(net.forward_threshold(data, threshold)), which clips the pooled features at the threshold
    threshold = np.percentile(train.features.flatten(), 90)
    expected = torch.logsumexp(fc(train.head, t(test).clip(max=threshold)), dim=1).numpy()
    react = ReAct.fit(train)
    assert react.threshold == pytest.approx(threshold, rel=1e-12)
    assert (test > threshold).any()  # the clip acts
    np.testing.assert_allclose(react.values(test), expected, rtol=1e-10)


def official_ash_s(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """``ash_s`` of andrijazz/ash (and OpenOOD's ash_net), on a (B, C, 1, 1) view of the pooled features."""
    x = x.clone()
    b, c, h, w = x.shape
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    flat = x.view((b, c * h * w))
    values, indices = torch.topk(flat, k, dim=1)
    flat.zero_().scatter_(dim=1, index=indices, src=values)
    s2 = x.sum(dim=[1, 2, 3])
    return x * torch.exp(s1 / s2)[:, None, None, None]


def official_scale(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """``scale`` of kai422/SCALE (and OpenOOD's scale_net): ASH-S's ratio applied to the unpruned input."""
    pruned = x.clone()
    b, c, h, w = x.shape
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    flat = pruned.view((b, c * h * w))
    values, indices = torch.topk(flat, k, dim=1)
    flat.zero_().scatter_(dim=1, index=indices, src=values)
    return x * torch.exp(s1 / pruned.sum(dim=[1, 2, 3]))[:, None, None, None]


def shaped_energy(head: Head, features: np.ndarray, shape, percentile: float) -> np.ndarray:
    """OpenOOD's ``forward_threshold`` of ASHNet / ScaleNet: shape the pooled features, fc, logsumexp."""
    x = t(features).view(len(features), -1, 1, 1)
    return torch.logsumexp(fc(head, shape(x, percentile).view(len(features), -1)), dim=1).numpy()


@pytest.mark.parametrize("dims", [24, 50, 5])  # 50 · 0.85 = 42.5 and 5 · 0.9 = 4.5: NumPy rounds half to even
def test_the_kept_count_is_the_official_rounding(dims):
    for percentile in (85, 90):
        assert kept_count(dims, percentile) == max(1, dims - int(np.round(dims * percentile / 100.0)))
    assert (kept_count(50, 85), kept_count(5, 90), kept_count(64, 90), kept_count(512, 90)) == (8, 1, 6, 51)


@pytest.mark.parametrize("dims", [24, 50])
def test_ash_and_scale_are_the_official_shapings_of_the_pooled_features(dims):
    rng = np.random.default_rng(4)
    head = random_head(rng, 7, dims)
    test = relu_features(rng, 60, dims)
    test[0, : dims - 2], test[0, dims - 2:] = 0, [1.5, 0.7]  # fewer non-zero activations than kept: ties at 0
    assert (test == 0).mean() > 0.2
    np.testing.assert_allclose(ASH(head).values(test), shaped_energy(head, test, official_ash_s, 90), rtol=1e-10)
    np.testing.assert_allclose(SCALE(head).values(test), shaped_energy(head, test, official_scale, 85), rtol=1e-10)
    assert (ASH.fit(Training(test, np.zeros(60), head)).percentile, SCALE.fit(Training(test, np.zeros(60), head))
            .percentile) == (90, 85)  # OpenOOD's defaults, nothing fit


def test_ash_and_scale_score_an_all_zero_feature_vector_by_the_bias():
    rng = np.random.default_rng(5)
    head = random_head(rng, 4, 10)
    zero = np.zeros((1, 10))
    expected = torch.logsumexp(t(head.bias), 0).item()  # the official code's 0/0 is NaN; W · 0 + b is the limit
    assert ASH(head).values(zero)[0] == pytest.approx(expected) and SCALE(head).values(zero)[0] == pytest.approx(
        expected)


def official_vim(train: Training, test: np.ndarray, dim: int) -> np.ndarray:
    """OpenOOD's VIMPostprocessor: setup() and postprocess(), in numpy as it is written."""
    w, b = train.head.weight, train.head.bias
    logit_train = train.features @ w.T + b
    u = -np.matmul(np.linalg.pinv(w), b)
    covariance = EmpiricalCovariance(assume_centered=True).fit(train.features - u).covariance_
    eig_vals, eigen_vectors = np.linalg.eig(covariance)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    alpha = logit_train.max(axis=-1).mean() / np.linalg.norm(np.matmul(train.features - u, ns), axis=-1).mean()
    logit = test @ w.T + b
    energy = torch.logsumexp(t(logit), dim=-1).numpy()
    return -np.linalg.norm(np.matmul(test - u, ns), axis=-1) * alpha + energy


def test_vim_is_openoods_virtual_logit_on_the_training_fit():
    rng = np.random.default_rng(6)
    train = training(rng)
    test = relu_features(rng, 40, 24) * 2
    vim = ViM.fit(train)
    assert vim.dim == principal_dim(24) == 12
    np.testing.assert_allclose(vim.values(test), official_vim(train, test, 12).real, rtol=1e-8, atol=1e-8)


def test_vims_dimension_rule():
    assert [principal_dim(d) for d in (512, 2048, 4096, 768, 257)] == [256, 1000, 1000, 256, 256]  # OpenOOD's
    assert [principal_dim(d) for d in (256, 128, 64, 2)] == [128, 64, 32, 1]  # not below D: half of it


def official_fdbd(train: Training, test: np.ndarray) -> np.ndarray:
    """OpenOOD's fDBDPostprocessor with ``distance_as_normalizer: True``: its loop over classes, and torch's max."""
    w, b = train.head.weight, train.head.bias
    classes = len(b)
    denominator = np.zeros((classes, classes))
    for p in range(classes):
        norms = np.linalg.norm(w - w[p, :], axis=1)
        norms[p] = 1
        denominator[p, :] = norms
    output, feature = fc(train.head, t(test)), t(test)
    values, nn_idx = output.max(1)
    logits_sub = torch.abs(output - values.repeat(classes, 1).T)
    mean = t(train.features.mean(0))
    return (torch.sum(logits_sub / t(denominator)[nn_idx], axis=1) / torch.norm(feature - mean, dim=1)).numpy()


def test_fdbd_is_openoods_decision_boundary_distance_with_ties_in_the_largest_logit():
    rng = np.random.default_rng(7)
    train = training(rng, dims=8, classes=4)
    weight = rng.integers(-3, 4, (4, 8)).astype(float)
    weight[:, 0] = [2, 1, 0, 0]
    integer = Training(train.features, train.labels, Head(weight, np.array([0.0, 1.0, 0.0, -2.0])))
    test = np.vstack([relu_features(rng, 30, 8), np.eye(1, 8)])  # the last row's logits: 2, 2, 0, -2, a tie
    logits = integer.head.logits(test[-1:])[0]
    assert logits[0] == logits[1] == logits.max()
    for fit_on in (train, integer):
        np.testing.assert_allclose(FDBD.fit(fit_on).values(test), official_fdbd(fit_on, test), rtol=1e-10)


def official_gen(logits: torch.Tensor, gamma: float, m: int) -> np.ndarray:
    """OpenOOD's GENPostprocessor.generalized_entropy of the softmax."""
    probs = torch.softmax(logits, dim=1)
    probs_sorted = torch.sort(probs, dim=1)[0][:, -m:]
    return (-torch.sum(probs_sorted ** gamma * (1 - probs_sorted) ** gamma, dim=1)).numpy()


def test_gen_is_openoods_generalised_entropy():
    rng = np.random.default_rng(8)
    head, test = random_head(rng, 10, 16), relu_features(rng, 50, 16) * 4
    logits = fc(head, t(test))
    assert (GEN.fit(Training(test, np.zeros(50), head)).gamma, GEN(head).m) == (0.1, 100)  # OpenOOD's defaults
    np.testing.assert_allclose(GEN(head).values(test), official_gen(logits, 0.1, 100), rtol=1e-7)  # M > K: all
    np.testing.assert_allclose(GEN(head, 0.5, 3).values(test), official_gen(logits, 0.5, 3), rtol=1e-7)


def official_rmds(train: Training, test: np.ndarray) -> np.ndarray:
    """OpenOOD's RMDSPostprocessor: sklearn's EmpiricalCovariance of the class-centred and of all features."""
    classes = np.unique(train.labels)
    feats = t(train.features)
    class_mean = torch.stack([feats[t(train.labels) == c].mean(0) for c in classes])
    centred = torch.cat([feats[t(train.labels) == c] - class_mean[i] for i, c in enumerate(classes)])
    precision = t(EmpiricalCovariance(assume_centered=False).fit(centred.numpy()).precision_)
    whole_mean = feats.mean(0)
    whole_precision = t(EmpiricalCovariance(assume_centered=False).fit((feats - whole_mean).numpy()).precision_)
    x = t(test)
    background = -torch.matmul(torch.matmul(x - whole_mean, whole_precision), (x - whole_mean).t()).diag()
    scores = torch.stack([-torch.matmul(torch.matmul(x - m, precision), (x - m).t()).diag() - background
                          for m in class_mean], dim=1)
    return torch.max(scores, dim=1)[0].numpy()


def test_rmds_is_openoods_relative_mahalanobis_distance():
    rng = np.random.default_rng(9)
    train = training(rng, dims=10)
    test = relu_features(rng, 40, 10) * 2
    np.testing.assert_allclose(RMDS.fit(train).values(test), official_rmds(train, test), rtol=1e-7, atol=1e-7)


def test_every_fit_reads_the_training_features_alone():
    rng = np.random.default_rng(10)
    train = training(rng)
    record = features_record(train.features, train.labels, train.head)
    fit = fit_features(record)
    assert list(fit.baselines) == ROWS
    test = relu_features(rng, 30, 24)
    before = {name: b.values(test) for name, b in fit.baselines.items()}
    moved = fit_features({**record, "features": {"penultimate": (train.features + 1).astype(np.float32)}})
    assert all(not np.allclose(moved.baselines[name].values(test), before[name])
               for name in ("Mahalanobis", "KNN", "ReAct", "ViM", "fDBD", "RMDS"))  # what each fits
    assert all(np.allclose(moved.baselines[name].values(test), before[name]) for name in ("ASH", "SCALE", "GEN"))
    described = fit.describe()
    assert described["react_threshold"] == pytest.approx(np.percentile(train.features.astype(np.float32), 90))
    assert (described["vim_dim"], described["knn_k"], described["num_train"]) == (12, 1, 300)
    without_head = fit_features(features_record(train.features, train.labels))
    assert list(without_head.baselines) == [n for n in ROWS if n not in HEAD_BASELINES] == ["Mahalanobis", "KNN",
                                                                                            "RMDS"]


# --- the rows in the tables, and tracking's features and head --------------------------------------------------------

def with_features(record: dict, shift: float, seed: int, head: Head | None = None) -> dict:
    rng = np.random.default_rng(seed)
    n = record["num_samples"]
    labels = record["label"] if record["dataset"] != "train" else np.arange(n) % CLASSES
    features = (rng.normal(size=(n, DIMS)) + shift * (-1) ** np.arange(DIMS)  # OOD: off the classes' line
                + 2.0 * (np.maximum(labels, 0) % CLASSES)[:, None])
    extra = {"head": {"weight": head.weight.astype(np.float32), "bias": head.bias.astype(np.float32)}} if head else {}
    return {**record, "label": labels, "features": {"penultimate": features.astype(np.float32)}, **extra}


def test_rows_in_the_tables_and_the_comparison_fit_on_training_images_only(tmp_path, capsys):
    gradients, results = tmp_path / "gradients", tmp_path / "results"
    head = random_head(np.random.default_rng(11), 10, DIMS)
    train = with_features(make_record("train", 400, 0.0, 10), 0.0, 10, head)
    id_record = with_features(make_record("CIFAR-10", 300, 0.0, 0), 0.0, 0, head)
    ood = with_features(make_record("LSUN", 200, 1.0, 1), 3.0, 1, head)
    for record in (train, id_record, ood):
        write(record, gradients)
    roots = [f"--gradient-root={gradients}", f"--results-root={results}"]
    compute_gradient_metrics.main(["--name=resnet", "--saved_form=norm_single", "--score=min", *roots])
    out = capsys.readouterr().out
    assert "KNN k = 1" in out and "ViM dim 3" in out and f"{', '.join(ROWS)} (" in out
    assert all(f"\n{name} " in out for name in ROWS)  # a row of the printed table each
    table_path = results / "CIFAR-10/resnet/norm_single-min/LSUN.json"
    rows = {r["row"]: r for r in json.loads(table_path.read_text())["rows"]}
    assert all(rows[name]["kind"] == "baseline" for name in ROWS)

    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    neighbours = NearestNeighbors(n_neighbors=1).fit(unit(train["features"]["penultimate"].astype(np.float64)))
    id_knn, ood_knn = (neighbours.kneighbors(unit(r["features"]["penultimate"].astype(np.float64)))[0][:, 0]
                       for r in (id_record, ood))
    expected = ood_metrics(-id_knn, -ood_knn)
    assert rows[KNN.name]["AUROC"] == pytest.approx(100 * expected["AUROC"], abs=1e-9)
    assert rows[KNN.name]["FPR95"] == pytest.approx(100 * expected["FPR95"], abs=1e-9)
    assert rows[Mahalanobis.name]["AUROC"] > 90 and rows[KNN.name]["AUROC"] > 75  # well above chance (50)
    stored = Head(head.weight.astype(np.float32).astype(np.float64), head.bias.astype(np.float32).astype(np.float64))
    id_gen, ood_gen = (official_gen(fc(stored, t(r["features"]["penultimate"])), 0.1, 100) for r in (id_record, ood))
    assert rows[GEN.name]["AUROC"] == pytest.approx(100 * ood_metrics(id_gen, ood_gen)["AUROC"], abs=1e-9)
    assert rows[GEN.name]["id_mean"] == pytest.approx(id_gen.mean())  # the raw value is the score (sign +1)

    compute_gradient_metrics.main(["--name=resnet", "--compare", *roots])
    table = json.loads((results / "CIFAR-10/resnet/compare/comparison.json").read_text())
    compared = {row["name"]: row for row in table["rows"]}
    assert compared[KNN.name]["results"]["LSUN"]["AUROC"] == rows[KNN.name]["AUROC"]
    assert {"MSP", "Energy", *ROWS} <= set(compared)
    assert all(compared[name]["results"]["LSUN"]["AUROC"] == rows[name]["AUROC"] for name in ROWS)

    # only the training file moves the fit: the OOD numbers stay when the ID test file changes its labels
    write({**id_record, "label": np.zeros(300, np.int64)}, gradients)
    compute_gradient_metrics.main(["--name=resnet", "--saved_form=norm_single", "--score=min", *roots])
    again = {r["row"]: r for r in json.loads(table_path.read_text())["rows"]}
    assert all(again[name]["ood_mean"] == rows[name]["ood_mean"] for name in ROWS)

    # a training file tracked before heads were stored: the rows that need none, and a note
    write({key: value for key, value in train.items() if key != "head"}, gradients)
    compute_gradient_metrics.main(["--name=resnet", "--saved_form=norm_single", "--score=min", *roots])
    assert f"No {', '.join(HEAD_BASELINES)} rows: the training file stores no head" in capsys.readouterr().out
    rows = {r["row"] for r in json.loads(table_path.read_text())["rows"]}
    assert {"Mahalanobis", "KNN", "RMDS"} <= rows and not rows & set(HEAD_BASELINES)


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_tracking_stores_the_last_linear_layers_input_and_the_head(tmp_path):
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
    np.testing.assert_allclose(Head.of(record).logits(features), logits, rtol=1e-4, atol=1e-5)  # the stored head
    train = load_gradients(gradient_path("digits", "net", "gradnorm", "train", tmp_path / "g"))
    assert train["features"]["penultimate"].shape == (11, model.fc.in_features)
    assert train["head"]["weight"].shape == (10, model.fc.in_features) and train["head"]["bias"].dtype == np.float32


def test_a_file_with_a_bad_head_is_refused(tmp_path):
    record = with_features(make_record("train", 20, 0.0, 3), 0.0, 3, random_head(np.random.default_rng(12), 10, DIMS))
    for head in ({"weight": record["head"]["weight"], "bias": np.zeros(9, np.float32)},
                 {"weight": np.full((10, DIMS), np.nan, np.float32), "bias": record["head"]["bias"]}, [1, 2]):
        with pytest.raises(GradientFileError, match="'head' must be"):
            write({**record, "head": head}, tmp_path)
