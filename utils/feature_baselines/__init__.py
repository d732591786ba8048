"""The strongest simple feature baselines, beside MSP and Energy: one unit each, on the penultimate features.

Each reads the features the tracking pass stores (``features["penultimate"]``: the input of the model's last
layer, from the same forward pass as the gradients) and, where it needs the logits, the model's head
(``head``: logits = W h + b, stored in every gradients file by the same pass); each is fit on the
in-distribution **training** file alone (``track_gradient.py --dataset train``, ``train.pkl``): nothing of
the test sets touches a fit. Every score is higher for in-distribution; OpenOOD v1.5's default
hyper-parameters, never its "APS mode" search on OOD validation data.

| row | paper | fit on the training file | module |
|---|---|---|---|
| Mahalanobis | Lee et al., NeurIPS 2018 | class means, tied covariance | ``mahalanobis`` |
| KNN | Sun et al., ICML 2022 | the normalised features (k = 50 per 50,000) | ``knn`` |
| ReAct | Sun, Guo & Li, NeurIPS 2021 | the clip: the 90th percentile of the activations | ``react`` |
| ASH | Djurisic et al., ICLR 2023 | nothing (ASH-S, percentile 90) | ``ash`` |
| SCALE | Xu et al., ICLR 2024 | nothing (percentile 85) | ``scale`` |
| ViM | Wang et al., CVPR 2022 | u = −pinv(W) b, the principal subspace, α | ``vim`` |
| fDBD | Liu & Qin, ICML 2024 | the feature mean | ``fdbd`` |
| GEN | Liu et al., CVPR 2023 | nothing (γ = 0.1, M = 100) | ``gen`` |
| RMDS | Ren et al., 2021 | class means, tied and background covariances | ``rmds`` |

Adding a baseline is one module here with its class in ``BASELINES`` (and its test).
"""
from dataclasses import dataclass

import numpy as np

from utils.errors import UserError
from utils.feature_baselines.ash import ASH
from utils.feature_baselines.base import HEAD, PENULTIMATE, FeatureBaseline, Head, Training
from utils.feature_baselines.fdbd import FDBD
from utils.feature_baselines.gen import GEN
from utils.feature_baselines.knn import KNN, knn_k
from utils.feature_baselines.mahalanobis import Mahalanobis
from utils.feature_baselines.react import ReAct
from utils.feature_baselines.rmds import RMDS
from utils.feature_baselines.scale import SCALE
from utils.feature_baselines.vim import ViM, principal_dim

__all__ = ["ASH", "BASELINES", "FDBD", "FEATURE_BASELINES", "GEN", "HEAD", "HEAD_BASELINES", "KNN", "PENULTIMATE",
           "RMDS", "SCALE", "FeatureBaseline", "FeatureFit", "Head", "Mahalanobis", "ReAct", "Training", "ViM",
           "feature_values", "fit_features", "knn_k", "principal_dim"]

BASELINES: tuple[type[FeatureBaseline], ...] = (Mahalanobis, KNN, ReAct, ASH, SCALE, ViM, FDBD, GEN, RMDS)
FEATURE_BASELINES = {b.name: b for b in BASELINES}  # row → its unit
HEAD_BASELINES = tuple(b.name for b in BASELINES if b.needs_head)
_BLOCK = 8192  # samples scored at once: bounds the memory of the (N, D) intermediates


@dataclass(frozen=True)
class FeatureFit:
    """Every baseline fit on one training file, by row name (those that need a head only where it stores one)."""
    baselines: dict[str, FeatureBaseline]
    num_samples: int
    num_features: int

    def describe(self) -> dict:
        described = {"num_train": self.num_samples, "features": self.num_features, "rows": list(self.baselines)}
        for baseline in self.baselines.values():
            described.update(baseline.describe())
        return described


def fit_features(train_record: dict, k: int | None = None) -> FeatureFit | None:
    """Fit every baseline on the penultimate features, labels and head of ``train_record`` (the training
    split's file); None when the file holds no features (files tracked before they were stored). Without a
    head (files tracked before heads were stored) only those that need none. ``k``: KNN's k (default
    ``knn_k``)."""
    features = train_record.get("features", {}).get(PENULTIMATE)
    if features is None:
        return None
    features, labels = np.asarray(features, np.float64), np.asarray(train_record["label"])
    if (labels < 0).any():
        raise UserError("the training file has samples without a label (-1); it cannot be the fit's")
    training = Training(features, labels, Head.of(train_record), k)
    if training.head is not None and training.head.weight.shape[1] != features.shape[1]:
        raise UserError(f"the training file's head maps {training.head.weight.shape[1]} features, but its "
                        f"penultimate features have {features.shape[1]}; track it again")
    fitted = {b.name: b.fit(training) for b in BASELINES if training.head is not None or not b.needs_head}
    return FeatureFit(fitted, len(features), features.shape[1])


def feature_values(fit: FeatureFit, record: dict) -> dict[str, np.ndarray]:
    """Each baseline's raw value (its score times its ``sign``) on the samples of ``record``."""
    features = record.get("features", {}).get(PENULTIMATE)
    if features is None:
        raise UserError(f"the {record['dataset']} file holds no penultimate features; track it again")
    if features.shape[1] != fit.num_features:
        raise UserError(f"the {record['dataset']} file's penultimate features have {features.shape[1]} dimensions, "
                        f"the training file's {fit.num_features}; track both with the same model")
    return {name: np.concatenate([baseline.values(features[start:start + _BLOCK])
                                  for start in range(0, len(features), _BLOCK)])
            for name, baseline in fit.baselines.items()}
