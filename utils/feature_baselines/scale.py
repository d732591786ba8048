"""SCALE: scale every activation by how much of the sum the largest ones carry, and take the energy."""
from dataclasses import dataclass

import numpy as np

from utils.feature_baselines.base import FeatureBaseline, Head, Training, kept_ratio

PERCENTILE = 85  # OpenOOD's configs/postprocessors/scale.yml


@dataclass(frozen=True)
class SCALE(FeatureBaseline):
    """Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution Detection
    Enhancement", ICLR 2024 (official code ``kai422/SCALE``, ``networks/scale_net.py``, the same as OpenOOD's
    ``scale_postprocessor.py``). ASH's ratio r = s1 / s2 with the k = D − round(D · p / 100) largest pooled
    activations (p = 85, OpenOOD's default), but nothing pruned:

        SCALE(x) = logsumexp(W · (h · e^{s1/s2}) + b)      (higher = ID).

    The official code applies it to the pooled features, so the stored penultimate features suffice. Where
    s2 = 0 (an all-zero row) the factor is 1."""
    name = "SCALE"
    paper = ("Xu, Chen, Franchi & Yao, Scaling for Training Time and Post-hoc Out-of-distribution Detection "
             "Enhancement, ICLR 2024")
    score = "-E(h e^r)"
    head: Head
    percentile: float = PERCENTILE

    @classmethod
    def fit(cls, training: Training) -> "SCALE":
        return cls(training.head)

    def values(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, np.float64)
        _, ratio = kept_ratio(features, self.percentile)
        return self.head.energy_score(features * np.exp(ratio)[:, None])

    def describe(self) -> dict:
        return {"scale_percentile": self.percentile}
