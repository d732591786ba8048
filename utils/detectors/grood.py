"""GROOD: the gradient of a nearest-prototype loss with respect to an OOD prototype, scored by its distance to
the same gradients of correctly classified in-distribution training images."""
import copy
import hashlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from utils.detectors.base import Detector, Scores
from utils.per_sample import eval_mode, head_module, tf32_mode

GROOD_PAPER = "ElAraby et al., GROOD: Gradient-Aware Out-of-Distribution Detection, TMLR 2025"
# OpenOOD's get_uniform_noise (configs/postprocessors/grood.yaml: n_noise_samples 100): batches of 100 blurred
# uniform-noise images, of which the 10 with the lowest logsumexp of the logits are kept.
NOISE_IMAGES, NOISE_BATCH, NOISE_KEPT = 100, 100, 10
NOISE_KERNEL, NOISE_SIGMA = (5, 7), (0.2, 5.0)
NOISE_SEED = 0
_CHUNK = 1024  # test samples per distance block


@dataclass(frozen=True)
class GroodFit:
    """What GROOD keeps of the ID training images: the class prototypes, the OOD prototype and the gradients of
    the correctly classified ones."""
    prototypes: torch.Tensor      # (K, D): the mean penultimate features of each class (zeros for a class unseen)
    ood_prototype: torch.Tensor   # (D,): the mean features of the kept noise images
    train_gradients: torch.Tensor  # (M, D): grood_gradients of the training images with label == prediction
    num_train: int
    num_correct: int               # M, or 0 where none was correct and all N were kept

    def state(self) -> dict:
        return {"prototypes": self.prototypes, "ood_prototype": self.ood_prototype,
                "train_gradients": self.train_gradients, "num_train": self.num_train, "num_correct": self.num_correct}

    def describe(self) -> dict:
        digest = hashlib.sha256(b"".join(t.detach().cpu().double().numpy().tobytes()
                                         for t in (self.prototypes, self.ood_prototype, self.train_gradients)))
        return {"num_train": self.num_train, "num_correct": self.num_correct,
                "ood_prototype": "blurred uniform noise", "sha256": digest.hexdigest()}


def grood_gradients(features: torch.Tensor, prototypes: torch.Tensor, ood_prototype: torch.Tensor) -> torch.Tensor:
    """∂/∂p_o of CE(s, ŷ), s_j = −‖h − p_j‖ over the K class prototypes and the OOD prototype p_o, for each row of
    ``features`` h (B, D): ŷ is a class, never o, so the gradient is softmax(s)_o · (h − p_o)/‖h − p_o‖ whatever
    ŷ is (OpenOOD's ``_compute_grad_directly``, equal to its autograd path)."""
    centres = torch.cat([prototypes, ood_prototype[None]])
    difference = features[:, None, :] - centres[None]                  # (B, K + 1, D)
    distances = torch.linalg.vector_norm(difference, dim=2)            # (B, K + 1)
    p_ood = (-distances).softmax(1)[:, -1:]
    return p_ood * difference[:, -1] / distances[:, -1:]


def nearest_squared_distance(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """min_i ‖q − r_i‖² for each query row (faiss's ``IndexFlatL2`` distance, computed exactly)."""
    out = [torch.cdist(block, references, compute_mode="donot_use_mm_for_euclid_dist").amin(1).square()
           for block in queries.split(_CHUNK)]
    return torch.cat(out)


@torch.no_grad()
def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate features (the head's input, flattened) and the logits of images ``x``, in eval mode."""
    kept = {}
    handle = head_module(model).register_forward_pre_hook(lambda module, args: kept.__setitem__("h", args[0]))
    try:
        with eval_mode(model):
            logits = model(x)
    finally:
        handle.remove()
    return kept["h"].flatten(1), logits


def noise_prototype(model: nn.Module, image_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                    seed: int = NOISE_SEED) -> torch.Tensor:
    """OpenOOD's ``get_uniform_noise``: batches of ``NOISE_BATCH`` uniform [0, 1) images, Gaussian-blurred with a
    (5, 7) kernel and one σ drawn uniformly from [0.2, 5] per batch (torchvision's ``GaussianBlur``); of each
    batch the ``NOISE_KEPT`` images with the largest −logsumexp of the logits (the official ``topk`` of the
    negated energy) are kept; the prototype is the mean of their penultimate features. Seeded."""
    from torchvision.transforms.functional import gaussian_blur  # here: importing torchvision costs seconds

    generator = torch.Generator().manual_seed(seed)
    kept = []
    for _ in range(-(-NOISE_IMAGES // NOISE_BATCH)):
        images = torch.rand((NOISE_BATCH, *image_shape), generator=generator, dtype=torch.float64)
        sigma = torch.empty(1).uniform_(*NOISE_SIGMA, generator=generator).item()  # GaussianBlur.get_params
        images = gaussian_blur(images, list(NOISE_KERNEL), [sigma, sigma]).to(device, dtype)
        features, logits = features_and_logits(model, images)
        kept.append(features[(-logits.logsumexp(1)).topk(NOISE_KEPT).indices])
    return torch.cat(kept).mean(0)


class Grood(Detector):
    """GROOD (ElAraby et al., TMLR 2025; OpenOOD's ``openood/postprocessors/grood.py``, PR #301). Class prototypes
    p_c are the mean penultimate features h of the ID training images of class c; an OOD prototype p_o is the mean
    features of synthetic OOD images; the nearest-centroid logits s_j = −‖h − p_j‖ over the K + 1 prototypes give
    the loss CE(s, ŷ), ŷ = argmax f(x), whose gradient with respect to p_o,

        g(x) = softmax(s)_o · (h − p_o) / ‖h − p_o‖     (``grood_gradients``),

    is compared with the same gradients of the training images that the model classifies correctly:

        GROOD(x) = −min_i ‖g(x) − g(x_i)‖²      (the official faiss L2 index, k = 1; higher = ID, sign +1).

    The OOD prototype is built from no OOD data: OpenOOD's default ``use_val_ood: True`` averages the features of
    its OOD *validation* split, which this project's rule (fit on ID training images only) forbids; we take its
    ``use_gaussian_noise`` prototype instead (``noise_prototype``: blurred uniform noise, our models' [0, 1] input
    space). The official index is an approximate IVF index (nprobe 4) trained on the first ≤ 600 batches; we search
    exactly. The fit (``fit``: one forward pass over the training subset and 100 noise images) is made before the
    pass (``fit_first``); the pass is one forward pass. Values: ``total`` and the row ``nearest_gradient`` the
    score; ``features["grood_gradient"]`` each sample's g(x)."""
    name = "grood"
    paper = GROOD_PAPER
    formula = "−min_i ‖∇_{p_o} CE(−‖h − p‖, ŷ)(x) − the same of correct ID training image i‖², p_o from blurred noise"
    rows = "grood"
    norm = None
    sign = +1
    separate_pass = True
    fits_on_training = True
    fit_first = True
    row = "nearest_gradient"

    def __init__(self, fitted: GroodFit | None = None):
        self.fitted = fitted

    def output_gradients(self, logits: torch.Tensor) -> torch.Tensor:
        """None: no backward pass, so ``--batch-size`` counts its images."""
        return logits.new_zeros(0, *logits.shape)

    def fit(self, model: nn.Module, training: Dataset, device: torch.device, batch_size: int) -> "Grood":
        """This detector fit on the ``training`` images (their labels say the classes)."""
        features, logits, labels = [], [], []
        for images, targets in DataLoader(training, batch_size=batch_size):
            h, out = features_and_logits(model, images.to(device))
            features.append(h), logits.append(out), labels.append(targets.to(device))
        h, out, y = torch.cat(features), torch.cat(logits), torch.cat(labels)
        classes = out.shape[1]
        counts = torch.bincount(y, minlength=classes).to(h.dtype)
        sums = torch.zeros(classes, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, y, h)
        prototypes = sums / counts.clamp_min(1)[:, None]
        ood = noise_prototype(model, tuple(images.shape[1:]), device, h.dtype)
        correct = y == out.argmax(1)
        num_correct = int(correct.sum())
        if not num_correct:
            warnings.warn(f"GROOD keeps the gradients of the correctly classified training images, and none of the "
                          f"{len(y)} is (is this the model trained on them?): it keeps them all", stacklevel=2)
            correct[:] = True
        fitted = GroodFit(prototypes, ood, grood_gradients(h[correct], prototypes, ood), len(y), num_correct)
        return self.with_fit(fitted)

    def with_fit(self, fitted: GroodFit) -> "Grood":
        detector = copy.copy(self)
        detector.fitted = fitted
        return detector

    def from_state(self, state: dict) -> "Grood":
        return self.with_fit(GroodFit(**state))

    def _fit(self, like: torch.Tensor) -> GroodFit:
        if self.fitted is None:
            raise ValueError("GROOD needs its fit on the ID training images first (Grood.fit)")
        f = self.fitted
        return GroodFit(*(t.to(like.device, like.dtype) for t in (f.prototypes, f.ood_prototype, f.train_gradients)),
                        f.num_train, f.num_correct)

    def scores(self, model: nn.Module, x: torch.Tensor, tf32: bool = False) -> tuple[torch.Tensor, Scores]:
        with tf32_mode(tf32):
            h, logits = features_and_logits(model, x)
            f = self._fit(h)
            gradients = grood_gradients(h, f.prototypes, f.ood_prototype)
            score = -nearest_squared_distance(gradients, f.train_gradients)
        return logits, Scores({self.row: score}, score, torch.full((len(x),), -1, device=x.device),
                              features={"grood_gradient": gradients})

    def reference(self, model: nn.Module, image: torch.Tensor) -> dict[str, float]:
        """A batch of one: the features by a hook, the nearest-centroid cross-entropy with the predicted label,
        ``loss.backward()`` to a leaf OOD prototype, the nearest training gradient by a loop."""
        f = self._fit(image)
        kept = {}
        handle = head_module(model).register_forward_pre_hook(lambda module, args: kept.__setitem__("h", args[0]))
        try:
            with torch.no_grad():
                logits = model(image[None])
        finally:
            handle.remove()
        ood = f.ood_prototype.clone().requires_grad_()
        centres = torch.cat([f.prototypes, ood[None]])
        scores = -torch.stack([torch.linalg.vector_norm(kept["h"].flatten() - c) for c in centres])
        F.cross_entropy(scores[None], logits.argmax(1)).backward()
        nearest = min(((ood.grad - g) ** 2).sum().item() for g in f.train_gradients)
        return {self.row: -nearest, "total": -nearest, "class": -1}

    def fit_description(self) -> dict:
        return self.fitted.describe()
