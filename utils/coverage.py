"""NAC-UE's coverage: per-neuron histograms of the ID training images' neuron states, and each sample's score.

Liu et al., ICLR 2024 (official code: BierOne/ood_coverage, ``openood/postprocessors/nac/coverage.py``,
``Estimator``). For each layer, with M thresholds t_0 < … < t_{M−1} (the official ``logspace(1e3, M)``: denser
near 0 and 1, where sigmoid states pile up, ending at 1.01 and 1.2), the training states of neuron c are
counted in the M − 1 bins [t_i, t_{i+1}); a bin's coverage is min(count / O, 1). A sample's layer score is the
mean over the layer's neurons of the coverage of the bin its state falls in (0 outside every bin); its score is
the mean over the layers (``single_ood_test``). Higher = more in-distribution.

The states come from the gradients files (``features``, one (N, C) array per layer, written by
``track_gradient.py --score nac_ue``); the fit reads the training split's file (``--dataset train``) alone.
"""
import hashlib
from dataclasses import dataclass

import numpy as np

from utils.detectors import nac_hyper
from utils.feature_baselines import PENULTIMATE


def thresholds(bins: int) -> np.ndarray:
    """The official ``logspace(base=1e3, num=M)``: M thresholds in [0, 1.2]."""
    half = bins // 2
    left = np.emath.logn(1e3, np.linspace(1, np.sqrt(1e3), num=half))
    edges = np.concatenate([left[:-1], (1 - left)[::-1]])
    edges[-1] += 1e-2
    return np.append(edges, 1.2)


@dataclass(frozen=True)
class CoverageFit:
    thresholds: dict[str, np.ndarray]  # per layer, (M,)
    coverage: dict[str, np.ndarray]    # per layer, (M − 1, C): min(count / O, 1) of each bin and neuron
    num_samples: int                   # training images it was fit on
    source: str                        # the sha256 of the training states it was fit on

    def describe(self) -> dict:
        return {"num_train": self.num_samples, "layers": list(self.coverage), "train_states_sha256": self.source,
                "bins": {name: len(edges) for name, edges in self.thresholds.items()}}


def _bins(edges: np.ndarray, states: np.ndarray) -> np.ndarray:
    """The bin i of each state with t_i <= s < t_{i+1}, (N, C); −1 where it is in none."""
    index = np.searchsorted(edges, states.astype(np.float64), side="right") - 1
    return np.where((index >= 0) & (index < len(edges) - 1), index, -1)


def fit_coverage(states: dict[str, np.ndarray], hyper: dict[str, tuple[int, int]]) -> CoverageFit:
    """The coverage of each layer's training ``states`` (N, C), with ``hyper[layer] = (M, O)``."""
    edges, coverage = {}, {}
    for name, values in states.items():
        bins, full = hyper[name]
        edges[name] = thresholds(bins)
        index = _bins(edges[name], values)
        counts = np.zeros((len(edges[name]) - 1, values.shape[1]))
        for neuron in range(values.shape[1]):
            inside = index[:, neuron] >= 0
            counts[:, neuron] = np.bincount(index[inside, neuron], minlength=len(counts))
        coverage[name] = np.minimum(counts / full, 1)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(v, np.float32).tobytes() for v in states.values()))
    return CoverageFit(edges, coverage, len(next(iter(states.values()))), digest.hexdigest())


def coverage_scores(fit: CoverageFit, states: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each layer's score (N,), the mean over its neurons of the coverage of each state's bin, and the mean over
    the layers (N,): the official NAC-UE score."""
    if list(states) != list(fit.coverage):
        raise ValueError(f"the states' layers {list(states)} are not the fit's {list(fit.coverage)}")
    layers = {}
    for name, values in states.items():
        index = _bins(fit.thresholds[name], values)
        covered = np.take_along_axis(fit.coverage[name], np.maximum(index, 0), axis=0)  # (N, C)
        layers[name] = np.where(index >= 0, covered, 0).mean(1)
    return layers, np.mean(list(layers.values()), axis=0)


def nac_states(record: dict) -> dict[str, np.ndarray]:
    """The neuron states of a NAC-UE file: its ``features`` but the penultimate features every file carries."""
    return {name: states for name, states in record["features"].items() if name != PENULTIMATE}


def fit_record(train_record: dict) -> CoverageFit:
    """The coverage fit on a training split's NAC-UE file (its ``features``), with the official (M, O) of each
    layer (``utils.detectors.nac_hyper``)."""
    states = nac_states(train_record)
    hyper = nac_hyper(train_record["model"]["num_classes"], len(states))
    return fit_coverage(states, {name: (bins, full) for name, (_, bins, full) in zip(states, hyper)})


def score_record(record: dict, fit: CoverageFit) -> dict:
    """``record`` with its rows replaced by the coverage scores of its states under ``fit``: ``layers`` each
    layer's score, ``total`` the official NAC-UE score, and ``fit`` what it was fit on."""
    layers, total = coverage_scores(fit, nac_states(record))
    return {**record, "layers": {name: v.astype(np.float32) for name, v in layers.items()},
            "total": total.astype(np.float32), "fit": fit.describe()}
