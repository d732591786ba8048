"""GEN: the generalised entropy of the largest softmax probabilities, negated."""
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from utils.feature_baselines.base import FeatureBaseline, Head, Training

GAMMA, M = 0.1, 100  # OpenOOD's configs/postprocessors/gen.yml


@dataclass(frozen=True)
class GEN(FeatureBaseline):
    """Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection", CVPR 2023
    (OpenOOD's ``gen_postprocessor.py``). With p = softmax(W h + b) and p_(1) ≥ … the M largest probabilities
    (all K where K ≤ M):

        GEN(x) = −Σ_{j ≤ M} p_(j)^γ (1 − p_(j))^γ      (higher = ID),  γ = 0.1, M = 100 (OpenOOD's defaults).

    Nothing is fit; the head alone. Its "APS mode" (γ, M chosen on OOD validation data) is never used."""
    name = "GEN"
    paper = "Liu, Lochman & Zach, GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection, CVPR 2023"
    score = "-sum p^g(1-p)^g"
    head: Head
    gamma: float = GAMMA
    m: int = M

    @classmethod
    def fit(cls, training: Training) -> "GEN":
        return cls(training.head)

    def values(self, features: np.ndarray) -> np.ndarray:
        probabilities = np.sort(softmax(self.head.logits(features), axis=1), axis=1)[:, -self.m:]
        return -(probabilities ** self.gamma * (1 - probabilities) ** self.gamma).sum(1)

    def describe(self) -> dict:
        return {"gen_gamma": self.gamma, "gen_m": self.m}
