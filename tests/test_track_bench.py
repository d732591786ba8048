"""bench/track_bench.py, the speed figures of docs/speed.md, run as a person would run it on a few images, so that it
cannot rot: every rate is reported, vmap computes the engine's values, and ``--paths`` marks one path a line."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def track_bench(*args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "track_bench.py"), *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_a_one_row_run_reports_every_rate_and_vmap_agrees_with_the_engine():
    out = track_bench("--arch", "resnet20", "--score", "original", "--n", "4", "--sweep")
    for method in ("loop", "engine", "ceiling", "vmap"):
        assert float(re.search(rf"^{method} +([\d.]+) images/s", out, re.M).group(1)) > 0, out
    assert float(re.search(r"from the engine's: ([\d.e+-]+)\)", out).group(1)) < 1e-4, out
    sweep = re.findall(r"^engine at +(\d+) images a batch .*?([\d.]+) images/s +ceiling +([\d.]+)", out, re.M)
    assert [int(batch) for batch, *_ in sweep] == [32, 64, 128, 256], out
    assert all(float(engine) > 0 and float(ceiling) > 0 for _, engine, ceiling in sweep), out


@pytest.mark.slow
def test_the_paths_report_times_every_path_and_marks_the_one_the_rule_takes():
    lines = [line for line in track_bench("--arch", "resnet20", "--paths", "--n", "2").splitlines() if " R=" in line]
    assert len(lines) == 12, lines  # six distinct convolutions of ResNet-20, R = 1 and 10
    for line in lines:
        entries = line.split(" R=")[1].split(maxsplit=1)[1].split(" | ")  # "name  microseconds", ...
        timed = {name: float(us) for name, us in (entry.rsplit(maxsplit=1) for entry in entries)}
        assert {name.rstrip("*") for name in timed} == {"weight grad", "explicit", "grouped", "gram", "input_gram"}
        assert sum(name.endswith("*") for name in timed) == 1 and all(us > 0 for us in timed.values()), line


@pytest.mark.slow
def test_an_imagenet_run_reports_the_last_layer_rates():
    out = track_bench("--arch", "resnet50", "--size", "64", "--classes", "1000", "--score", "gradnorm", "--layers",
                      "last", "--n", "2", "--batch-size", "2")
    for method in ("forward", "--layers last", "official GradNorm", "OpenOOD GradNorm"):
        assert float(re.search(rf"^{method} +([\d.]+) images/s", out, re.M).group(1)) > 0, out
