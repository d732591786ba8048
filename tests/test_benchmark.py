"""bench/benchmark.py: the summary over runs against numpy, the paired differences from MSP and the mean ranks
on a made-up table, and the smoke run end to end (slow)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import benchmark
from utils.detectors import SCORE_ALL
from utils.feature_baselines import FEATURE_BASELINES

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


def made_up_run(near: dict[str, float], far: dict[str, float]) -> dict:
    """One run of rows ``ce: <row>`` with these near and far AUROCs (FPR95 = 100 − AUROC)."""
    rows = {f"ce: {row}": {"model": "ce", "row": row, "kind": "baseline",
                           "near": {"AUROC": near[row], "FPR95": 100 - near[row]},
                           "far": {"AUROC": far[row], "FPR95": 100 - far[row]}} for row in near}
    return {"figures": {"rows": rows, "accuracy": dict.fromkeys(benchmark.MODELS, 90.0)}}


def test_paired_differences_from_msp_and_mean_ranks_tell_a_gap_from_the_spread():
    # runs 20 points apart; "KNN" is 2 above MSP in every run, "GEN" 6 above on average but below in one run
    near = [{"MSP": 70.0, "KNN": 72.0, "GEN": 80.0, "ViM": 60.0},
            {"MSP": 90.0, "KNN": 92.0, "GEN": 88.0, "ViM": 92.0},
            {"MSP": 80.0, "KNN": 82.0, "GEN": 90.0, "ViM": 80.0}]
    far = [{"MSP": 50.0, "KNN": 50.0, "GEN": 50.0, "ViM": 51.0}] * 3
    runs = [made_up_run(n, f) for n, f in zip(near, far)]
    summary = benchmark.summarise(runs)
    rows = summary["rows"]
    knn = rows["ce: KNN"]["near"]
    assert knn["AUROC"]["std"] == pytest.approx(10.0)  # the spread between runs
    assert (knn["vs_msp"]["mean"], knn["vs_msp"]["std"], knn["vs_msp"]["above"], knn["vs_msp"]["runs"]) == (
        pytest.approx(2.0), pytest.approx(0.0), 3, 3)  # the gap every run shows
    gen = rows["ce: GEN"]["near"]["vs_msp"]
    assert gen["values"] == pytest.approx([10.0, -2.0, 10.0]) and gen["above"] == 2
    assert gen["mean"] == pytest.approx(6.0) and gen["std"] == pytest.approx(np.std([10, -2, 10], ddof=1))
    assert rows["ce: MSP"]["near"]["vs_msp"]["mean"] == 0.0 and rows["ce: MSP"]["near"]["vs_msp"]["above"] == 0
    # ranks by AUROC, 1 the best: run 1 GEN, KNN, MSP, ViM; run 2 KNN = ViM (1.5), MSP, GEN; run 3 GEN, KNN, MSP = ViM
    assert rows["ce: GEN"]["near"]["rank"]["values"] == [1.0, 4.0, 1.0]
    assert rows["ce: KNN"]["near"]["rank"]["values"] == [2.0, 1.5, 2.0]
    assert rows["ce: ViM"]["near"]["rank"]["values"] == [4.0, 1.5, 3.5]
    assert rows["ce: MSP"]["near"]["rank"]["mean"] == pytest.approx((3 + 3 + 3.5) / 3)
    assert rows["ce: MSP"]["far"]["rank"]["values"] == [3.0] * 3  # three rows tied behind ViM: ranks 2, 3, 4
    assert [e["row"] for e in benchmark.ordered(summary, "near")] == ["GEN", "KNN", "MSP", "ViM"]
    # ties in the difference are broken by the mean rank
    tied = benchmark.summarise([made_up_run({"MSP": 70.0, "KNN": 72.0, "GEN": 72.0, "ViM": 71.0},
                                            {"MSP": 50.0, "KNN": 60.0, "GEN": 50.0, "ViM": 50.0})])
    tied["rows"]["ce: GEN"]["near"]["rank"]["mean"] = 1.0  # as if GEN ranked better on average
    assert [e["row"] for e in benchmark.ordered(tied, "near")][:2] == ["GEN", "KNN"]
    report = {"in_dataset": "digits", "command": "python bench/benchmark.py", "machine": "m", "wall_s": 60.0,
              "plan": {}, "runs": [{"in_dataset": "digits-012345", "seed": s} for s in (1, 2, 3)],
              "sets": {"near": ["heldout"], "far": ["gaussian"]}, "summary": summary}
    text = benchmark.markdown(report)
    assert "| ce | KNN | 18.00 ± 10.00 | 82.00 ± 10.00 | +2.00 ± 0.00 (3/3) | 1.8 |" in text
    assert text.index("| ce | GEN |") < text.index("| ce | KNN |") < text.index("| ce | ViM |")


@pytest.mark.slow  # about two minutes on two CPU cores: three tiny trainings and nine trackings
def test_quick_run_reports_every_detector_near_and_far(tmp_path):
    result = subprocess.run([sys.executable, "bench/benchmark.py", "--quick", f"--out={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["sets"] == {"near": ["heldout"], "far": ["blobs", "gaussian", "rademacher"]}
    rows = report["summary"]["rows"]
    expected = {f"{m}: {d}" for m in ("ce", "energy") for d in (*SCORE_ALL, *benchmark.BY_NAME)} | {"bce: original"}
    expected |= {f"{m}: {b}" for m in benchmark.MODELS for b in ("MSP", "Energy", *FEATURE_BASELINES)}
    assert expected <= set(rows)
    for entry in rows.values():
        for group in benchmark.GROUPS:
            assert 0 <= entry[group]["AUROC"]["mean"] <= 100 and entry[group]["AUROC"]["std"] == 0.0
            assert entry[group]["vs_msp"]["runs"] == 1 and 1 <= entry[group]["rank"]["mean"] <= len(rows)
    assert set(report["summary"]["accuracy"]) == set(benchmark.MODELS)
    text = (tmp_path / "benchmark.md").read_text()
    assert "threads" in text and "| ce | KNN |" in text and "Wall time" in text
