"""``select_svhn_data.py`` end to end on a generated ``test_32x32.mat``."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import select_svhn_data
from utils.data import get_dataset
from utils.runtime import run_script

SCRIPT = Path(__file__).resolve().parents[1] / "select_svhn_data.py"


def write_test_mat(root: Path, labels: list[int]) -> np.ndarray:
    """SVHN's layout: X uint8 (32, 32, 3, N), y uint8 (N, 1) with 10 for the digit 0. Returns X."""
    folder = root / "ood_datasets" / "svhn"
    folder.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
    scipy.io.savemat(folder / "test_32x32.mat", {"X": images, "y": np.array(labels, dtype=np.uint8)[:, None]})
    return images


def test_keeps_the_first_per_class_in_file_order(tmp_path, capsys):
    labels = np.random.default_rng(1).choice([10, 1, 2, 3], size=40, p=[0.4, 0.3, 0.25, 0.05]).tolist()
    images = write_test_mat(tmp_path, labels)
    select_svhn_data.main(["--data-root", str(tmp_path), "--per-class", "4"])

    counts, expected = {}, []  # ATOM's loop: keep a sample while its label has fewer than 4
    for index, label in enumerate(labels):
        if counts.get(label, 0) < 4:
            expected.append(index)
            counts[label] = counts.get(label, 0) + 1
    selected = scipy.io.loadmat(tmp_path / "ood_datasets" / "svhn" / "selected_test_32x32.mat")
    assert selected["X"].dtype == np.uint8 and selected["X"].shape == (32, 32, 3, len(expected))
    assert selected["y"].dtype == np.uint8 and selected["y"].shape == (len(expected), 1)
    assert np.array_equal(selected["X"], images[..., expected])
    assert selected["y"].ravel().tolist() == [labels[index] for index in expected]
    assert 10 in selected["y"]
    folder = tmp_path / "ood_datasets" / "svhn"
    assert sorted(path.name for path in folder.iterdir()) == ["selected_test_32x32.mat", "test_32x32.mat"]

    output = capsys.readouterr().out
    assert f"digit 0 (label 10): 4 of {labels.count(10)}" in output
    assert f"digit 3 (label 3): {min(4, labels.count(3))} of {labels.count(3)}" in output
    assert f"{len(expected)} of 40 images" in output

    dataset = get_dataset("SVHN", tmp_path)
    assert len(dataset) == len(expected)
    assert torch.equal(dataset[0][0], torch.from_numpy(images[..., expected[0]].transpose(2, 0, 1) / 255).float())


def test_seed_command_defaults(tmp_path, monkeypatch, capsys):
    """``python select_svhn_data.py`` as written: data root ``datasets``, 1,000 per class."""
    labels = [10] * 1003 + [1] * 2 + [10] * 2
    images = write_test_mat(tmp_path / "datasets", labels)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["select_svhn_data.py"])
    select_svhn_data.main()
    selected = scipy.io.loadmat(tmp_path / "datasets" / "ood_datasets" / "svhn" / "selected_test_32x32.mat")
    assert selected["y"].ravel().tolist() == [10] * 1000 + [1] * 2
    assert np.array_equal(selected["X"], images[..., list(range(1000)) + [1003, 1004]])
    assert "digit 0 (label 10): 1000 of 1005" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess: python and torch start afresh
def test_missing_input_is_one_clear_line(tmp_path):
    """Run as a script: a one-line error naming the file, exit status 2, no traceback."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--data-root", str(tmp_path)], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "ood_datasets" / "svhn" / "test_32x32.mat") in result.stderr
    assert "http://ufldl.stanford.edu/housenumbers/" in result.stderr


def test_truncated_input_is_one_clear_line(tmp_path, capsys):
    write_test_mat(tmp_path, [1, 2, 3] * 20)
    path = tmp_path / "ood_datasets" / "svhn" / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: select_svhn_data.main(["--data-root", str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not a readable SVHN .mat file") and err.count("\n") == 1
    assert f"Download it again from http://ufldl.stanford.edu/housenumbers/ into {path.parent}/." in err
    assert not (path.parent / "selected_test_32x32.mat").exists()
