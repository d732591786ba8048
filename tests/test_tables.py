"""``utils.tables``: each detector's sign turns its norms into a score (higher = ID), and the average over OOD
sets keeps the metrics' mean and pools the raw statistics of every sample."""
import numpy as np
import pytest

from utils.metrics import ood_metrics
from utils.tables import average_table, detection_score, score_sign


@pytest.mark.parametrize("saved_form, score, sign", [("norm_single", "min", -1), ("norm_single", "pred", -1),
                                                     ("norm_single", "max", +1), ("original_single", None, +1),
                                                     ("norm_single", "gradnorm", +1), ("norm_single", "exgrad", -1)])
def test_detection_score_orientation(saved_form, score, sign):
    norms = np.array([0.5, 2.0, 3.0], dtype=np.float32)
    assert score_sign(saved_form, score) == sign
    np.testing.assert_array_equal(detection_score(norms, saved_form, score), sign * norms.astype(np.float64))
    np.testing.assert_array_equal(detection_score(norms, saved_form, score, flip=True), -sign * norms)


def test_small_id_norms_are_detected_with_min():
    rng = np.random.default_rng(3)
    id_norms, ood_norms = rng.lognormal(0, 0.5, 300), rng.lognormal(1, 0.5, 300)
    score = lambda v, **kw: detection_score(v, "norm_single", "min", **kw)  # noqa: E731
    assert ood_metrics(score(id_norms), score(ood_norms))["AUROC"] > 0.9
    assert ood_metrics(score(id_norms, flip=True), score(ood_norms, flip=True))["AUROC"] < 0.1


@pytest.mark.parametrize("saved_form, score", [("norm_single", None), ("norm_single", "median"),
                                               ("original_single", "min"), ("norm", "min")])
def test_unknown_orientation_is_refused(saved_form, score):
    with pytest.raises(ValueError, match="orientation"):
        detection_score([1.0], saved_form, score)


def test_average_table_pools_ood_statistics():
    rng = np.random.default_rng(4)
    ood_sets = [rng.normal(2, 1, 50), rng.normal(-1, 3, 150)]

    def table(name, ood):
        row = {"row": "total", "kind": "total", "score": "-norm", "FPR95": rng.random(), "AUROC": rng.random(),
               "AUPR_IN": 1.0, "AUPR_OUT": 2.0, "id_mean": 0.0, "id_std": 1.0,
               "ood_mean": float(ood.mean()), "ood_std": float(ood.std())}
        return {"in_dataset": "CIFAR-10", "model": {}, "saved_form": "norm_single", "score": "min", "flip": False,
                "gradient_score": "-norm", "num_id": 10, "metrics_in": "percent", "conventions": (),
                "ood_dataset": name, "num_ood": len(ood), "rows": [row]}

    tables = [table("A", ood_sets[0]), table("B", ood_sets[1])]
    average = average_table(tables)
    row = average["rows"][0]
    assert average["datasets"] == ["A", "B"] and average["num_ood"] == 200
    assert row["AUROC"] == pytest.approx(np.mean([t["rows"][0]["AUROC"] for t in tables]))
    assert row["ood_mean"] == pytest.approx(np.concatenate(ood_sets).mean())
    assert row["ood_std"] == pytest.approx(np.concatenate(ood_sets).std())
