"""``utils.data.tinyimages``: 80M Tiny Images (Fortran-order bytes, the 1-based CIFAR exclusion list) and the
300K random images, on files written in those formats."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.test_data import SHARED_DATA, chw, damage, is_shift
from utils.data import (
    dataset_available,
    get_dataset,
)
from utils.data.tinyimages import TinyImages
from utils.errors import UnreadableFileError

# ---------------------------------------------------------------------------------------------- 80M Tiny Images


def write_tiny_images(root: Path, count: int, excluded_1_based: list[int] | None) -> np.ndarray:
    """``count`` random HWC images written as 80M Tiny Images does (Fortran order); returns them."""
    folder = root / "unlabeled_datasets" / "80M_Tiny_Images"
    folder.mkdir(parents=True)
    images = np.random.default_rng(5).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    (folder / "tiny_images.bin").write_bytes(b"".join(image.tobytes(order="F") for image in images))
    if excluded_1_based is not None:
        (folder / "80mn_cifar_idxs.txt").write_text("".join(f"{index}\n" for index in excluded_1_based))
    return images


def test_tiny_images_decoding_and_cifar_exclusion(tmp_path):
    # 1-based: the first, a duplicate, a run of two, the last, and one past the end of this small file.
    images = write_tiny_images(tmp_path, 10, [4, 1, 5, 4, 10, 79022063])
    kept = [1, 2, 5, 6, 7, 8]
    dataset = get_dataset("tinyimages", tmp_path)
    assert len(dataset) == len(kept)
    assert [dataset.file_index(index) for index in range(len(kept))] == kept
    for index, position in enumerate(kept):
        image, label = dataset[index]
        assert torch.equal(image, chw(images[position])) and label == -1
    with pytest.raises(IndexError):
        dataset[len(kept)]
    # The raw bytes of one image, read by hand: byte h + 32 w + 1024 c is pixel (h, w) of channel c.
    raw = np.frombuffer((tmp_path / "unlabeled_datasets/80M_Tiny_Images/tiny_images.bin").read_bytes(), np.uint8)
    assert raw[3072 + 7 + 32 * 2 + 1024 * 1] == images[1][7, 2, 1]

    augmented = get_dataset("tinyimages", tmp_path, train=True)
    assert all(is_shift(augmented[index][0], chw(images[kept[index]]), flips=True) for index in range(len(kept)))


def test_tiny_images_with_several_workers(tmp_path):
    images = write_tiny_images(tmp_path, 24, [3, 24])
    dataset = get_dataset("tinyimages", tmp_path)
    dataset[0]  # opens the map in this process; it must not travel to the workers
    assert pickle.loads(pickle.dumps(dataset))._array is None
    batches = list(DataLoader(dataset, batch_size=5, num_workers=2))
    loaded = torch.cat([batch for batch, _ in batches])
    kept = [index for index in range(24) if index not in (2, 23)]
    assert torch.equal(loaded, torch.stack([chw(images[index]) for index in kept]))
    assert torch.equal(torch.cat([labels for _, labels in batches]), torch.full((22,), -1))


def test_tiny_images_without_exclusion_list_warns(tmp_path):
    write_tiny_images(tmp_path, 4, None)
    with pytest.warns(UserWarning, match="NOT excluded"):
        dataset = get_dataset("tinyimages", tmp_path)
    assert len(dataset) == 4


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_tiny_images_truncated_or_foreign_file_is_a_user_error(tmp_path, how):
    write_tiny_images(tmp_path, 3, [1])  # cut in half: 1.5 images
    path = tmp_path / "unlabeled_datasets/80M_Tiny_Images/tiny_images.bin"
    damage(path, how)
    with pytest.raises(UnreadableFileError) as error:
        get_dataset("tinyimages", tmp_path)
    size = path.stat().st_size
    assert str(error.value).startswith(f"{path} is not a readable 80M Tiny Images file (its size, {size} bytes, "
                                       f"is not a positive multiple of 3072")
    assert "Copy it again" in str(error.value) and "--aux-dataset random300k" in str(error.value)


def test_tiny_images_foreign_exclusion_list_is_a_user_error(tmp_path):
    write_tiny_images(tmp_path, 2, [1])
    path = tmp_path / "unlabeled_datasets/80M_Tiny_Images/80mn_cifar_idxs.txt"
    path.write_text("<html>Not Found</html>\n")
    with pytest.raises(UnreadableFileError, match="not a readable list of image indices.*outlier-exposure") as error:
        get_dataset("tinyimages", tmp_path)
    assert str(path) in str(error.value)


@pytest.mark.skipif(not (SHARED_DATA / "80mn_cifar_idxs.txt").is_file(), reason="no copy of the real list")
def test_tiny_images_real_exclusion_list_on_full_length_file(tmp_path):
    path = tmp_path / "tiny_images.bin"
    with open(path, "wb") as file:  # sparse: the real file's length without its 227 GB
        file.truncate(79_302_017 * 3072)
    dataset = TinyImages(path, SHARED_DATA / "80mn_cifar_idxs.txt")
    excluded = np.unique(np.loadtxt(SHARED_DATA / "80mn_cifar_idxs.txt", dtype=np.int64)) - 1
    assert len(dataset) == 79_302_017 - len(excluded) == 79_302_017 - 132_409
    probes = np.concatenate([np.arange(40_000), excluded - np.arange(len(excluded)), [len(dataset) - 1]])
    positions = np.array([dataset.file_index(int(index)) for index in probes[::97]])
    assert not np.isin(positions, excluded).any()
    assert np.array_equal(positions - np.searchsorted(excluded, positions), probes[::97])
    assert dataset[len(dataset) - 1][0].shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------- 300K random images


def test_random300k(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "unlabeled_datasets" / "300K_random_images.npy"
    path.parent.mkdir(parents=True)
    np.save(path, images)
    assert dataset_available("random300k", tmp_path)
    dataset = get_dataset("random300k", tmp_path)
    assert len(dataset) == 7
    assert all(torch.equal(dataset[index][0], chw(images[index])) and dataset[index][1] == -1 for index in range(7))
    assert pickle.loads(pickle.dumps(dataset))._array is None
    assert is_shift(get_dataset("random300k", tmp_path, train=True)[3][0], chw(images[3]), flips=True)
    np.save(path, images.astype(np.float32))
    with pytest.raises(UnreadableFileError, match="uint8"):
        get_dataset("random300k", tmp_path)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_random300k_truncated_or_foreign_file_is_a_user_error(tmp_path, how):
    path = tmp_path / "unlabeled_datasets" / "300K_random_images.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.zeros((50, 32, 32, 3), np.uint8))
    damage(path, how)
    with pytest.raises(UnreadableFileError) as error:
        get_dataset("random300k", tmp_path)
    assert str(error.value).startswith(f"{path} is not a readable .npy array (ValueError: ")
    assert "https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy" in str(error.value)


