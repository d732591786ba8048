"""OOD-detection metrics and the evaluation protocols: FPR95, AUROC, AUPR-In, AUPR-Out from two arrays of
scores, and which OOD samples each evaluation draws.

Every score here is oriented so that **higher means more in-distribution**, and in-distribution (ID) is the
positive class (energy_ood's default; Outlier Exposure, and energy_ood with ``--out_as_pos``, take OOD as
positive); ``ood_metrics`` states the definitions. The per-layer result tables built from them are in
``utils.tables``.
"""
import zlib
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

METRICS = ("FPR95", "AUROC", "AUPR_IN", "AUPR_OUT")
OOD_POSITIVE_FPR = "FPR95_OOD_POS"  # OpenOOD's and OE's FPR95, OOD the positive class (``--ood-positive``)
OPENOOD_FPR = "FPR95_OPENOOD"  # the same as OpenOOD v1.5's evaluator computes it (``--benchmark=openood``)
PROTOCOLS = ("full", "energy_ood")  # every OOD sample once; energy_ood's and OE's 10 draws of a fifth


def _scores_and_labels(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if id_scores.size == 0 or ood_scores.size == 0:
        raise ValueError(f"need ID and OOD scores, got {id_scores.size} ID and {ood_scores.size} OOD")
    scores = np.concatenate([id_scores, ood_scores])
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    labels = np.concatenate([np.ones(id_scores.size), np.zeros(ood_scores.size)])
    return scores, labels


def roc(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, thresholds) at every distinct threshold, ID positive, thresholds decreasing."""
    scores, labels = _scores_and_labels(id_scores, ood_scores)
    return roc_curve(labels, scores, drop_intermediate=False)


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> tuple[float, float]:
    """(FPR, threshold) at the highest threshold whose TPR ≥ ``tpr`` (ID positive, higher = ID)."""
    fprs, tprs, thresholds = roc(id_scores, ood_scores)
    i = int(np.argmax(tprs >= tpr))  # TPR rises as the threshold falls: the first hit is the highest threshold
    return float(fprs[i]), float(thresholds[i])


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
    """FPR95, AUROC, AUPR_IN and AUPR_OUT as fractions in [0, 1]; ID is positive, higher score = more ID.

    A threshold t accepts a sample as ID when its score is ≥ t, so TPR(t) = #{ID ≥ t}/n_id (ID kept) and
    FPR(t) = #{OOD ≥ t}/n_ood (OOD wrongly accepted).

    * FPR95    — FPR(t*) at the highest threshold t* with TPR(t*) ≥ 0.95, searched over every distinct score
                 (``sklearn.metrics.roc_curve(..., drop_intermediate=False)``; the default
                 ``drop_intermediate=True`` removes collinear ROC points, which can skip t* when scores tie).
    * AUROC    — ``sklearn.metrics.roc_auc_score`` = P(s_id > s_ood) + ½·P(s_id = s_ood), the Mann–Whitney
                 U statistic divided by n_id·n_ood.
    * AUPR_IN  — ``sklearn.metrics.average_precision_score`` with ID positive: Σ_k (R_k − R_{k−1})·P_k over
                 the distinct thresholds in decreasing order (precision P_k, recall R_k), no interpolation.
    * AUPR_OUT — the same with OOD positive and the score negated.

    OpenOOD and pytorch-ood take **OOD as the positive class** instead: their "FPR@95TPR" is the fraction
    of ID samples flagged as OOD when 95% of the OOD samples are detected — a different operating point
    and in general a different number. AUROC is the same under both conventions; AUPR-In and AUPR-Out
    trade places.
    """
    scores, labels = _scores_and_labels(id_scores, ood_scores)
    return {"FPR95": fpr_at_tpr(id_scores, ood_scores)[0],
            "AUROC": float(roc_auc_score(labels, scores)),
            "AUPR_IN": float(average_precision_score(labels, scores)),
            "AUPR_OUT": float(average_precision_score(1 - labels, -scores))}


def fpr95_ood_positive(id_scores, ood_scores) -> float:
    """FPR95 with **OOD as the positive class** (OpenOOD's and Outlier Exposure's convention): the fraction of
    ID samples flagged as OOD at the highest threshold on the negated score that detects ≥ 95% of OOD."""
    return fpr_at_tpr(-np.asarray(ood_scores, np.float64), -np.asarray(id_scores, np.float64))[0]


def openood_fpr95(id_scores, ood_scores) -> float:
    """FPR@95 as OpenOOD v1.5's evaluator computes it (``openood/evaluators/metrics.py``): OOD is the positive
    class and the score is negated, the ROC curve is scikit-learn's with its default ``drop_intermediate=True``,
    and the FPR is that of the curve's first point whose TPR reaches 0.95.

    Where no two samples tie, this is ``fpr95_ood_positive``. Where they tie, runs of equal steps are collinear
    and scikit-learn drops their inner points, so the first point kept at TPR ≥ 0.95 can lie past the exact
    operating point, at a higher FPR (20 ID and 20 OOD samples on the same 20 values: 1.0 here, 0.95 there)."""
    scores, labels = _scores_and_labels(id_scores, ood_scores)
    fprs, tprs, _ = roc_curve(1 - labels, -scores)
    return float(fprs[np.argmax(tprs >= 0.95)])


@dataclass(frozen=True)
class Protocol:
    """How each OOD set is evaluated against the ID test set.

    * ``full`` (the default): every ID and every OOD sample, once.
    * ``energy_ood``: as energy_ood's and Outlier Exposure's ``test.py``: ``draws`` random subsets of each
      OOD set, each of ``num_id // 5`` samples (2,000 against CIFAR's 10,000 test images; all of a smaller
      set) drawn without replacement, against the whole ID set every time. A metric is the mean over the
      draws, with the population standard deviation (``np.std``, as their ``print_measures_with_std``).
      The draws of an OOD set come from a numpy Generator seeded with (``seed``, the set's name): the same
      for every row, detector and baseline, and independent of which other sets are evaluated.

    ``ood_positive`` adds the OOD-positive FPR95 (``fpr95_ood_positive``) as its own metric; ``openood`` adds
    it as OpenOOD's evaluator computes it (``openood_fpr95``).
    """
    name: str = "full"
    seed: int = 1
    draws: int = 10
    ood_positive: bool = False
    openood: bool = False

    def __post_init__(self):
        if self.name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.name!r}; known: {', '.join(PROTOCOLS)}")

    @property
    def metrics(self) -> tuple[str, ...]:
        return (*METRICS, *(OOD_POSITIVE_FPR,) * self.ood_positive, *(OPENOOD_FPR,) * self.openood)

    @property
    def drawn(self) -> bool:
        return self.name != "full"

    def subset_size(self, num_id: int, num_ood: int) -> int:
        """OOD samples per draw: a fifth of the ID set, or every OOD sample when there are fewer."""
        return min(max(num_id // 5, 1), num_ood)

    def subsets(self, num_id: int, num_ood: int, dataset: str) -> list[np.ndarray] | None:
        """The sorted OOD sample indices of each draw; None under ``full`` (every sample, once)."""
        if not self.drawn:
            return None
        rng = np.random.default_rng([self.seed, zlib.crc32(dataset.encode())])
        size = self.subset_size(num_id, num_ood)
        return [np.sort(rng.choice(num_ood, size, replace=False)) for _ in range(self.draws)]

    def evaluate(self, id_scores, ood_scores, subsets: list[np.ndarray] | None) -> dict:
        """The metrics in %; over draws, each one's mean, ``<metric>_std`` and every draw's value (``draws``)."""
        id_scores, ood_scores = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
        runs = [self._metrics(id_scores, ood_scores if idx is None else ood_scores[idx])
                for idx in subsets or [None]]
        values = {m: 100 * np.array([run[m] for run in runs]) for m in self.metrics}
        result = {m: float(v.mean()) for m, v in values.items()}
        if subsets is not None:
            result.update({f"{m}_std": float(v.std()) for m, v in values.items()})
            result["draws"] = {m: v.tolist() for m, v in values.items()}
        return result

    def _metrics(self, id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
        metrics = ood_metrics(id_scores, ood_scores)
        if self.ood_positive:
            metrics[OOD_POSITIVE_FPR] = fpr95_ood_positive(id_scores, ood_scores)
        if self.openood:
            metrics[OPENOOD_FPR] = openood_fpr95(id_scores, ood_scores)
        return metrics

    def describe(self, num_id: int, num_ood: int) -> dict:
        """The protocol as the JSON tables record it."""
        described = {"name": self.name, "ood_positive": self.ood_positive}
        if self.openood:
            described["openood"] = True
        if not self.drawn:
            return described
        return {**described, "draws": self.draws, "seed": self.seed,
                "ood_per_draw": self.subset_size(num_id, num_ood), "std": "population (ddof=0)"}

    def conventions(self) -> tuple[str, ...]:
        """The lines printed under ``CONVENTIONS`` for this protocol."""
        lines = ()
        if self.drawn:
            lines += (f"Protocol {self.name} (as energy_ood's and OE's test.py): {self.draws} draws (seed "
                      f"{self.seed}), each a random fifth of the ID set's size from every OOD set, without "
                      "replacement, against the whole ID set; metrics are mean ± population std over the draws.",)
        if self.ood_positive:
            lines += ("FPR95 (OOD+): OOD positive, as OpenOOD and OE: the fraction of ID flagged as OOD when 95% "
                      "of OOD is detected.",)
        if self.openood:
            lines += ("FPR@95 (OpenOOD): the same as OpenOOD v1.5's evaluator computes it (scikit-learn's ROC curve "
                      "with collinear points dropped: higher than FPR95 (OOD+) only where scores tie).",)
        return lines


FULL = Protocol()
