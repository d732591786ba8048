"""The low-dimensional gradient: per-sample gradients of logsumexp(f(x)) over every parameter, normalised by the
training gradients' mean and diagonal Fisher, projected onto their principal subspace, scored by KNN there."""
import copy
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.data import DataLoader, Dataset

from utils.detectors.base import Detector, Scores
from utils.per_sample import eval_mode, tf32_mode

LOWDIM_PAPER = "Wu et al., Low-Dimensional Gradient Helps Out-of-Distribution Detection, 2024"
COMPONENTS = 200    # github_PCA.sh on CIFAR-10: K = 200
ITERATIONS = 10     # truncated_svd_dataloader(..., iter=10)
KNN_K = 5           # github_main.py on CIFAR-10: K = 5 (ImageNet: 10)
SUBSPACE_SEED = 0
TANGENTS = 8        # directions pushed forward at once (memory: TANGENTS × one forward pass of the batch)
_CHUNK = 1024


@dataclass(frozen=True)
class LowDimFit:
    """The training images' statistics: the mean gradient z, I = 1/sqrt(diagonal Fisher), the principal directions
    V (P, k) of the normalised gradients I ⊙ (g − z), and the training images' normalised projections."""
    mean: torch.Tensor         # (P,)
    inverse_sqrt: torch.Tensor  # (P,)
    directions: torch.Tensor   # (P, k), orthonormal columns
    train_features: torch.Tensor  # (N, k): I ⊙ (g_i − z) projected onto V, L2-normalised
    num_train: int

    def state(self) -> dict:
        return {"mean": self.mean, "inverse_sqrt": self.inverse_sqrt, "directions": self.directions,
                "train_features": self.train_features, "num_train": self.num_train}

    def describe(self) -> dict:
        digest = hashlib.sha256(b"".join(t.detach().cpu().double().numpy().tobytes()
                                         for t in (self.directions, self.train_features)))
        return {"num_train": self.num_train, "components": self.directions.shape[1],
                "parameters": self.directions.shape[0], "sha256": digest.hexdigest()}


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, in ``named_parameters()`` order (the official ``make_functional_with_buffers``)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def _logsumexp(model: nn.Module) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """f(θ, x) = logsumexp of the logits of images x (B,) with parameters θ (the official ``Energy_Model``)."""
    buffers = dict(model.named_buffers())
    return lambda params, x: functional_call(model, {**params, **buffers}, (x,)).logsumexp(1)


def per_sample_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """∇_θ logsumexp(f(x_i)) of each image, flattened in parameter order, (B, P); the model in eval mode."""
    f = _logsumexp(model)
    gradients = vmap(grad(lambda params, image: f(params, image[None])[0]), in_dims=(None, 0))(parameters_of(model), x)
    return torch.cat([g.flatten(1) for g in gradients.values()], 1)


def projections(model: nn.Module, x: torch.Tensor, tangents: torch.Tensor, chunk: int = TANGENTS) -> torch.Tensor:
    """⟨∇_θ logsumexp(f(x_i)), t_j⟩ for every image i and column t_j of ``tangents`` (P, k), (B, k), without
    forming a per-sample gradient: forward-mode products d/dε f(θ + ε t_j; x), the whole batch at once (in eval
    mode f is per sample), ``chunk`` directions at a time."""
    f, params = _logsumexp(model), parameters_of(model)
    shapes = [(name, p.shape, p.numel()) for name, p in params.items()]

    def unflatten(columns: torch.Tensor) -> dict[str, torch.Tensor]:  # (P, c) → {name: (c, *shape)}
        pieces = columns.T.split([n for _, _, n in shapes], 1)
        return {name: piece.reshape(-1, *shape) for (name, shape, _), piece in zip(shapes, pieces)}

    push = vmap(lambda tangent: jvp(lambda p: f(p, x), (params,), (tangent,))[1])
    return torch.cat([push(unflatten(block)).T for block in tangents.split(chunk, 1)], 1)


def _batches(model: nn.Module, training: Dataset, device: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """The per-sample gradients of the training images, a batch at a time."""
    for images, _ in DataLoader(training, batch_size=batch_size):
        yield per_sample_gradients(model, images.to(device, next(model.parameters()).dtype))


def normalise(features: torch.Tensor) -> torch.Tensor:
    """The official ``knn`` normaliser, x / (‖x‖ + 1e−10)."""
    return features / (torch.linalg.vector_norm(features, dim=1, keepdim=True) + 1e-10)


def subspace_start(num_train: int, components: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The random start of the subspace iteration: Q of the QR of an (N, k) standard normal matrix, seeded."""
    start = torch.randn((num_train, components), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(start).Q.to(dtype)


def fit_lowdim(model: nn.Module, training: Dataset, device: torch.device, batch_size: int,
               components: int = COMPONENTS, iterations: int = ITERATIONS, seed: int = SUBSPACE_SEED) -> LowDimFit:
    """The official fit (``github_PCA.py``) on the ``training`` images, model in eval mode. With
    φ_i = I ⊙ (g_i − z), Φ the (N, P) matrix of the φ_i:

    * z = mean_i g_i and the diagonal Fisher L = mean_i (g_i − z)² (``pre_compute``; here in one pass, per-batch
      means and sums of squares merged exactly, Chan et al.), I = L^(−1/2), its infinite entries (parameters of
      zero variance) set to its largest finite one;
    * the top-k right singular vectors V of Φ by subspace iteration (``truncated_svd_dataloader``): W = Φᵀ Ω,
      then ``iterations`` times W = qr(Φᵀ(Φ W)), then Φ W = B and V = W · U of svd(Bᵀ) = U S Qᵀ; k = min(200, N);
    * the training images' features: Φ V = B U, L2-normalised for the KNN.

    Φ is never held whole: each pass forms the per-sample gradients of a batch (``per_sample_gradients``), uses
    them and drops them — 1 + 1 + ``iterations`` + 1 passes over the training images."""
    with eval_mode(model):
        count, mean, squares = 0, None, None
        for g in _batches(model, training, device, batch_size):
            g_mean = g.mean(0)
            g_squares = (g - g_mean).square().sum(0)
            if mean is None:
                count, mean, squares = len(g), g_mean, g_squares
                continue
            delta, total = g_mean - mean, count + len(g)
            squares = squares + g_squares + delta.square() * count * len(g) / total
            mean, count = mean + delta * len(g) / total, total
        inverse_sqrt = (squares / count).rsqrt()
        finite = torch.isfinite(inverse_sqrt)
        inverse_sqrt = torch.where(finite, inverse_sqrt, inverse_sqrt[finite].max())

        def phi() -> Iterator[torch.Tensor]:
            for g in _batches(model, training, device, batch_size):
                yield inverse_sqrt * (g - mean)

        k = min(components, count)
        omega = subspace_start(count, k, seed, mean.dtype).to(device)
        w, start = torch.zeros(len(mean), k, dtype=mean.dtype, device=device), 0
        for block in phi():
            w += block.T @ omega[start:start + len(block)]
            start += len(block)
        for _ in range(iterations):
            product = torch.zeros_like(w)
            for block in phi():
                product += block.T @ (block @ w)
            w = torch.linalg.qr(product).Q
        b = torch.cat([block @ w for block in phi()])
        u, _, _ = torch.linalg.svd(b.T, full_matrices=False)
    return LowDimFit(mean, inverse_sqrt, w @ u, normalise(b @ u), count)


def knn_score(features: torch.Tensor, train_features: torch.Tensor, k: int = KNN_K) -> torch.Tensor:
    """The official ``knn``: −(squared distance to the k-th nearest normalised training feature), k ≤ N."""
    k = min(k, len(train_features))
    out = [torch.cdist(block, train_features, compute_mode="donot_use_mm_for_euclid_dist").square()
           .topk(k, 1, largest=False).values[:, -1] for block in normalise(features).split(_CHUNK)]
    return -torch.cat(out)


class LowDim(Detector):
    """The low-dimensional gradient (Wu et al., 2024; official code snowien/Low-dimensional-Gradient-Helps-OOD-
    Detection: ``github_PCA.py``, ``github_main.py``). The per-sample gradient g(x) = ∇_θ logsumexp(f(x)) over
    **every** parameter θ (weights, biases, BatchNorm's affine parameters: the official ``make_functional``),
    normalised by the ID training images' mean gradient z and diagonal Fisher L (the official ``NFK`` kernel),
    φ(x) = L^(−1/2) ⊙ (g(x) − z), projected onto the top-k principal directions V of the training φ's
    (``fit_lowdim``; k = 200 on CIFAR):

        e(x) = Vᵀφ(x),  LowDim(x) = −‖ẽ(x) − ẽ_(5)‖²,  ẽ = e/(‖e‖ + 1e−10), ẽ_(5) the 5th nearest training ẽ

    (the official ``knn`` with K = 5, CIFAR's; higher = ID, sign +1). e(x) is computed without forming g(x):
    e_j(x) = ⟨g(x), L^(−1/2) ⊙ v_j⟩ − ⟨z, L^(−1/2) ⊙ v_j⟩, a forward-mode product (``projections``), as the
    official ``obtain_feature_embedding_by_jvp``. Its cost: k forward-mode passes a batch (``TANGENTS`` at a
    time), and the fit's 13 passes of per-sample gradients over the training subset — so it is not in
    ``--score all`` (``in_score_all``). The official ImageNet form (per-class mean gradients as the directions)
    is not implemented. Values: ``total`` and the row ``knn`` the score; ``features["lowdim"]`` e(x)."""
    name = "lowdim"
    paper = LOWDIM_PAPER
    formula = "−d_5(Vᵀ(L^(−1/2) ⊙ (∇_θ logsumexp f(x) − z))), V the top-200 principal directions of ID training"
    rows = "lowdim"
    norm = None
    sign = +1
    separate_pass = True
    fits_on_training = True
    fit_first = True
    in_score_all = False
    row = "knn"

    def __init__(self, fitted: LowDimFit | None = None):
        self.fitted = fitted

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        """None back-propagated: ``--batch-size`` counts its images (its forward-mode passes push ``TANGENTS``
        directions at a time)."""
        return logits.new_zeros(0, *logits.shape)

    def fit(self, model: nn.Module, training: Dataset, device: torch.device, batch_size: int) -> "LowDim":
        return self.with_fit(fit_lowdim(model, training, device, batch_size))

    def with_fit(self, fitted: LowDimFit) -> "LowDim":
        detector = copy.copy(self)
        detector.fitted = fitted
        return detector

    def from_state(self, state: dict) -> "LowDim":
        return self.with_fit(LowDimFit(**state))

    def _fit(self, like: torch.Tensor) -> LowDimFit:
        if self.fitted is None:
            raise ValueError("the low-dimensional gradient needs its fit on the ID training images first (LowDim.fit)")
        f = self.fitted
        return LowDimFit(*(t.to(like.device, like.dtype) for t in (f.mean, f.inverse_sqrt, f.directions,
                                                                     f.train_features)), f.num_train)

    def scores(self, model: nn.Module, x: torch.Tensor, tf32: bool = False) -> tuple[torch.Tensor, Scores]:
        f = self._fit(x)
        tangents = f.inverse_sqrt[:, None] * f.directions
        with eval_mode(model), tf32_mode(tf32):
            with torch.no_grad():
                logits = model(x)
            features = projections(model, x, tangents) - f.mean @ tangents
        score = knn_score(features, f.train_features)
        return logits, Scores({self.row: score}, score, torch.full((len(x),), -1, device=x.device),
                              features={"lowdim": features})

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        """A batch of one: ``backward()`` of logsumexp(f(x)), every ``p.grad`` flattened, normalised, projected."""
        f = self._fit(image)
        model.zero_grad(set_to_none=True)
        model(image[None]).logsumexp(1)[0].backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        features = (f.inverse_sqrt * (g - f.mean)) @ f.directions
        score = knn_score(features[None], f.train_features)[0].item()
        return {self.row: score, "total": score, "class": -1}

    def fit_description(self) -> dict:
        return self.fitted.describe()
