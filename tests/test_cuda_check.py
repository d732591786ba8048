"""bench/cuda_check.py, the prepared GPU check, run as a person would run it but on the CPU (``--device cpu
--quick``), so that it cannot rot while no GPU is at hand."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.detectors import DETECTORS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_quick_cpu_run_passes_every_check_and_writes_its_report(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_check.py"), "--device=cpu", "--quick",
                             f"--out={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=420)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().strip() in result.stdout

    sections = {section["name"]: section for section in report["sections"]}
    assert list(sections) == ["exactness", "tracking", "training", "epoch", "imagenet", "paths"]
    assert report["ok"] and all(s["ok"] and s["error"] is None and s["rows"] for s in sections.values())

    exactness = sections["exactness"]["rows"]
    assert {row["detector"] for row in exactness} == {name for name, d in DETECTORS.items() if not d.fit_first}
    for row in exactness:  # TF32 changes nothing on the CPU; a typical image is exact to float32 precision
        assert row["median"] < 1e-5 and row["labels agree"] == "4/4", row
        assert row["ok"] is (None if row["TF32"] == "on" else True), row
    for row in sections["tracking"]["rows"]:
        assert all(row[key] > 0 for key in ("loop", "engine", "ceiling", "engine ÷ vmap")), row
        assert row["vmap vs engine"] < 1e-4, row  # torch.func computes the same values
    assert all(row["images/s"] > 0 for row in sections["training"]["rows"])
    epoch, = sections["epoch"]["rows"]
    assert 0 < epoch["waiting for training data (s)"] < epoch["epoch (s, training + test accuracy)"]
    imagenet = sections["imagenet"]["rows"]
    assert all(row["images/s"] > 0 for row in imagenet[:-1]) and imagenet[-1]["ok"], imagenet
    paths = {row["path"]: row for row in sections["paths"]["rows"]}
    assert all(row["ok"] for name, row in paths.items() if name != "torchrun"), paths
    merging = paths["track_gradient.py --shard 1/2 (merges)"]["outputs"]
    assert "merged digits.pkl, gaussian.pkl: 16 samples each" in merging
