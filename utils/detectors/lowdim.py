"""The low-dimensional gradient: per-sample gradients of logsumexp(f(x)) over every parameter, normalised by the
training gradients' mean and diagonal Fisher, projected onto a low-dimensional subspace fit on training images (their
principal directions, or their per-class means), scored by KNN there."""
import copy
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.data import DataLoader, Dataset

from utils.detectors.base import Detector, Scores
from utils.errors import UserError
from utils.per_sample import eval_mode, tf32_mode

LOWDIM_PAPER = "Wu et al., Low-Dimensional Gradient Helps Out-of-Distribution Detection, 2024"
COMPONENTS = 200    # github_PCA.sh on CIFAR-10: K = 200
ITERATIONS = 10     # truncated_svd_dataloader(..., iter=10)
KNN_K = {"principal": 5, "class_means": 10}  # github_main.py: K = 5 with CIFAR's principal subspace, 10 with
#                                              ImageNet's class means
SUBSPACES = tuple(KNN_K)
PROJECTIONS = ("jvp", "gradients")
SUBSPACE_SEED = 0
TANGENTS = 8        # directions pushed forward at once (memory: TANGENTS × one forward pass of the batch)
GRADIENT_FLOATS = 2 ** 27  # per-sample gradient entries formed at once (512 MB in float32): ResNet-50, 5 images
_CHUNK = 1024


@dataclass(frozen=True)
class LowDimFit:
    """The training images' statistics: the mean gradient z, I = 1/sqrt(diagonal Fisher), the directions V (P, k)
    of the subspace of the normalised gradients I ⊙ (g − z) (``subspace``: their top principal directions, or
    their per-class means), and the training images' normalised projections."""
    mean: torch.Tensor         # (P,)
    inverse_sqrt: torch.Tensor  # (P,)
    directions: torch.Tensor   # (P, k), unit columns (orthonormal for the principal subspace)
    train_features: torch.Tensor  # (N, k): I ⊙ (g_i − z) projected onto V, L2-normalised
    num_train: int
    subspace: str = "principal"

    def state(self) -> dict:
        return {"mean": self.mean, "inverse_sqrt": self.inverse_sqrt, "directions": self.directions,
                "train_features": self.train_features, "num_train": self.num_train, "subspace": self.subspace}

    def describe(self) -> dict:
        digest = hashlib.sha256(b"".join(t.detach().cpu().double().numpy().tobytes()
                                         for t in (self.directions, self.train_features)))
        return {"num_train": self.num_train, "subspace": self.subspace, "components": self.directions.shape[1],
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


def parameter_count(model: nn.Module) -> int:
    """P: the entries of every parameter (the length of a flattened per-sample gradient)."""
    return sum(p.numel() for p in model.parameters())


def gradient_chunk(model: nn.Module) -> int:
    """How many images' per-sample gradients are formed at once: ``GRADIENT_FLOATS`` entries (ResNet-20: 497
    images; ResNet-50: 5)."""
    return max(1, GRADIENT_FLOATS // parameter_count(model))


def _batches(model: nn.Module, training: Dataset, device: torch.device,
             batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The per-sample gradients (B, P) of the training images and their labels, a batch at a time (formed
    ``gradient_chunk`` images at a time)."""
    dtype, chunk = next(model.parameters()).dtype, gradient_chunk(model)
    for images, labels in DataLoader(training, batch_size=min(batch_size, chunk)):
        yield per_sample_gradients(model, images.to(device, dtype)), labels.to(device)


def _normalised(model: nn.Module, training: Dataset, device: torch.device, batch_size: int, mean: torch.Tensor,
                inverse_sqrt: torch.Tensor) -> Iterator[torch.Tensor]:
    """φ_i = I ⊙ (g_i − z) of the training images, a batch at a time: one pass of per-sample gradients."""
    for g, _ in _batches(model, training, device, batch_size):
        yield inverse_sqrt * (g - mean)


def normalise(features: torch.Tensor) -> torch.Tensor:
    """The official ``knn`` normaliser, x / (‖x‖ + 1e−10)."""
    return features / (torch.linalg.vector_norm(features, dim=1, keepdim=True) + 1e-10)


def subspace_start(num_train: int, components: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The random start of the subspace iteration: Q of the QR of an (N, k) standard normal matrix, seeded."""
    start = torch.randn((num_train, components), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(start).Q.to(dtype)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CUDA: ``mem_get_info``; the CPU: MemAvailable of /proc/meminfo), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


_HELD_BY_THE_OFFICIAL_CODE = {
    "principal": "the official code solves them 5 at a time (github_PCA.sh's interval_k); here they are solved "
                 "together",
    "class_means": "the official code keeps them on disk, one file per class, and reads 150 at a time; here they are "
                   "held at once (1,000 classes of ResNet-50 in float32: 102 GB)"}


def _size(count: int) -> str:
    return f"{count / 1e9:,.1f} GB" if count >= 1e9 else f"{count / 1e6:,.1f} MB"


def refuse_too_large(subspace: str, parameters: int, components: int, copies: int, dtype: torch.dtype,
                     device: torch.device) -> None:
    """Refuse, before any pass, a subspace whose ``copies`` (P, k) matrices exceed the memory free on ``device``."""
    need, free = copies * parameters * components * dtype.itemsize, free_memory(device)
    if free is None or need <= free:
        return
    raise UserError(f"--score lowdim with the {subspace} subspace holds {copies} x {parameters:,} parameters x "
                    f"{components:,} directions ({_size(need)} of {dtype}) while it fits, and {device} has "
                    f"{_size(free)} free ({_HELD_BY_THE_OFFICIAL_CODE[subspace]}). Run it where that much memory is "
                    "free (a larger GPU or host), or pick another --score.")


def moments(model: nn.Module, training: Dataset, device: torch.device, batch_size: int,
            on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None
            ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The number N of training images, their mean gradient z and I = L^(−1/2) of the diagonal Fisher
    L = mean_i (g_i − z)² (the official ``pre_compute``; here in one pass, the per-batch means and sums of squares
    merged exactly, Chan et al.), its infinite entries (parameters of zero variance) set to its largest finite
    one. ``on_batch(g, labels)`` sees each batch's per-sample gradients on the way."""
    count, mean, squares = 0, None, None
    for g, labels in _batches(model, training, device, batch_size):
        if on_batch is not None:
            on_batch(g, labels)
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
    return count, mean, torch.where(finite, inverse_sqrt, inverse_sqrt[finite].max())


def fit_lowdim(model: nn.Module, training: Dataset, device: torch.device, batch_size: int,
               components: int = COMPONENTS, iterations: int = ITERATIONS, seed: int = SUBSPACE_SEED) -> LowDimFit:
    """The official CIFAR fit (``github_PCA.py``) on the ``training`` images, model in eval mode. With
    φ_i = I ⊙ (g_i − z), Φ the (N, P) matrix of the φ_i (z and I from ``moments``):

    * the top-k right singular vectors V of Φ by subspace iteration (``truncated_svd_dataloader``): W = Φᵀ Ω,
      then ``iterations`` times W = qr(Φᵀ(Φ W)), then Φ W = B and V = W · U of svd(Bᵀ) = U S Qᵀ; k = min(200, N);
    * the training images' features: Φ V = B U, L2-normalised for the KNN.

    Φ is never held whole: each pass forms the per-sample gradients of a batch (``per_sample_gradients``), uses
    them and drops them — 1 + 1 + ``iterations`` + 1 passes over the training images."""
    with eval_mode(model):
        refuse_too_large("principal", parameter_count(model), min(components, len(training)), 3,
                         next(model.parameters()).dtype, device)
        count, mean, inverse_sqrt = moments(model, training, device, batch_size)

        def phi() -> Iterator[torch.Tensor]:
            return _normalised(model, training, device, batch_size, mean, inverse_sqrt)

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
    return LowDimFit(mean, inverse_sqrt, w @ u, normalise(b @ u), count, "principal")


def fit_class_means(model: nn.Module, training: Dataset, device: torch.device, batch_size: int) -> LowDimFit:
    """The official ImageNet fit (``github_Average_gradient.py``, then ``generate_feature`` of ``github_main.py``)
    on the ``training`` images and their labels, model in eval mode: with z and I from ``moments``, one direction a
    class, the mean normalised gradient of its training images scaled to unit length,

        v_c = u_c / ‖u_c‖,  u_c = I ⊙ (mean_{i: y_i = c} g_i − z)

    (``cal_grad_per_class`` with the NFK kernel; not orthogonalised), a class without training images left out;
    the training images' features I ⊙ (g_i − z) · V, L2-normalised for the KNN. Two passes: the class sums ride on
    the moments' pass. The K × P directions are held at once (ResNet-50 on ImageNet: 1,000 × 25.6 M)."""
    with eval_mode(model):
        dtype, parameters = next(model.parameters()).dtype, parameter_count(model)
        with torch.no_grad():
            num_classes = model(training[0][0][None].to(device, dtype)).shape[1]
        refuse_too_large("class_means", parameters, num_classes, 1, dtype, device)
        sums = torch.zeros(num_classes, parameters, dtype=dtype, device=device)
        counts = torch.zeros(num_classes, dtype=torch.long, device=device)

        def add(g: torch.Tensor, labels: torch.Tensor) -> None:
            sums.index_add_(0, labels, g)
            counts.index_add_(0, labels, torch.ones_like(labels))

        count, mean, inverse_sqrt = moments(model, training, device, batch_size, add)
        present = counts > 0
        if not present.all():  # a copy of the present classes' sums
            sums, counts = sums[present], counts[present]
        sums.div_(counts[:, None]).sub_(mean).mul_(inverse_sqrt)
        sums.div_(torch.linalg.vector_norm(sums, dim=1, keepdim=True))
        directions = sums.T
        train = torch.cat([phi @ directions for phi in _normalised(model, training, device, batch_size, mean,
                                                                    inverse_sqrt)])
    return LowDimFit(mean, inverse_sqrt, directions, normalise(train), count, "class_means")


def gradient_projections(model: nn.Module, x: torch.Tensor, fitted: LowDimFit) -> torch.Tensor:
    """e(x) = Vᵀ(I ⊙ (g(x) − z)) from the per-sample gradients g of ``gradient_chunk`` images at a time times V (the
    official ImageNet path, ``cal_fisher_vector`` · V): a few forward passes' work and a (B × P)·(P × k) product
    a batch, for B × P floats of memory."""
    return torch.cat([(fitted.inverse_sqrt * (per_sample_gradients(model, part) - fitted.mean)) @ fitted.directions
                      for part in x.split(gradient_chunk(model))])


def forward_mode_projections(model: nn.Module, x: torch.Tensor, fitted: LowDimFit) -> torch.Tensor:
    """e(x) = Vᵀ(I ⊙ (g(x) − z)) without forming g: e_j = ⟨g(x), I ⊙ v_j⟩ − ⟨z, I ⊙ v_j⟩ by ``projections``,
    ``TANGENTS`` directions at a time (the official CIFAR path, ``obtain_feature_embedding_by_jvp``)."""
    out = []
    for block in fitted.directions.split(TANGENTS, 1):
        tangents = fitted.inverse_sqrt[:, None] * block
        out.append(projections(model, x, tangents) - fitted.mean @ tangents)
    return torch.cat(out, 1)


def knn_score(features: torch.Tensor, train_features: torch.Tensor, k: int = KNN_K["principal"]) -> torch.Tensor:
    """The official ``knn``: −(squared distance to the k-th nearest normalised training feature), k ≤ N."""
    k = min(k, len(train_features))
    out = [torch.cdist(block, train_features, compute_mode="donot_use_mm_for_euclid_dist").square()
           .topk(k, 1, largest=False).values[:, -1] for block in normalise(features).split(_CHUNK)]
    return -torch.cat(out)


class LowDim(Detector):
    """The low-dimensional gradient (Wu et al., 2024; official code snowien/Low-dimensional-Gradient-Helps-OOD-
    Detection: ``github_PCA.py``, ``github_Average_gradient.py``, ``github_main.py``). The per-sample gradient
    g(x) = ∇_θ logsumexp(f(x)) over **every** parameter θ (weights, biases, BatchNorm's affine parameters: the
    official ``make_functional``), normalised by the ID training images' mean gradient z and diagonal Fisher L (the
    official ``NFK`` kernel), φ(x) = L^(−1/2) ⊙ (g(x) − z), projected onto k directions V fit on training images:

        e(x) = Vᵀφ(x),  LowDim(x) = −‖ẽ(x) − ẽ_(K)‖²,  ẽ = e/(‖e‖ + 1e−10), ẽ_(K) the K-th nearest training ẽ

    (the official ``knn``; higher = ID, sign +1). ``subspace``: ``principal`` (the official CIFAR form: the top-200
    principal directions of the training φ's, ``fit_lowdim``, K = 5) or ``class_means`` (the official ImageNet
    form: each class's mean training φ at unit length, ``fit_class_means``, K = 10). ``projection``: ``jvp``
    computes e(x) without forming g(x), by forward-mode products (``forward_mode_projections``, k of them a
    batch, the official CIFAR path); ``gradients`` forms g(x) a few images at a time and multiplies
    (``gradient_projections``, the official ImageNet path: two orders of magnitude less work at k = 200 on
    ResNet-20, for B × P floats). Both give e(x) to rounding; the fit forms per-sample gradients either way. Not
    in ``--score all`` (``in_score_all``): its fit makes 13 (principal) or 2 (class means) passes of per-sample
    gradients over the training subset. Values: ``total`` and the row ``knn`` the score; ``features["lowdim"]``
    e(x)."""
    name = "lowdim"
    paper = LOWDIM_PAPER
    formula = ("−d_K(Vᵀ(L^(−1/2) ⊙ (∇_θ logsumexp f(x) − z))), V the top-200 principal directions (K = 5) or the "
               "class means (K = 10) of ID training")
    rows = "lowdim"
    norm = None
    sign = +1
    separate_pass = True
    fits_on_training = True
    fit_first = True
    in_score_all = False
    row = "knn"

    def __init__(self, fitted: LowDimFit | None = None, subspace: str = "principal", projection: str = "jvp"):
        if subspace not in SUBSPACES or projection not in PROJECTIONS:
            raise ValueError(f"lowdim: subspace one of {SUBSPACES}, projection one of {PROJECTIONS}; got "
                             f"{subspace!r}, {projection!r}")
        self.fitted, self.subspace, self.projection = fitted, subspace, projection

    def options(self) -> dict:
        return {"subspace": self.subspace}

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        """None back-propagated: ``--batch-size`` counts its images (its forward-mode passes push ``TANGENTS``
        directions at a time; the gradient path forms ``gradient_chunk`` images' gradients at a time)."""
        return logits.new_zeros(0, *logits.shape)

    def fit(self, model: nn.Module, training: Dataset, device: torch.device, batch_size: int) -> "LowDim":
        fit = fit_lowdim if self.subspace == "principal" else fit_class_means
        return self.with_fit(fit(model, training, device, batch_size))

    def with_fit(self, fitted: LowDimFit) -> "LowDim":
        if fitted.subspace != self.subspace:
            raise ValueError(f"a {fitted.subspace} fit for the {self.subspace} subspace")
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
                                                                     f.train_features)), f.num_train, f.subspace)

    def scores(self, model: nn.Module, x: torch.Tensor, tf32: bool = False) -> tuple[torch.Tensor, Scores]:
        f = self._fit(x)
        project = forward_mode_projections if self.projection == "jvp" else gradient_projections
        with eval_mode(model), tf32_mode(tf32):
            with torch.no_grad():
                logits = model(x)
            features = project(model, x, f)
        score = knn_score(features, f.train_features, KNN_K[f.subspace])
        return logits, Scores({self.row: score}, score, torch.full((len(x),), -1, device=x.device),
                              features={"lowdim": features})

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        """A batch of one: ``backward()`` of logsumexp(f(x)), every ``p.grad`` flattened, normalised, projected."""
        f = self._fit(image)
        model.zero_grad(set_to_none=True)
        model(image[None]).logsumexp(1)[0].backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        features = (f.inverse_sqrt * (g - f.mean)) @ f.directions
        score = knn_score(features[None], f.train_features, KNN_K[f.subspace])[0].item()
        return {self.row: score, "total": score, "class": -1}

    def fit_description(self) -> dict:
        return self.fitted.describe()
