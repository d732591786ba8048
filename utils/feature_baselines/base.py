"""What every feature baseline shares: the training data it is fit on, the model's head, and the unit's form.

A baseline is one class: ``name`` (its row in the tables, as its paper names it), ``paper``, ``score`` (the
score as the tables print it; −E(v) = logsumexp(W v + b), the negated energy of the head's logits on v),
``sign`` (+1: the value it returns is the score, higher = in-distribution; −1: it returns a distance, the
score is its negative), ``needs_head`` (whether it reads the head W, b), a classmethod ``fit(training)`` that
keeps what it needs of the ID **training** file, ``values(features)`` on any set's penultimate features, and
``describe()`` (what the fit chose, for the table's header and JSON).
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.special import logsumexp

PENULTIMATE = "penultimate"  # the record's features["penultimate"]: the head's input, (N, D)
HEAD = "head"                # the record's head: {"weight": (K, D), "bias": (K,)}, logits = W h + b


@dataclass(frozen=True)
class Head:
    """The model's last layer as a map of the penultimate features: logits = W h + b (float64)."""
    weight: np.ndarray  # (K, D)
    bias: np.ndarray    # (K,)

    @classmethod
    def of(cls, record: dict) -> "Head | None":
        """The head a gradients record stores (``HEAD``), or None for a file tracked before heads were stored."""
        head = record.get(HEAD)
        if head is None:
            return None
        return cls(np.asarray(head["weight"], np.float64), np.asarray(head["bias"], np.float64))

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weight.T + self.bias

    def energy_score(self, features: np.ndarray) -> np.ndarray:
        """−E = logsumexp(W h + b) of each row of ``features``: higher = in-distribution."""
        return logsumexp(self.logits(features), axis=1)


@dataclass(frozen=True)
class Training:
    """The ID training file's samples as the fits see them."""
    features: np.ndarray  # (N, D) float64
    labels: np.ndarray    # (N,), every one a class
    head: Head | None     # None: the file stores no head, so the baselines that need one are left out
    knn_k: int | None = None  # KNN's k (None: its default scaling)


class FeatureBaseline(ABC):
    name: ClassVar[str]
    paper: ClassVar[str]
    score: ClassVar[str]
    sign: ClassVar[int] = +1
    needs_head: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def fit(cls, training: Training) -> "FeatureBaseline":
        """The baseline fit on ``training`` (and its head, where ``needs_head``)."""

    @abstractmethod
    def values(self, features: np.ndarray) -> np.ndarray:
        """The raw value of each row of ``features`` (N, D): the score times ``sign``, (N,)."""

    def describe(self) -> dict:
        return {}


def kept_count(size: int, percentile: float) -> int:
    """How many of ``size`` activations ASH and SCALE keep at ``percentile``: the official
    ``n − int(np.round(n · p / 100))`` (NumPy's rounding, half to even), at least one."""
    return max(1, size - int(np.round(size * percentile / 100.0)))


def top_k_mask(features: np.ndarray, k: int) -> np.ndarray:
    """True at the ``k`` largest entries of each row (ties broken towards the lower index; the official
    ``torch.topk`` leaves them unspecified, and a tie changes nothing where the tied values are 0)."""
    order = np.argsort(-features, axis=1, kind="stable")[:, :k]
    mask = np.zeros(features.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def kept_ratio(features: np.ndarray, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """ASH's and SCALE's shared step: the mask of the top activations kept at ``percentile`` and the ratio
    r = s1 / s2 of each row's sum to its kept sum (r = 0, a factor e⁰ = 1, where the kept sum is 0: an
    all-zero row, whose logits are then the bias, as the official code's would be but for its 0/0)."""
    mask = top_k_mask(features, kept_count(features.shape[1], percentile))
    total, kept = features.sum(1), np.where(mask, features, 0.0).sum(1)
    ratio = np.divide(total, kept, out=np.zeros_like(total), where=kept != 0)
    return mask, ratio
