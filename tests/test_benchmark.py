"""bench/benchmark.py: the summary over runs against numpy, and the smoke run end to end (slow)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import benchmark
from utils.detectors import SCORE_ALL

ROOT = Path(__file__).resolve().parents[1]


def fake_run(rng: np.random.Generator) -> dict:
    rows = {}
    for model in benchmark.MODELS:
        for row in ("MSP", "KNN"):
            rows[f"{model}: {row}"] = {"model": model, "row": row, "kind": "baseline",
                                       **{g: {"FPR95": rng.uniform(0, 100), "AUROC": rng.uniform(50, 100)}
                                          for g in benchmark.GROUPS}}
    return {"figures": {"rows": rows, "accuracy": {m: rng.uniform(90, 100) for m in benchmark.MODELS}}}


def test_summary_is_the_mean_and_sample_std_over_runs():
    rng = np.random.default_rng(0)
    runs = [fake_run(rng) for _ in range(3)]
    summary = benchmark.summarise(runs)
    values = [r["figures"]["rows"]["ce: KNN"]["near"]["AUROC"] for r in runs]
    stat = summary["rows"]["ce: KNN"]["near"]["AUROC"]
    assert stat["mean"] == pytest.approx(sum(values) / 3)
    assert stat["std"] == pytest.approx(np.sqrt(sum((v - stat["mean"]) ** 2 for v in values) / 2))
    accuracies = [r["figures"]["accuracy"]["bce"] for r in runs]
    assert summary["accuracy"]["bce"]["mean"] == pytest.approx(np.mean(accuracies))
    assert benchmark.summarise(runs[:1])["rows"]["ce: MSP"]["far"]["FPR95"]["std"] == 0.0


@pytest.mark.slow  # about two minutes on two CPU cores: three tiny trainings and nine trackings
def test_quick_run_reports_every_detector_near_and_far(tmp_path):
    result = subprocess.run([sys.executable, "bench/benchmark.py", "--quick", f"--out={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["sets"] == {"near": ["heldout"], "far": ["blobs", "gaussian", "rademacher"]}
    rows = report["summary"]["rows"]
    expected = {f"{m}: {d}" for m in ("ce", "energy") for d in SCORE_ALL} | {"bce: original"}
    expected |= {f"{m}: {b}" for m in benchmark.MODELS for b in ("MSP", "Energy", "Mahalanobis", "KNN")}
    assert expected <= set(rows)
    for entry in rows.values():
        for group in benchmark.GROUPS:
            assert 0 <= entry[group]["AUROC"]["mean"] <= 100 and entry[group]["AUROC"]["std"] == 0.0
    assert set(report["summary"]["accuracy"]) == set(benchmark.MODELS)
    text = (tmp_path / "benchmark.md").read_text()
    assert "threads" in text and "| ce | KNN |" in text and "Wall time" in text
