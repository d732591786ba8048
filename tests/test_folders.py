"""``utils.data.folders``: image folders (LSUN, iSUN, dtd) and places365's list, on images the tests write."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_data import SHARED_DATA, chw, write_image
from utils.data import (
    dataset_available,
    get_dataset,
)
from utils.errors import DataNotFoundError

# ---------------------------------------------------------------------------------------------- image folders


def test_lsun_c_images_at_any_depth_resized_to_32(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "ood_datasets" / "LSUN" / "test"
    pictures = {name: rng.integers(0, 256, size=(36, 36, 3), dtype=np.uint8) for name in ("b.png", "a.png", "c.png")}
    for name, picture in pictures.items():
        write_image(folder / name, picture)
    (folder / "notes.txt").write_text("not an image")
    assert dataset_available("LSUN", tmp_path)
    dataset = get_dataset("LSUN", tmp_path)
    assert len(dataset) == 3
    for index, name in enumerate(sorted(pictures)):  # sorted by path
        image, label = dataset[index]
        # Resize(32) of a 36x36 image is PIL's bilinear resize to 32x32; CenterCrop(32) then keeps it whole.
        expected = np.asarray(Image.fromarray(pictures[name]).resize((32, 32), Image.BILINEAR))
        assert label == -1 and torch.equal(image, chw(expected))


def test_dtd_nested_classes_center_crop_and_rgb(tmp_path):
    rng = np.random.default_rng(3)
    images = tmp_path / "ood_datasets" / "dtd" / "images"
    wide = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)   # short side 32: Resize keeps it
    gray = rng.integers(0, 256, size=(40, 40), dtype=np.uint8)
    write_image(images / "banded" / "banded_0001.png", wide)
    write_image(images / "zigzagged" / "zigzagged_0001.png", gray)
    write_image(images / "zigzagged" / "zigzagged_0002.jpg", wide)
    dataset = get_dataset("dtd", tmp_path)
    assert len(dataset) == 3
    assert torch.equal(dataset[0][0], chw(wide[:, 8:40]))  # the 32x32 center of 32x48
    assert dataset[1][0].shape == (3, 32, 32) and torch.equal(dataset[1][0][0], dataset[1][0][2])
    assert dataset[2][0].shape == (3, 32, 32)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "ood_datasets" / "iSUN" / "iSUN_patches").mkdir(parents=True)
    assert not dataset_available("iSUN", tmp_path)
    with pytest.raises(DataNotFoundError, match="holds no images"):
        get_dataset("iSUN", tmp_path)
    write_image(tmp_path / "ood_datasets" / "iSUN" / "iSUN_patches" / "x.jpeg", np.zeros((32, 32, 3), np.uint8))
    assert len(get_dataset("iSUN", tmp_path)) == 1


def test_places365_follows_the_list(tmp_path):
    rng = np.random.default_rng(4)
    places = tmp_path / "ood_datasets" / "places365"
    names = ["Places365_test_00000013.jpg", "Places365_test_00000002.jpg", "Places365_test_00000007.jpg"]
    pictures = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in names]
    (places / "test_subset" / "test_256").mkdir(parents=True)
    (places / "places365_test_list.txt").write_text("\n".join(names) + "\n")
    for name, picture, folder in zip(names, pictures, ["test_subset", "test_subset", "test_subset/test_256"]):
        Image.fromarray(picture).save(places / folder / name, format="PNG")  # lossless, under the list's name
    dataset = get_dataset("places365", tmp_path)
    assert len(dataset) == 3
    for index, picture in enumerate(pictures):  # the list's order, found at any depth
        assert torch.equal(dataset[index][0], chw(picture))

    (places / "test_subset" / names[1]).unlink()
    assert not dataset_available("places365", tmp_path)
    with pytest.raises(DataNotFoundError) as error:
        get_dataset("places365", tmp_path)
    assert "1 of the 3" in str(error.value) and names[1] in str(error.value)


@pytest.mark.slow  # 10,000 files written
@pytest.mark.skipif(not (SHARED_DATA / "places365_test_list.txt").is_file(), reason="no copy of the real list")
def test_places365_real_list(tmp_path):
    places = tmp_path / "ood_datasets" / "places365"
    (places / "test_subset").mkdir(parents=True)
    names = (SHARED_DATA / "places365_test_list.txt").read_text().split()
    (places / "test_subset" / "places365_test_list.txt").write_text("\n".join(names))  # the original README's place
    for name in names:
        (places / "test_subset" / name).touch()
    assert len(get_dataset("places365", tmp_path)) == len(set(names)) == 10_000
    for name in names[:2]:
        (places / "test_subset" / name).unlink()
    with pytest.raises(DataNotFoundError, match="2 of the 10000"):
        get_dataset("places365", tmp_path)


