"""The rows fit on the in-distribution training file (``--dataset train``) alone: the ``combined`` row (a Gaussian
on the log per-layer norms, ``utils.combine``) and the feature baselines (``utils.feature_baselines``: Mahalanobis,
KNN, ReAct, ASH, SCALE, ViM, fDBD, GEN, RMDS); each fit once, then every set's values under it."""
import argparse

import numpy as np

from utils.combine import GaussianFit, combined_score, fit_gaussian
from utils.feature_baselines import HEAD_BASELINES, FeatureFit, feature_values, fit_features
from utils.metric_files import track_command
from utils.tracking import TRAIN_SPLIT


def combined_fit(args: argparse.Namespace, train_record: dict | None) -> GaussianFit | None:
    """The Gaussian of the ``combined`` row, fit on the training split's file alone (``utils.combine``), or
    None when ``--combine none`` or that file is missing."""
    if args.combine == "none" or train_record is None or len(train_record["layers"]) < 2:
        return None  # one row (ODIN, --layers last): nothing to combine
    fit = fit_gaussian(train_record, args.combine)
    print(f"'combined': a Gaussian ({args.combine} shrinkage {fit.shrinkage:.3f}) on the log per-layer norms of "
          f"{fit.num_samples} in-distribution training images.\n")
    return fit


def feature_fit(args: argparse.Namespace, train_record: dict | None) -> FeatureFit | None:
    """The feature baselines fit on the training split's penultimate features and head
    (``utils.feature_baselines``), or None, with a note, when that file is missing or holds no features; the
    baselines that need the head are left out, with a note, where the file stores none."""
    if train_record is None:
        return None
    fit = fit_features(train_record, args.knn_k)
    again = f"track it again with `{track_command(args, TRAIN_SPLIT)}`"
    if fit is None:
        print(f"No feature baselines (Mahalanobis, KNN, …): the training file holds no penultimate features "
              f"(tracked before they were stored); {again}.\n")
        return None
    fitted = fit.describe()
    print(f"Feature baselines fit on the penultimate features ({fit.num_features}) of {fit.num_samples} "
          f"in-distribution training images: {', '.join(fit.baselines)} (KNN k = {fitted['knn_k']}"
          + (f"; ReAct clip {fitted['react_threshold']:.4g}, the {fitted['react_percentile']}th percentile; ViM "
             f"dim {fitted['vim_dim']}, alpha {fitted['vim_alpha']:.4g}" if "ViM" in fit.baselines else "") + ").\n")
    missing = [name for name in HEAD_BASELINES if name not in fit.baselines]
    if missing:
        print(f"No {', '.join(missing)} rows: the training file stores no head (tracked before it was); {again}.\n")
    return fit


def distances(fit: GaussianFit | None, id_record: dict, ood_records: dict[str, dict]
              ) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """The ``combined`` row's raw values for each OOD set: the ID samples' Mahalanobis distances from ``fit``
    (computed once) and that set's; None for every set without a fit."""
    if fit is None:
        return dict.fromkeys(ood_records)
    id_distances = -combined_score(fit, id_record)
    return {dataset: (id_distances, -combined_score(fit, record)) for dataset, record in ood_records.items()}


def baseline_values(fit: FeatureFit | None, id_record: dict, ood_records: dict[str, dict]
                    ) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]] | None]:
    """Each feature baseline's ID and OOD raw values for each OOD set (the ID ones computed once); None for
    every set without a fit."""
    if fit is None:
        return dict.fromkeys(ood_records)
    id_values = feature_values(fit, id_record)
    return {dataset: {name: (id_values[name], values) for name, values in feature_values(fit, record).items()}
            for dataset, record in ood_records.items()}
