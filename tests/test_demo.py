"""The demo end to end (``demo.py --quick``): real scripts, bundled data, numbers that mean something.

Slow for a test (about four minutes on two CPU cores): it trains three small models. The checks are
"better than chance", never equality with a constant.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from demo import IN_DATASET, QUICK_LIMIT
from utils.data import get_dataset, ood_test_set
from utils.detectors import SCORE_ALL, get_detector
from utils.feature_baselines import FEATURE_BASELINES
from utils.gradients import gradient_path, load_gradients

pytestmark = pytest.mark.slow  # minutes on two CPU cores: `pytest -m "not slow"` skips it

ROOT = Path(__file__).resolve().parents[1]
OOD_SETS = ("blobs", "gaussian", "heldout", "rademacher")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "demo.py", "--quick", f"--out={out}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (out / "stdout.txt").write_text(result.stdout)
    return out


def last_epoch(demo: Path, name: str) -> dict:
    with open(demo / "checkpoints" / IN_DATASET / name / "log.csv") as f:
        return {k: float(v) for k, v in list(csv.DictReader(f))[-1].items()}


def table(demo: Path, name: str, form: str, dataset: str) -> dict:
    rows = json.loads((demo / "results" / IN_DATASET / name / form / f"{dataset}.json").read_text())["rows"]
    return {row["row"]: row for row in rows}


def test_classifiers_beat_chance_on_digits(demo):
    for name in ("ce", "energy", "bce"):
        assert last_epoch(demo, name)["test_acc"] > 40, name  # chance: 1/6


def test_energy_training_separates_inlier_and_outlier_energies(demo):
    log = last_epoch(demo, "energy")
    assert log["energy_in"] < log["energy_out"] - 5
    assert table(demo, "energy", "norm_single-min", "average")["Energy"]["AUROC"] > 80


def test_gradient_files_cover_every_set_with_the_limit(demo):
    for score in (*SCORE_ALL, None):
        name = "energy" if score else "bce"
        for dataset in (IN_DATASET, *OOD_SETS):
            record = load_gradients(gradient_path(IN_DATASET, name, score, dataset, demo / "gradients"))
            size = len(get_dataset(dataset) if dataset == IN_DATASET else ood_test_set(dataset, IN_DATASET))
            assert record["num_samples"] == min(QUICK_LIMIT, size)
            if score == "odin":  # one row: the perturbed max softmax
                assert len(record["layers"]) == 1
            elif get_detector(score).has_weight_gradients:  # ResNet-20's 20 tracked weights
                assert len(record["layers"]) == 20
            assert record["features"]["penultimate"].shape == (record["num_samples"], 64)


def test_gradient_norms_tell_in_from_out_distribution(demo):
    for name, form in (("energy", "norm_single-min"), ("bce", "original_single")):
        aurocs = [table(demo, name, form, dataset)["total"]["AUROC"] for dataset in OOD_SETS]
        assert max(abs(auroc - 50) for auroc in aurocs) > 10, (name, aurocs)


def test_comparison_has_every_tracked_detector_and_the_baselines(demo):
    for name, detectors in (("energy", {"min", "max", "pred", "gradnorm", "exgrad", "odin", "gaia_a", "gaia_z",
                                        "nac_ue", "grood"}), ("bce", {"original"})):
        compared = json.loads((demo / "results" / IN_DATASET / name / "compare" / "comparison.json").read_text())
        assert {row["name"] for row in compared["rows"]} == detectors | {"MSP", "Energy", *FEATURE_BASELINES}
        assert compared["datasets"] == [*OOD_SETS, "average"]


def test_tables_are_printed(demo):
    stdout = (demo / "stdout.txt").read_text()
    assert stdout.count("vs the average over 4 OOD sets") == 2
    assert "demo finished" in stdout and "threads" in stdout.splitlines()[0]


def test_near_ood_separates_the_detectors(demo):
    """heldout (the unknown digits) is harder than the synthetic sets: no longer every row at 100 %."""
    compared = json.loads((demo / "results" / IN_DATASET / "energy" / "compare" / "comparison.json").read_text())
    aurocs = [row["results"]["heldout"]["AUROC"] for row in compared["rows"]]
    assert max(aurocs) > 60 and sum(auroc >= 99.9 for auroc in aurocs) < len(aurocs) / 2
