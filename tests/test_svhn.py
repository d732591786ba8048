"""``utils.data.svhn``: the selected SVHN test images read from a ``.mat`` written as scipy writes it."""

import numpy as np
import pytest
import scipy.io
import torch

from tests.test_data import chw, damage
from utils.data import (
    dataset_available,
    get_dataset,
)
from utils.errors import DataNotFoundError, UnreadableFileError

# ---------------------------------------------------------------------------------------------- SVHN


def test_svhn_reads_the_selected_mat(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(32, 32, 3, 6), dtype=np.uint8)
    path = tmp_path / "ood_datasets" / "svhn" / "selected_test_32x32.mat"
    path.parent.mkdir(parents=True)
    scipy.io.savemat(path, {"X": images, "y": np.array([[10], [1], [2], [10], [9], [5]], dtype=np.uint8)})
    assert dataset_available("SVHN", tmp_path)
    dataset = get_dataset("SVHN", tmp_path)
    assert len(dataset) == 6
    for index in range(6):
        image, label = dataset[index]
        assert torch.equal(image, chw(images[..., index])) and label == -1


def test_svhn_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        get_dataset("SVHN", tmp_path)
    message = str(error.value)
    assert "python select_svhn_data.py" in message and "test_32x32.mat" in message
    assert "http://ufldl.stanford.edu/housenumbers/" in message


@pytest.mark.parametrize("how", ["truncated", "garbage", "other arrays"])
def test_svhn_unreadable_mat_says_how_to_write_it_again(tmp_path, how):
    path = tmp_path / "ood_datasets" / "svhn" / "selected_test_32x32.mat"
    path.parent.mkdir(parents=True)
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 50), np.uint8), "y": np.ones((50, 1), np.uint8)})
    if how == "other arrays":
        scipy.io.savemat(path, {"images": np.zeros((32, 32, 3, 50), np.uint8)})
    else:
        damage(path, how)
    with pytest.raises(UnreadableFileError) as error:
        get_dataset("SVHN", tmp_path)
    message = str(error.value)
    assert message.startswith(f"{path} is not a readable SVHN .mat file")
    assert f"Write it again with `python select_svhn_data.py --data-root {tmp_path}`." in message


