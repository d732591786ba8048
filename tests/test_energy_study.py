"""bench/energy_recipe_study.py --quick: every recipe runs the real training for the same number of steps
and gets its energies and OOD metrics."""
import json
import sys
from pathlib import Path

import pytest
from torchvision.datasets import CIFAR10

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import energy_recipe_study  # noqa: E402


@pytest.mark.slow
def test_quick_study_compares_every_recipe_at_equal_steps(tmp_path, capsys):
    energy_recipe_study.main(["--quick", f"--out={tmp_path}"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(energy_recipe_study.recipes(4))
    assert {run["steps"] for runs in results.values() for run in runs} == {4 * 2}  # 64 images, batches of 32
    for label, (run,) in results.items():
        assert run["epochs"] == 4 and set(run["ood"]) == {"gaussian", "rademacher", "blobs"}
        assert 0 <= run["AUROC"] <= 100 and 0 <= run["FPR95"] <= 100
        assert ("energy_reg" in run["log"][-1]) == (label != "CE alone"), label
    finetune = results["CE, then fine-tune"][0]["log"]
    assert [row["lr"] for row in finetune][-1] == 0.001  # the fine-tuning stage: the paper's lr
    table = capsys.readouterr().out
    assert table.count("\n| ") == len(results) + 1 and "default" in table


@pytest.mark.slow
def test_quick_study_through_the_cifar_loaders(tmp_path, capsys):
    with pytest.MonkeyPatch.context() as patch:  # the study points torchvision's md5 table at its files
        for attribute in ("train_list", "test_list", "meta"):
            patch.setattr(CIFAR10, attribute, getattr(CIFAR10, attribute))
        energy_recipe_study.main(["--quick", "--cifar-path", f"--out={tmp_path}"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 3 and {run["steps"] for runs in results.values() for run in runs} == {4}
    assert (tmp_path / "checkpoints" / "CIFAR-10").is_dir()
    assert "CIFAR-10 loader" in capsys.readouterr().out
