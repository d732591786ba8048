"""GROOD (ElAraby et al., TMLR 2025) and the low-dimensional gradient (Wu et al., 2024): each batched unit against
its official code's path written here independently (OpenOOD's ``grood.py``: autograd to the OOD prototype, the
faiss L2 index; the official ``github_PCA.py`` / ``github_main.py``: ``vmap(grad)`` per-sample gradients, the
NFK normalisation, the subspace iteration, ``knn``), in float64, and against the unit's plain batch-of-one loop
(``reference``); their fit on the training split, tracked first, end to end."""
import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

import compute_gradient_metrics
import track_gradient
from tests.test_per_sample import calibrated_model
from tests.test_track_gradient import load, make_checkpoint, roots  # noqa: F401  (the roots fixture)
from tests.test_track_gradient import run as run_tracking
from utils.detectors import (
    DETECTORS,
    SCORE_ALL,
    TRACK_GRADIENT_SCORES,
    get_detector,
    gradient_scores,
    lowdim,
    rows_per_sample,
)
from utils.detectors.grood import NOISE_KEPT, NOISE_SIGMA, grood_gradients, noise_prototype
from utils.detectors.lowdim import (
    PROJECTIONS,
    LowDim,
    LowDimFit,
    fit_class_means,
    fit_lowdim,
    projections,
    subspace_start,
)
from utils.errors import UserError
from utils.metrics import ood_metrics
from utils.tracking import detectors_from

pytestmark = [pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """Two convolutions with BatchNorm, pooling and a Linear head: every kind of parameter, in milliseconds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet().double()
    with torch.no_grad():
        model.train()(torch.rand(32, 3, 8, 8, dtype=torch.float64))
    return model.eval()


def training_set(model: nn.Module, n: int, size: int, wrong: int = 2) -> TensorDataset:
    """``n`` random images labelled as the model predicts them, but for ``wrong`` of them."""
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[:wrong] = (labels[:wrong] + 1) % 10
    return TensorDataset(x, labels)


# ---------------------------------------------------------------- GROOD, OpenOOD's path
def openood_grood(model: nn.Module, train: TensorDataset, test: torch.Tensor, noise_proto: torch.Tensor) -> np.ndarray:
    """grood.py, written again: running-mean class prototypes by label (``update_prototype``), the per-sample
    ``torch.autograd.grad`` of CE(−‖h − [prototypes; noise_proto]‖, argmax logits) to a leaf noise prototype
    (``_compute_grad``), kept where label == pseudo label, then −(the nearest squared L2 distance), k = 1."""
    kept = {}
    model.fc.register_forward_pre_hook(lambda module, args: kept.__setitem__("h", args[0]))
    prototypes, counts = torch.zeros(10, 6, dtype=torch.float64), torch.zeros(10, dtype=torch.long)
    for data, target in [(train.tensors[0][:5], train.tensors[1][:5]), (train.tensors[0][5:], train.tensors[1][5:])]:
        with torch.no_grad():
            model(data)
        for cl in target.unique():
            mask = target == cl
            n = mask.sum()
            prototypes[cl] = (kept["h"][mask].sum(0) + counts[cl] * prototypes[cl]) / (counts[cl] + n)
            counts[cl] += n

    def compute_grad(data: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
        proto = noise_proto.clone().requires_grad_()
        logits = model(data)
        pseudo = logits.argmax(1)
        features = kept["h"].detach()
        vectors = features.reshape(len(data), 1, -1) - torch.cat([prototypes, proto.view(1, -1)])
        losses = F.cross_entropy(-torch.norm(vectors, dim=2), pseudo, reduction="none")
        return [torch.autograd.grad(losses[i], [proto], retain_graph=True)[0] for i in range(len(data))
                if labels is None or labels[i] == pseudo[i]]

    index = torch.stack(compute_grad(*train.tensors)).numpy()
    queries = torch.stack(compute_grad(test, None)).numpy()
    return -np.array([((index - q) ** 2).sum(1).min() for q in queries])


def test_grood_equals_openood_and_the_plain_loop():
    model = tiny_model()
    train = training_set(model, 12, 8)
    test = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    detector = DETECTORS["grood"].fit(model, train, CPU, 5)
    assert detector.fitted.num_train == 12 and len(detector.fitted.train_gradients) == 10  # 2 misclassified
    _, scores = gradient_scores(model, test, [detector])
    expected = openood_grood(model, train, test, detector.fitted.ood_prototype)
    np.testing.assert_allclose(scores["grood"].total.numpy(), expected, rtol=1e-10)
    for i, image in enumerate(test):
        assert detector.reference(model, image)["total"] == pytest.approx(expected[i], rel=1e-10)
    alone = [gradient_scores(model, test[i:i + 1], [detector])[1]["grood"].total.item() for i in range(4)]
    np.testing.assert_allclose(alone, expected, rtol=1e-12)
    assert (scores["grood"].total <= 0).all() and detector.fit_description()["num_correct"] == 10


def test_grood_closed_form_is_openood_s_direct_gradient():
    """``_compute_grad_directly``: softmax(ncc)_noise · F.normalize(h − noise_proto)."""
    generator = torch.Generator().manual_seed(3)
    h, prototypes, ood = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((5, 7), (3, 7), 7))
    vectors = h[:, None] - torch.cat([prototypes, ood[None]])
    direct = (-torch.norm(vectors, dim=2)).softmax(-1)[:, -1:] * F.normalize(vectors[:, -1])
    torch.testing.assert_close(grood_gradients(h, prototypes, ood), direct, rtol=1e-12, atol=0)


def test_the_noise_prototype_follows_get_uniform_noise():
    """One batch of 100 uniform images blurred by torchvision's GaussianBlur((5, 7)) at the drawn σ; the 10 with
    the largest −logsumexp kept (``topk(energyconf, 10)``); the mean of their penultimate features."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((100, 3, 8, 8), generator=generator, dtype=torch.float64)
    sigma = torch.empty(1).uniform_(*NOISE_SIGMA, generator=generator).item()
    images = torchvision.transforms.GaussianBlur(kernel_size=(5, 7), sigma=(sigma, sigma))(images)
    with torch.no_grad():
        energyconf = -1 * torch.logsumexp(model(images), dim=1)
        expected = model.body(images)[torch.topk(energyconf, NOISE_KEPT, dim=0).indices].mean(0)
    torch.testing.assert_close(noise_prototype(model, (3, 8, 8), CPU, torch.float64), expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- the low-dimensional gradient, the official path
def official_per_sample(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``cal_fisher_vector``: vmap(grad) of Energy_Model(model)(x[None]) = log Σ exp f(x) over every parameter."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())

    def energy(p, sample):
        return torch.log(torch.sum(torch.exp(functional_call(model, {**p, **buffers}, (sample.unsqueeze(0),))),
                                   dim=1)).squeeze()

    grads = vmap(grad(energy), in_dims=(None, 0))({k: v.detach() for k, v in params.items()}, x)
    return torch.cat([g.view(len(x), -1) for g in grads.values()], dim=1)


def official_pre_compute(model: nn.Module, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pre_compute``: z from the batch mean's backward × batch size (batches of 4); L from a batch-of-one loop,
    Σ(g_i − z)²/n; I_2 = 1/sqrt(L), inf → 1 → the largest."""
    total = 0
    for batch in train.split(4):
        model.zero_grad()
        torch.log(torch.sum(torch.exp(model(batch)), dim=1)).mean().backward()
        total = total + torch.cat([p.grad.view(-1) for p in model.parameters()]) * len(batch)
    z = total / len(train)
    fisher = 0
    for image in train:
        model.zero_grad()
        torch.log(torch.sum(torch.exp(model(image.unsqueeze(0))), dim=1)).backward()
        fisher = fisher + torch.square(torch.cat([p.grad.view(-1) for p in model.parameters()]) - z)
    i_2 = 1 / torch.sqrt(fisher / len(train))
    i_2 = torch.where(torch.isinf(i_2), torch.full_like(i_2, 1), i_2)
    return z, torch.where(i_2 == 1, torch.full_like(i_2, float(i_2.max())), i_2)


def official_knn(feat_log: np.ndarray, feat_log_val: np.ndarray, k: int) -> np.ndarray:
    """``knn``: the normalizer, faiss IndexFlatL2's squared distances, −(the k-th smallest)."""
    def normalizer(x):
        return x / (np.linalg.norm(x, ord=2, axis=-1, keepdims=True) + 1e-10)

    ftrain, ftest = normalizer(feat_log), normalizer(feat_log_val)
    return -np.sort(((ftest[:, None] - ftrain[None]) ** 2).sum(2), axis=1)[:, k - 1]


def official_lowdim(model: nn.Module, train: torch.Tensor, test: torch.Tensor, k: int, seed: int):
    """``pre_compute``, ``truncated_svd_dataloader`` with iter = 10 on the explicit Φ = I_2·(g − z), then
    ``save_low_dim_grad_feature`` and ``knn`` (K = 5)."""
    z, i_2 = official_pre_compute(model, train)
    phi = i_2 * (official_per_sample(model, train) - z)
    omiga = subspace_start(len(train), k, seed, torch.float64)  # the official torch.randn((n, k)), then qr
    omiga = phi.T @ omiga
    for _ in range(10):
        omiga = phi @ omiga
        omiga = phi.T @ omiga
        omiga, _ = torch.linalg.qr(omiga)
    b = phi @ omiga
    p, sigma, q = torch.svd(b.T)
    v = omiga @ p
    feat_log = (phi @ v).numpy()
    feat_log_val = ((i_2 * (official_per_sample(model, test) - z)) @ v).numpy()
    return z, i_2, v, feat_log_val, official_knn(feat_log, feat_log_val, 5)


def official_class_means(model: nn.Module, train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor):
    """The official ImageNet form: ``pre_compute``; ``cal_grad_per_class`` for each label (the backward of the sum
    of the class's energies in each batch of 4, summed, over its count; minus z, times I_2); the columns at unit
    norm (``generate_feature``: ``avg_grads / avg_grads_norm``); ``cal_fisher_vector`` · V for the training and test
    images; ``knn`` with K = 10. Labels without images are not visited (the official code would divide by 0)."""
    z, i_2 = official_pre_compute(model, train)
    columns = []
    for label in sorted(set(labels.tolist())):
        sum_v, num = 0, 0
        for inputs, targets in zip(train.split(4), labels.split(4)):
            indices = torch.nonzero(targets == label)
            if indices.shape[0] != 0:
                model.zero_grad()
                torch.log(torch.sum(torch.exp(model(inputs[indices[:, 0]])), dim=1)).sum().backward()
                sum_v = sum_v + torch.cat([p.grad.view(-1) for p in model.parameters()])
                num = num + indices.shape[0]
        columns.append((i_2 * (sum_v / num - z)).unsqueeze(1))
    v = torch.cat(columns, 1)
    v = v / torch.norm(v, dim=0).unsqueeze(0)
    feat_log = ((i_2 * (official_per_sample(model, train) - z)) @ v).numpy()
    feat_log_val = ((i_2 * (official_per_sample(model, test) - z)) @ v).numpy()
    return v, feat_log, feat_log_val, official_knn(feat_log, feat_log_val, 10)


def test_lowdim_equals_the_official_path_and_the_plain_loop():
    model = tiny_model()
    train = training_set(model, 10, 8).tensors[0]
    test = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fit = fit_lowdim(model, TensorDataset(train, torch.zeros(10, dtype=torch.long)), CPU, 3, components=4)
    z, i_2, v, features, expected = official_lowdim(model, train, test, 4, seed=0)
    torch.testing.assert_close(fit.mean, z, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fit.inverse_sqrt, i_2, rtol=1e-8, atol=0)
    torch.testing.assert_close(fit.directions, v, rtol=1e-7, atol=1e-9)
    detector = DETECTORS["lowdim"].with_fit(fit)
    _, scores = gradient_scores(model, test, [detector])
    np.testing.assert_allclose(scores["lowdim"].features["lowdim"].numpy(), features, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(scores["lowdim"].total.numpy(), expected, rtol=1e-7)
    for i, image in enumerate(test):
        assert detector.reference(model, image)["total"] == pytest.approx(scores["lowdim"].total[i].item(), rel=1e-10)
    assert fit.describe()["components"] == 4 and fit.num_train == 10


def test_lowdim_class_means_equal_the_official_imagenet_path_and_the_plain_loop():
    """The ImageNet form on 14 training images of 4 of the 10 classes: the directions, the training and test
    projections and the K = 10 scores against the official path; both projections; the plain loop."""
    model = tiny_model()
    train = training_set(model, 14, 8).tensors[0]
    labels = torch.tensor([0, 1, 2, 3] * 3 + [7, 7])
    test = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fit = fit_class_means(model, TensorDataset(train, labels), CPU, 3)
    v, feat_log, feat_log_val, expected = official_class_means(model, train, labels, test)
    assert fit.subspace == "class_means" and fit.directions.shape == (v.shape[0], 5) and fit.num_train == 14
    torch.testing.assert_close(fit.directions, v, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fit.train_features.numpy(), feat_log / np.linalg.norm(feat_log, axis=1, keepdims=True),
                               rtol=1e-8, atol=1e-12)
    for projection in PROJECTIONS:
        detector = get_detector("lowdim", lowdim_subspace="class_means", lowdim_projection=projection).with_fit(fit)
        _, scores = gradient_scores(model, test, [detector])
        np.testing.assert_allclose(scores["lowdim"].features["lowdim"].numpy(), feat_log_val, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(scores["lowdim"].total.numpy(), expected, rtol=1e-8)
    for i, image in enumerate(test):
        assert detector.reference(model, image)["total"] == pytest.approx(scores["lowdim"].total[i].item(), rel=1e-10)
    with pytest.raises(ValueError, match="a class_means fit for the principal subspace"):
        DETECTORS["lowdim"].with_fit(fit)


def test_lowdim_projection_by_gradients_equals_the_forward_mode_one():
    model = tiny_model()
    train = training_set(model, 8, 8)
    fit = fit_lowdim(model, train, CPU, 3, components=5)
    test = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    jvp_path, gradient_path = (gradient_scores(model, test, [LowDim(fit, "principal", p)])[1]["lowdim"]
                               for p in PROJECTIONS)
    torch.testing.assert_close(gradient_path.features["lowdim"], jvp_path.features["lowdim"], rtol=1e-9, atol=1e-12)


def test_a_subspace_larger_than_the_free_memory_is_refused_before_any_pass(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(lowdim, "free_memory", lambda device: 1000)
    passes = []
    monkeypatch.setattr(lowdim, "per_sample_gradients", lambda *a: passes.append(1))
    for fit in (fit_lowdim, fit_class_means):
        with pytest.raises(UserError, match=r"holds \d x 418 parameters x 10 directions \(0\.\d MB of "
                                            r"torch.float64\) while it fits, and cpu has 0\.0 MB free"):
            fit(model, training_set(model, 10, 8), CPU, 4)
    assert not passes


def test_the_imagenet_form_is_the_default_on_imagenet_and_the_fit_follows_the_option():
    args = argparse.Namespace(score="lowdim", layers="all", in_dataset="ImageNet", lowdim_subspace=None,
                              lowdim_projection="gradients")
    detector, = detectors_from(args)
    assert (detector.subspace, detector.projection, detector.options()) == ("class_means", "gradients",
                                                                           {"subspace": "class_means"})
    detector, = detectors_from(argparse.Namespace(**{**vars(args), "in_dataset": "CIFAR-10"}))
    assert detector.subspace == "principal"
    detector, = detectors_from(argparse.Namespace(**{**vars(args), "lowdim_subspace": "class_means",
                                                     "in_dataset": "digits"}))
    assert detector.subspace == "class_means"


def test_lowdim_subspace_is_the_top_principal_directions():
    """With as many components as images, the subspace iteration returns Φ's right singular vectors (up to sign)
    and the training projections are ΦV."""
    model = tiny_model()
    train = training_set(model, 6, 8).tensors[0]
    fit = fit_lowdim(model, TensorDataset(train, torch.zeros(6, dtype=torch.long)), CPU, 4, components=200)
    phi = fit.inverse_sqrt * (official_per_sample(model, train) - fit.mean)
    _, singular, vh = torch.linalg.svd(phi, full_matrices=False)
    keep = singular > 1e-8 * singular[0]  # Φ's rows sum to zero: rank ≤ N − 1
    overlap = (fit.directions.T @ vh[keep].T).abs()
    torch.testing.assert_close(overlap.diagonal()[:keep.sum()], torch.ones(int(keep.sum()), dtype=torch.float64),
                               rtol=0, atol=1e-8)
    projected = phi @ fit.directions
    normalised = projected / projected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(fit.train_features, normalised, rtol=1e-8, atol=1e-10)


def test_lowdim_projections_equal_vmap_gradients_on_resnet20():
    """The forward-mode products on a real architecture (every parameter of ResNet-20) against the official
    ``vmap(grad)`` gradients dotted with the directions, in chunks that do not divide the directions."""
    model = calibrated_model("resnet20", torch.float64)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gradients = official_per_sample(model, x)
    tangents = torch.randn(gradients.shape[1], 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(projections(model, x, tangents, chunk=2), gradients @ tangents, rtol=1e-9, atol=1e-12)


def test_unfit_and_cost_rules():
    model = tiny_model()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    for name in ("grood", "lowdim"):
        with pytest.raises(ValueError, match="fit on the ID training images first"):
            gradient_scores(model, x, [DETECTORS[name]])
    assert "lowdim" in TRACK_GRADIENT_SCORES and "lowdim" not in SCORE_ALL and "grood" in SCORE_ALL
    assert rows_per_sample([DETECTORS["grood"], DETECTORS["lowdim"]], 10) == 1  # forward passes: images count
    with pytest.warns(UserWarning, match="none of the 4"):
        none_right = DETECTORS["grood"].fit(model, training_set(model, 4, 8, wrong=4), CPU, 4)
    assert none_right.fitted.num_correct == 0 and len(none_right.fitted.train_gradients) == 4
    assert isinstance(DETECTORS["lowdim"].from_state(LowDimFit(*[torch.zeros(1)] * 4, 3).state()).fitted, LowDimFit)


# ---------------------------------------------------------------- the files, end to end
@pytest.mark.slow  # 4 s and 9 s: in the full suite
@pytest.mark.parametrize("name, limit", [("grood", 30), ("lowdim", 6)])  # GROOD: an untrained model is right on few
def test_tracking_fits_on_the_training_split_first(roots, name, limit):  # noqa: F811
    """--score grood / lowdim: the fit on the training subset (fit.pt) and train.pkl come first, and every file says
    that fit; it loads back as the same fit; another set reuses it; --dataset train with more images refits."""
    make_checkpoint(roots["checkpoint"], "net")
    run_tracking(track_gradient, roots, "--name=net", "--dataset=gaussian", f"--score={name}", f"--limit={limit}")
    train, gaussian = load(roots, "net", name, "train"), load(roots, "net", name, "gaussian")
    folder = roots["gradient"] / "digits" / "net" / name
    assert (folder / "fit.pt").is_file() and train["num_samples"] == limit
    assert gaussian["fit"] == train["fit"] == load(roots, "net", name, "digits")["fit"]
    assert train["fit"]["num_train"] == limit and gaussian["norm"] == "none"
    saved = torch.load(folder / "fit.pt", weights_only=True)
    detector = DETECTORS[name].from_state(saved["state"])
    assert detector.fit_description() == train["fit"]
    fit_bytes = (folder / "fit.pt").read_bytes()
    run_tracking(track_gradient, roots, "--name=net", "--dataset=rademacher", f"--score={name}", f"--limit={limit}")
    assert (folder / "fit.pt").read_bytes() == fit_bytes
    run_tracking(track_gradient, roots, "--name=net", "--dataset=train", f"--score={name}", f"--limit={limit + 2}")
    assert load(roots, "net", name, "train")["fit"]["num_train"] == limit + 2
    assert torch.load(folder / "fit.pt", weights_only=True)["model"] == saved["model"]

    results = roots["gradient"].parent / "results"
    common = [f"--gradient-root={roots['gradient']}", f"--results-root={results}", "--in-dataset=digits",
              "--name=net", "--dataset=gaussian"]
    compute_gradient_metrics.main([*common, "--saved_form=norm_single", f"--score={name}"])
    table = json.loads((results / "digits/net" / f"norm_single-{name}" / "gaussian.json").read_text())
    total = next(r for r in table["rows"] if r["row"] == "total")
    id_record, ood_record = load(roots, "net", name, "digits"), load(roots, "net", name, "gaussian")
    expected = ood_metrics(id_record["total"].astype(np.float64), ood_record["total"].astype(np.float64))
    assert total["AUROC"] == pytest.approx(100 * expected["AUROC"]) and table["gradient_score"] == "+value"
    compute_gradient_metrics.main([*common, "--compare"])
    comparison = json.loads((results / "digits/net/compare/comparison.json").read_text())
    assert {(r["name"], r["row"]) for r in comparison["rows"] if r["kind"] == "detector"} == {(name, "total")}
    if name == "lowdim":  # the other subspace: a new fit, the training file and the set re-tracked under it
        run_tracking(track_gradient, roots, "--name=net", "--dataset=gaussian", "--score=lowdim", f"--limit={limit}",
                     "--lowdim-subspace=class_means", "--lowdim-projection=gradients")
        saved = torch.load(folder / "fit.pt", weights_only=True)
        assert saved["state"]["subspace"] == "class_means" and saved["options"] == {"subspace": "class_means"}
        assert load(roots, "net", name, "gaussian")["fit"] == load(roots, "net", name, "train")["fit"]
        assert load(roots, "net", name, "gaussian")["fit"]["subspace"] == "class_means"
