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
    return np.einsum("ni,ij,nj->n", centred, precision, centred)


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
    means: np.ndarray      # μ_c, (C, D)
    precision: np.ndarray  # Σ⁺, (D, D)

    @classmethod
    def fit(cls, training: Training) -> "Mahalanobis":
        return cls(*class_gaussians(training))

    def values(self, features: np.ndarray) -> np.ndarray:
        return np.min([squared_distances(features, mean, self.precision) for mean in self.means], axis=0)

    def describe(self) -> dict:
        return {"classes": len(self.means)}
