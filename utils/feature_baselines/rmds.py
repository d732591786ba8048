"""RMDS: the Mahalanobis distance to the nearest class, relative to a background Gaussian of all the features."""
from dataclasses import dataclass

import numpy as np

from utils.feature_baselines.base import FeatureBaseline, Training
from utils.feature_baselines.mahalanobis import (
    class_gaussians,
    gaussian,
    nearest_class_distances,
    squared_distances,
    whitener,
)


@dataclass(frozen=True)
class RMDS(FeatureBaseline):
    """Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection", 2021 (OpenOOD's
    ``rmds_postprocessor.py``). Mahalanobis' class means μ_c and tied covariance Σ, and a background Gaussian
    of every training feature (mean μ_0, covariance Σ_0); d_c = (h − μ_c)ᵀ Σ⁺ (h − μ_c), d_0 = (h − μ_0)ᵀ Σ_0⁺
    (h − μ_0), and

        RMDS(x) = max_c (d_0(x) − d_c(x)) = d_0(x) − min_c d_c(x)      (higher = ID).

    Fit on the ID training subset (``train.pkl``), as OpenOOD fits on its training split; no hyper-parameter."""
    name = "RMDS"
    paper = "Ren et al., A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection, arXiv 2021"
    score = "max_c d_0 - d_c"
    needs_head = False
    means: np.ndarray                 # μ_c T, the class means whitened by T, Σ⁺ = T Tᵀ (C, D)
    transform: np.ndarray             # T
    background_mean: np.ndarray       # μ_0
    background_precision: np.ndarray  # Σ_0⁺

    @classmethod
    def fit(cls, training: Training) -> "RMDS":
        means, precision = class_gaussians(training)
        transform = whitener(precision)
        return cls(means @ transform, transform, *gaussian(training.features))

    def values(self, features: np.ndarray) -> np.ndarray:
        nearest = nearest_class_distances(features, self.means, self.transform)
        return squared_distances(features, self.background_mean, self.background_precision) - nearest
