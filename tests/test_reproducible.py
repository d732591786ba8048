"""The same command twice gives the same model and the same gradient files (at the same thread count): what
lets a user on another machine, and the README, reproduce a table. Run in subprocesses, as a user would."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.detectors import DETECTORS, SCORE_ALL
from utils.gradients import CHECKPOINT_HASH_KEY, load_gradients

pytestmark = pytest.mark.slow  # four script runs: ~30 s on two CPU cores

ROOT = Path(__file__).resolve().parents[1]
SPLIT = "digits-0123"


def train_and_track(out: Path) -> None:
    roots = [f"--checkpoint-root={out / 'checkpoints'}", "--gpu=-1", f"--in-dataset={SPLIT}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (["train_energy.py", "--name=ce", "--lamb=0", "--aux-dataset=sample_photos", "--epochs=1",
                     "--limit=64", "--batch-size=16", "--oe-batch-size=16", "--lr=0.05", *roots],
                    ["track_gradient.py", "--name=ce", "--dataset=near", "--score=all", "--limit=12", *roots,
                     f"--gradient-root={out / 'gradients'}"]):
        result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def test_the_same_command_twice_gives_identical_checkpoints_and_gradient_files(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train_and_track(first)
    train_and_track(second)
    for checkpoint in ("epoch_1.pt", "last.pt"):
        a, b = (torch.load(out / "checkpoints" / SPLIT / "ce" / checkpoint, weights_only=False)["state_dict"]
                for out in (first, second))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    files = sorted(p.relative_to(first) for p in (first / "gradients").rglob("*.pkl"))
    # every detector's ID and heldout files, and the training file of each detector fit on it (NAC-UE)
    expected = 2 * len(SCORE_ALL) + sum(DETECTORS[name].fits_on_training for name in SCORE_ALL)
    assert len(files) == expected
    assert files == sorted(p.relative_to(second) for p in (second / "gradients").rglob("*.pkl"))
    for file in files:
        a, b = load_gradients(first / file), load_gradients(second / file)
        # the checkpoint path and hash differ (other folder; the log's wall times): every value must not
        for record in (a, b):
            record["model"] = {k: v for k, v in record["model"].items() if k not in ("checkpoint", CHECKPOINT_HASH_KEY)}
        assert same(a, b), file
