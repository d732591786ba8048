"""fDBD: the logit margins to every other class over their weights' distance, normalised by the distance
from the training mean."""
from dataclasses import dataclass

import numpy as np

from utils.feature_baselines.base import FeatureBaseline, Head, Training


@dataclass(frozen=True)
class FDBD(FeatureBaseline):
    """Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024 (OpenOOD's
    ``fdbd_postprocessor.py``). With ĉ the predicted class, the distance from h to the decision boundary
    between ĉ and c is |f_ĉ − f_c| / ‖w_ĉ − w_c‖; their sum over the other classes, normalised by the
    distance of h from the training features' mean μ (OpenOOD's default ``distance_as_normalizer: True``):

        fDBD(x) = Σ_{c ≠ ĉ} |f_ĉ(x) − f_c(x)| / ‖w_ĉ − w_c‖ / ‖h(x) − μ‖      (higher = ID).

    The paper averages over the K − 1 classes; OpenOOD sums, as we do (a constant factor: the same order).
    ĉ is the first of tied largest logits. Its "APS mode" (choosing the normaliser on OOD validation data) is
    never used."""
    name = "fDBD"
    paper = "Liu & Qin, Fast Decision Boundary based Out-of-Distribution Detector, ICML 2024"
    score = "boundary distance/|h - mu|"
    head: Head
    mean: np.ndarray       # μ, (D,)
    distances: np.ndarray  # ‖w_j − w_c‖, (K, K), with 1 on the diagonal (c = ĉ: a zero margin over 1)

    @classmethod
    def fit(cls, training: Training) -> "FDBD":
        weight = training.head.weight
        squared = (weight ** 2).sum(1)
        distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * weight @ weight.T, 0))
        np.fill_diagonal(distances, 1.0)
        return cls(training.head, training.features.mean(0), distances)

    def values(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, np.float64)
        logits = self.head.logits(features)
        predicted = logits.argmax(1)
        margins = np.abs(logits - logits[np.arange(len(logits)), predicted][:, None])
        boundary = (margins / self.distances[predicted]).sum(1)
        return boundary / np.linalg.norm(features - self.mean, axis=1)
