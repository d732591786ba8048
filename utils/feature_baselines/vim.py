"""ViM: the energy minus the scaled norm of the feature's residual off the principal subspace."""
from dataclasses import dataclass

import numpy as np

from utils.feature_baselines.base import FeatureBaseline, Head, Training

DIM, DIM_LARGE, LARGE = 256, 1000, 2048  # OpenOOD's vim.yml dim 256; 1,000 at 2,048 features (the paper's ResNet-50)


def principal_dim(num_features: int) -> int:
    """ViM's principal dimension for D features: 256 (OpenOOD's default), 1,000 from 2,048 features on (the
    paper's ResNet-50 and BiT); where that is not below D (ResNet-20's 64 features, WRN-40-2's 128), half of D,
    rounded down — 256 is half of ResNet-18's 512 features and 1,000 about half of ResNet-50's 2,048 — so the
    residual space keeps D − dim ≥ 1 dimensions."""
    dim = DIM_LARGE if num_features >= LARGE else DIM
    return dim if dim < num_features else max(1, num_features // 2)


@dataclass(frozen=True)
class ViM(FeatureBaseline):
    """Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022 (OpenOOD's
    ``vim_postprocessor.py``). The origin u = −pinv(W) b; the principal subspace of the training features
    about u (eigenvectors of (1/N) Σ (h_i − u)(h_i − u)ᵀ, as ``EmpiricalCovariance(assume_centered=True)``),
    whose ``dim`` largest directions span it and the rest, R, the residual space; α = mean_i max_k f_k(h_i) /
    mean_i ‖Rᵀ(h_i − u)‖ over the training features; and

        ViM(x) = logsumexp(W h + b) − α ‖Rᵀ(h − u)‖      (higher = ID).

    ``dim`` follows ``principal_dim``. OpenOOD fits on its training split, as we do (``train.pkl``); its
    "APS mode" (dim chosen from {256, 1000} on OOD validation data) is never used."""
    name = "ViM"
    paper = "Wang et al., ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022"
    score = "-E - a|R'(h - u)|"
    head: Head
    origin: np.ndarray    # u, (D,)
    residual: np.ndarray  # R, (D, D − dim)
    alpha: float
    dim: int

    @classmethod
    def fit(cls, training: Training) -> "ViM":
        head, features = training.head, training.features
        origin = -np.linalg.pinv(head.weight) @ head.bias
        centred = features - origin
        _, vectors = np.linalg.eigh(centred.T @ centred / len(centred))  # eigenvalues increasing
        dim = principal_dim(features.shape[1])
        residual = np.ascontiguousarray(vectors[:, :features.shape[1] - dim])
        alpha = head.logits(features).max(1).mean() / np.linalg.norm(centred @ residual, axis=1).mean()
        return cls(head, origin, residual, float(alpha), dim)

    def values(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, np.float64)
        virtual = np.linalg.norm((features - self.origin) @ self.residual, axis=1)
        return self.head.energy_score(features) - self.alpha * virtual

    def describe(self) -> dict:
        return {"vim_dim": self.dim, "vim_alpha": self.alpha}
