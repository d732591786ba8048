"""ReAct: the energy of the logits after clipping the penultimate activations."""
from dataclasses import dataclass

import numpy as np

from utils.feature_baselines.base import FeatureBaseline, Head, Training

PERCENTILE = 90  # OpenOOD's configs/postprocessors/react.yml


@dataclass(frozen=True)
class ReAct(FeatureBaseline):
    """Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021
    (OpenOOD's ``react_postprocessor.py``; ``forward_threshold`` clips the pooled features). The activations
    are clipped at c, the 90th percentile (OpenOOD's default) of every activation of every ID image, and

        ReAct(x) = logsumexp(W · min(h(x), c) + b)      (−energy of the rectified logits; higher = ID).

    OpenOOD takes c from its ID *validation* split; we take it from the ID training subset (``train.pkl``), the
    only ID data a fit may read here. Its "APS mode" (choosing the percentile on OOD validation data) is
    never used: the default stands."""
    name = "ReAct"
    paper = "Sun, Guo & Li, ReAct: Out-of-distribution Detection With Rectified Activations, NeurIPS 2021"
    score = "-E(min(h, c))"
    head: Head
    threshold: float  # c

    @classmethod
    def fit(cls, training: Training) -> "ReAct":
        return cls(training.head, float(np.percentile(training.features.ravel(), PERCENTILE)))

    def values(self, features: np.ndarray) -> np.ndarray:
        return self.head.energy_score(np.minimum(np.asarray(features, np.float64), self.threshold))

    def describe(self) -> dict:
        return {"react_percentile": PERCENTILE, "react_threshold": self.threshold}
