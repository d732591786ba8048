"""Mahalanobis: the tied-covariance Gaussian distance to the nearest class mean."""
from dataclasses import dataclass

import numpy as np

from utils.feature_baselines.base import FeatureBaseline, Training


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the pseudo-inverse Σ⁺ of the (maximum-likelihood, 1/N) covariance of ``features``, as
    scikit-learn's ``EmpiricalCovariance`` (the official codes' estimator) computes its precision."""
    mean = features.mean(0)
    centred = features - mean
    return mean, np.linalg.pinv(centred.T @ centred / len(features), hermitian=True)


def class_gaussians(training: Training) -> tuple[np.ndarray, np.ndarray]:
    """The class means μ_c (C, D) of the training features and Σ⁺ of the tied covariance
    Σ = 1/N Σ_c Σ_{i in c} (h_i − μ_c)(h_i − μ_c)ᵀ (the training labels say the classes)."""
    classes = np.unique(training.labels)
    means = np.stack([training.features[training.labels == c].mean(0) for c in classes])
    centred = training.features - means[np.searchsorted(classes, training.labels)]
    return means, np.linalg.pinv(centred.T @ centred / len(centred), hermitian=True)


def squared_distances(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(h − μ)ᵀ P (h − μ) of each row h of ``features``."""
    centred = np.asarray(features, np.float64) - mean
    return ((centred @ precision) * centred).sum(1)


def whitener(precision: np.ndarray) -> np.ndarray:
    """T with P = T Tᵀ for a positive semi-definite precision P, so that (h − μ)ᵀ P (h − μ) = ‖(h − μ) T‖²."""
    values, vectors = np.linalg.eigh(precision)
    return vectors * np.sqrt(np.maximum(values, 0))


def nearest_class_distances(features: np.ndarray, means: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """min_c ‖(h − μ_c) T‖² of each row h of ``features``, ``means`` already whitened (μ_c T): one (N, D) × (D, D)
    product and one (N, D) × (D, C), so that a thousand classes cost what one does."""
    z = np.asarray(features, np.float64) @ transform
    squared = (z ** 2).sum(1)[:, None] - 2 * z @ means.T + (means ** 2).sum(1)[None, :]
    return np.maximum(squared.min(1), 0)


@dataclass(frozen=True)
class Mahalanobis(FeatureBaseline):
    """Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018 (OpenOOD's ``mds_postprocessor.py``). Class means μ_c and one tied covariance Σ of
    the training features, and

        Mahalanobis(x) = −min_c (h(x) − μ_c)ᵀ Σ⁺ (h(x) − μ_c)

    (Σ⁺ the pseudo-inverse, as ``EmpiricalCovariance``): the paper's score on the penultimate layer, without
    its input pre-processing or its ensemble over layers, which are tuned on OOD data. Returns the distance
    (sign −1: higher score = ID)."""
    name = "Mahalanobis"
    paper = ("Lee et al., A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial "
             "Attacks, NeurIPS 2018")
    score = "-min_c d_M^2"
    sign = -1
    needs_head = False
    means: np.ndarray      # μ_c T, (C, D): the class means whitened
    transform: np.ndarray  # T, Σ⁺ = T Tᵀ, (D, D)

    @classmethod
    def fit(cls, training: Training) -> "Mahalanobis":
        means, precision = class_gaussians(training)
        transform = whitener(precision)
        return cls(means @ transform, transform)

    def values(self, features: np.ndarray) -> np.ndarray:
        return nearest_class_distances(features, self.means, self.transform)

    def describe(self) -> dict:
        return {"classes": len(self.means)}
