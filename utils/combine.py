"""Combining layers: one detector from every tracked layer's norm, fit on in-distribution training images only.

The per-layer norms of a sample are a feature vector, and the best single layer changes from one OOD set to
the next; picking it by test AUROC is tuning on the test set. Instead, fit a Gaussian to the log per-layer
norms v = log(‖∇_{W_1}L‖, …, ‖∇_{W_L}L‖) of in-distribution **training** images (``track_gradient.py
--dataset train``), with a shrunk covariance Σ (Ledoit & Wolf 2004, or Chen et al.'s OAS, 2010, through
scikit-learn), and score a sample by its negative Mahalanobis distance,

    combined(x) = −sqrt((v(x) − μ)ᵀ Σ⁻¹ (v(x) − μ)),

higher = more in-distribution, whichever way the detector's norms move for OOD data (the same idea as the
Mahalanobis detector on features, Lee et al., NeurIPS 2018). Nothing of the test sets touches the fit.
"""
from dataclasses import dataclass

import numpy as np
from sklearn.covariance import OAS, LedoitWolf

SHRINKAGE = {"ledoitwolf": LedoitWolf, "oas": OAS}
COMBINED_ROW = "combined"


@dataclass(frozen=True)
class GaussianFit:
    layers: tuple[str, ...]   # the record's layers, in model order: the vector's coordinates
    mean: np.ndarray          # μ, (L,)
    precision: np.ndarray     # Σ⁻¹ of the shrunk covariance, (L, L)
    shrinkage: float          # the estimator's shrinkage coefficient
    method: str               # "ledoitwolf" | "oas"
    num_samples: int          # training images it was fit on

    def describe(self) -> dict:
        """What a results file records of the fit: enough to see that it did not move."""
        return {"method": self.method, "num_train": self.num_samples, "shrinkage": self.shrinkage,
                "mean": self.mean.tolist(), "layers": list(self.layers)}


def log_norms(record: dict) -> np.ndarray:
    """The (N, L) matrix of log per-layer norms of a gradients record; a norm of exactly 0 (a gradient that
    underflowed) is raised to the smallest positive float32 first."""
    values = np.stack([record["layers"][name] for name in record["layers"]], axis=1).astype(np.float64)
    return np.log(np.maximum(values, np.finfo(np.float32).tiny))


def fit_gaussian(train_record: dict, method: str = "ledoitwolf") -> GaussianFit:
    """Fit μ and a shrunk Σ to the log per-layer norms of ``train_record`` (the training split's file)."""
    estimator = SHRINKAGE[method]().fit(log_norms(train_record))
    return GaussianFit(tuple(train_record["layers"]), estimator.location_, estimator.precision_,
                       float(estimator.shrinkage_), method, int(train_record["num_samples"]))


def combined_score(fit: GaussianFit, record: dict) -> np.ndarray:
    """−Mahalanobis distance of each sample's log per-layer norms from the fit: (N,), higher = more ID."""
    if tuple(record["layers"]) != fit.layers:
        raise ValueError("the record tracks other layers than the training file the Gaussian was fit on")
    centred = log_norms(record) - fit.mean
    return -np.sqrt(np.einsum("ni,ij,nj->n", centred, fit.precision, centred).clip(min=0))
