"""ASH-S: prune all but the largest activations, sharpen what is left, and take the energy."""
from dataclasses import dataclass

import numpy as np

from utils.feature_baselines.base import FeatureBaseline, Head, Training, kept_ratio

PERCENTILE = 90  # OpenOOD's configs/postprocessors/ash.yml


@dataclass(frozen=True)
class ASH(FeatureBaseline):
    """Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution Detection", ICLR 2023
    (official code ``andrijazz/ash``, ``ash_s``; OpenOOD's ``ash_postprocessor.py`` and ``networks/ash_net.py``).
    Of the D pooled activations the k = D − round(D · p / 100) largest are kept (p = 90, OpenOOD's default),
    the rest set to 0, and what is kept is multiplied by exp(s1 / s2), s1 the sum of all D activations and s2
    the sum of those kept:

        ASH(x) = logsumexp(W · (m ⊙ h · e^{s1/s2}) + b)      (higher = ID),  m the mask of the k largest.

    The official code applies it to the pooled features, after the average pool (``resnet_imagenet.py``,
    ``densenet.py``), as OpenOOD does, so the stored penultimate features suffice. OpenOOD's ``ASHNet`` calls
    the binarising variant ``ash_b``; we follow the paper's ASH-S (its headline variant) and the issue.
    Where s2 = 0 (an all-zero row) the logits are b."""
    name = "ASH"
    paper = "Djurisic et al., Extremely Simple Activation Shaping for Out-of-Distribution Detection, ICLR 2023"
    score = "-E(ash_s(h))"
    head: Head
    percentile: float = PERCENTILE

    @classmethod
    def fit(cls, training: Training) -> "ASH":
        return cls(training.head)

    def values(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, np.float64)
        mask, ratio = kept_ratio(features, self.percentile)
        return self.head.energy_score(np.where(mask, features, 0.0) * np.exp(ratio)[:, None])

    def describe(self) -> dict:
        return {"ash_percentile": self.percentile}
