"""The strongest simple feature baselines, beside MSP and Energy: Mahalanobis and KNN on the penultimate features.

Both read the features the tracking pass stores (``features["penultimate"]``: the input of the model's last
Linear layer, from the same forward pass as the gradients) and are fit on the in-distribution **training**
file alone (``track_gradient.py --dataset train``, ``train.pkl``); nothing of the test sets touches the fit.
Scores are higher for in-distribution.

* **Mahalanobis** (Lee et al., NeurIPS 2018): class means μ_c of the training features and one tied covariance
  Σ = 1/N Σ_c Σ_{i in c} (h_i − μ_c)(h_i − μ_c)ᵀ (the training labels say the classes), and

      Mahalanobis(x) = −min_c (h(x) − μ_c)ᵀ Σ⁺ (h(x) − μ_c)

  (Σ⁺ the pseudo-inverse, as the official code's ``EmpiricalCovariance``): the paper's score on the penultimate
  layer, without its input pre-processing or its ensemble over layers, which are tuned on OOD data.
* **KNN** (Sun et al., ICML 2022): features L2-normalised, z = h / (‖h‖ + 1e−10) as the official code, and

      KNN(x) = −‖z(x) − z_(k)‖,   z_(k) the k-th nearest normalised training feature.

  The paper uses k = 50 with all 50,000 CIFAR training images and scales k with the fraction α of the
  training set it keeps (ImageNet: k = 1000 at α = 100 %, k = 10 at α = 1 %). We do the same:
  k = max(1, round(50 · N / 50,000)) for N training images, k = 5 for the default 5,000-image subset, 1 for
  a digits training split (at most 1,297 images). The official code ranks by the squared distance; the
  order, and so every metric, is the same.
"""
from dataclasses import dataclass

import numpy as np

from utils.errors import UserError

PENULTIMATE = "penultimate"
MAHALANOBIS, KNN = "Mahalanobis", "KNN"
FEATURE_BASELINES = {MAHALANOBIS: "-min_c d_M^2", KNN: "-d_k"}  # row → the score as the tables print it
KNN_K_FULL, KNN_FULL_SIZE = 50, 50_000  # Sun et al.'s k for CIFAR's whole training set
_CHUNK = 1024  # test samples per distance block: bounds memory at _CHUNK × N floats


def knn_k(num_train: int) -> int:
    """The KNN baseline's k for ``num_train`` training images: 50 per 50,000, at least 1 (the paper's scaling)."""
    return max(1, round(KNN_K_FULL * num_train / KNN_FULL_SIZE))


def normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float64)
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-10)


@dataclass(frozen=True)
class FeatureFit:
    """What the two baselines keep of the training features."""
    classes: np.ndarray        # the training labels present, increasing
    means: np.ndarray          # μ_c, (C, D)
    precision: np.ndarray      # Σ⁺ of the tied covariance, (D, D)
    train_normalised: np.ndarray  # z of every training image, (N, D)
    k: int                     # KNN's k
    num_samples: int

    def describe(self) -> dict:
        return {"num_train": self.num_samples, "classes": len(self.classes), "knn_k": self.k,
                "features": int(self.means.shape[1])}


def fit_features(train_record: dict, k: int | None = None) -> FeatureFit | None:
    """Fit both baselines on the penultimate features and labels of ``train_record`` (the training split's
    file); None when the file holds no features (files tracked before they were stored). ``k``: KNN's k
    (default ``knn_k``)."""
    features = train_record.get("features", {}).get(PENULTIMATE)
    if features is None:
        return None
    features, labels = np.asarray(features, np.float64), np.asarray(train_record["label"])
    if (labels < 0).any():
        raise UserError("the training file has samples without a label (-1); it cannot be the fit's")
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = centred.T @ centred / len(features)
    k = knn_k(len(features)) if k is None else k
    if not 1 <= k <= len(features):
        raise UserError(f"--knn-k (KNN's k) must be between 1 and the {len(features)} training images, got {k}")
    return FeatureFit(classes, means, np.linalg.pinv(covariance, hermitian=True), normalise(features), k,
                      len(features))


def mahalanobis_distances(fit: FeatureFit, features: np.ndarray) -> np.ndarray:
    """min_c (h − μ_c)ᵀ Σ⁺ (h − μ_c) of each row of ``features``: (N,)."""
    features = np.asarray(features, np.float64)
    best = np.full(len(features), np.inf)
    for mean in fit.means:
        centred = features - mean
        best = np.minimum(best, np.einsum("ni,ij,nj->n", centred, fit.precision, centred))
    return best


def knn_distances(fit: FeatureFit, features: np.ndarray) -> np.ndarray:
    """The distance from each normalised row of ``features`` to its k-th nearest normalised training feature."""
    z, train = normalise(features), fit.train_normalised
    out = np.empty(len(z))
    for start in range(0, len(z), _CHUNK):
        block = z[start:start + _CHUNK]
        squared = (block ** 2).sum(1)[:, None] - 2 * block @ train.T + (train ** 2).sum(1)[None, :]
        out[start:start + _CHUNK] = np.partition(squared, fit.k - 1, axis=1)[:, fit.k - 1]
    return np.sqrt(np.maximum(out, 0))


def feature_distances(fit: FeatureFit, record: dict) -> dict[str, np.ndarray]:
    """Each baseline's raw value (a distance; the score is its negative) on the samples of ``record``."""
    features = record.get("features", {}).get(PENULTIMATE)
    if features is None:
        raise UserError(f"the {record['dataset']} file holds no penultimate features; track it again")
    return {MAHALANOBIS: mahalanobis_distances(fit, features), KNN: knn_distances(fit, features)}
