"""``utils.metrics`` against independent computations: threshold counting, pairwise comparison / Mann–Whitney U,
and average precision summed by hand."""
import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_curve

from utils.metrics import fpr_at_tpr, ood_metrics


def counting_fpr95(id_scores, ood_scores) -> float:
    """FPR at the highest threshold t (a score value) with mean(id ≥ t) ≥ 0.95, by counting."""
    for t in sorted(set(np.concatenate([id_scores, ood_scores])), reverse=True):
        if np.mean(id_scores >= t) >= 0.95:
            return float(np.mean(ood_scores >= t))
    raise AssertionError("unreachable: the lowest threshold keeps every ID sample")


def pairwise_auroc(id_scores, ood_scores) -> float:
    """P(id > ood) + ½ P(id = ood) over all pairs."""
    diff = np.subtract.outer(id_scores, ood_scores)
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def hand_average_precision(positive, negative) -> float:
    """Σ (R_k − R_{k−1}) P_k over the distinct thresholds, highest first."""
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(np.concatenate([positive, negative])), reverse=True):
        tp, fp = np.sum(positive >= t), np.sum(negative >= t)
        recall = tp / len(positive)
        ap += (recall - previous_recall) * tp / (tp + fp)
        previous_recall = recall
    return float(ap)


def random_cases():
    rng = np.random.default_rng(0)
    yield "continuous", rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    yield "heavy ties", rng.integers(0, 5, 400).astype(float), rng.integers(0, 4, 150).astype(float)
    yield "small", rng.normal(0.5, 1, 7), rng.normal(0, 1, 3)
    yield "float32 norms", rng.lognormal(0, 1, 250).astype(np.float32), rng.lognormal(0.5, 1, 250).astype(np.float32)


@pytest.mark.parametrize("name, id_scores, ood_scores", list(random_cases()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_ood_metrics_match_independent_computations(name, id_scores, ood_scores):
    m = ood_metrics(id_scores, ood_scores)
    id64, ood64 = id_scores.astype(np.float64), ood_scores.astype(np.float64)
    assert m["FPR95"] == pytest.approx(counting_fpr95(id64, ood64), abs=1e-12)
    assert m["AUROC"] == pytest.approx(pairwise_auroc(id64, ood64), abs=1e-12)
    u = mannwhitneyu(id64, ood64, alternative="two-sided").statistic
    assert m["AUROC"] == pytest.approx(u / (len(id64) * len(ood64)), abs=1e-12)
    assert m["AUPR_IN"] == pytest.approx(hand_average_precision(id64, ood64), abs=1e-12)
    assert m["AUPR_OUT"] == pytest.approx(hand_average_precision(-ood64, -id64), abs=1e-12)


def test_worked_example():
    # ranking (high to low): 0.9 ID, 0.8 ID, 0.7 OOD, 0.4 ID, 0.3 OOD
    m = ood_metrics([0.9, 0.8, 0.4], [0.7, 0.3])
    assert m["FPR95"] == pytest.approx(1 / 2)       # keeping all 3 ID (t = 0.4) accepts 0.7
    assert m["AUROC"] == pytest.approx(5 / 6)       # 5 of the 6 ID–OOD pairs are ordered correctly
    assert m["AUPR_IN"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert m["AUPR_OUT"] == pytest.approx((1 + 2 / 3) / 2)


def test_identical_distributions_give_chance():
    scores = np.random.default_rng(1).normal(size=500)
    m = ood_metrics(scores, scores.copy())
    assert m["AUROC"] == pytest.approx(0.5)
    assert m["FPR95"] == pytest.approx(0.95)         # the threshold that keeps 95% of ID keeps 95% of the copy
    constant = ood_metrics(np.ones(30), np.ones(10))
    assert constant == pytest.approx({"FPR95": 1.0, "AUROC": 0.5, "AUPR_IN": 0.75, "AUPR_OUT": 0.25})


def test_perfect_and_reversed_separation():
    assert ood_metrics([5, 6, 7], [1, 2]) == pytest.approx({"FPR95": 0, "AUROC": 1, "AUPR_IN": 1, "AUPR_OUT": 1})
    reversed_ = ood_metrics([1, 2], [5, 6, 7])
    assert reversed_["FPR95"] == 1 and reversed_["AUROC"] == 0


def test_fpr95_uses_every_threshold_not_drop_intermediate():
    # ROC points (FPR, TPR): (0, .90) at t=10, (.1, .95) at t=5, (.2, 1) at t=4: collinear, so the default
    # drop_intermediate=True removes the middle one, the very point where TPR reaches 95%.
    id_scores = np.array([10.0] * 18 + [5.0, 4.0])
    ood_scores = np.array([5.0, 4.0] + [1.0] * 8)
    assert ood_metrics(id_scores, ood_scores)["FPR95"] == pytest.approx(0.1) == counting_fpr95(id_scores, ood_scores)
    assert fpr_at_tpr(id_scores, ood_scores) == (pytest.approx(0.1), 5.0)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(20), np.zeros(10)], np.r_[id_scores, ood_scores])
    assert fpr[np.argmax(tpr >= 0.95)] == pytest.approx(0.2)


def test_orientation_conventions():
    rng = np.random.default_rng(2)
    id_scores, ood_scores = rng.normal(1, 1, 200), rng.normal(0, 1, 100)
    m = ood_metrics(id_scores, ood_scores)
    assert m["AUROC"] > 0.7                              # higher = in-distribution
    swapped = ood_metrics(ood_scores, id_scores)
    assert swapped["AUROC"] == pytest.approx(1 - m["AUROC"])
    # AUPR-Out is AUPR-In with the roles exchanged: OOD positive and higher = OOD
    assert ood_metrics(-ood_scores, -id_scores)["AUPR_IN"] == pytest.approx(m["AUPR_OUT"])
    # OpenOOD / pytorch-ood (OOD positive): the same AUROC, a different operating point for "FPR95"
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(200), np.ones(100)], -np.r_[id_scores, ood_scores],
                            drop_intermediate=False)
    assert fpr[np.argmax(tpr >= 0.95)] != pytest.approx(m["FPR95"])


@pytest.mark.parametrize("id_scores, ood_scores, message", [([], [1.0], "need ID and OOD"),
                                                            ([1.0], [], "need ID and OOD"),
                                                            ([1.0, np.nan], [0.0], "NaN")])
def test_bad_scores_are_refused(id_scores, ood_scores, message):
    with pytest.raises(ValueError, match=message):
        ood_metrics(id_scores, ood_scores)
