"""``utils.data``'s registry: names, respellings, errors for unknown names and missing files; and the helpers the
loaders' tests share (each loader is tested on small files written in its real format in ``test_<module>.py``)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from utils.data import (
    AUX_DATASETS,
    IN_DATASETS,
    NORMALIZATION,
    NUM_CLASSES,
    OOD_DATASETS,
    check_dataset_name,
    dataset_available,
    get_dataset,
)
from utils.errors import DataNotFoundError, UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def chw(hwc: np.ndarray) -> torch.Tensor:
    """The tensor ``ToTensor`` makes of an HWC uint8 array."""
    return torch.from_numpy(hwc.transpose(2, 0, 1).astype(np.float32)) / 255


def is_shift(augmented: torch.Tensor, image: torch.Tensor, flips: bool) -> bool:
    """Whether ``augmented`` is a RandomCrop(32, padding=4) of ``image`` (or of its mirror image if ``flips``)."""
    for candidate in [image, image.flip(-1)] if flips else [image]:
        padded = F.pad(candidate, (4, 4, 4, 4))
        if any(torch.equal(padded[:, y:y + 32, x:x + 32], augmented) for y in range(9) for x in range(9)):
            return True
    return False


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def damage(path: Path, how: str) -> None:
    """Rewrite ``path`` as a file cut in half, or as text that is no such file at all."""
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2] if how == "truncated" else b"not this kind of file\n" * 40)

# ---------------------------------------------------------------------------------------------- names


def test_names_and_constants():
    assert IN_DATASETS == ("CIFAR-10", "CIFAR-100", "digits", "ImageNet")
    assert OOD_DATASETS == ("SVHN", "dtd", "places365", "LSUN", "LSUN_resize", "iSUN", "gaussian", "rademacher",
                            "blobs")
    assert AUX_DATASETS == ("tinyimages", "random300k", "sample_photos")
    assert NUM_CLASSES == {"CIFAR-10": 10, "CIFAR-100": 100, "digits": 10, "ImageNet": 1000}
    assert set(NORMALIZATION) == set(IN_DATASETS)
    assert NORMALIZATION["CIFAR-10"] == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert NORMALIZATION["CIFAR-100"] == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError) as error:
        get_dataset("LSUN-C")
    assert all(name in str(error.value) for name in IN_DATASETS + OOD_DATASETS + AUX_DATASETS)
    with pytest.raises(UserError):
        dataset_available("cifar10")


def test_check_dataset_name_respells_or_lists_the_known_ones():
    assert check_dataset_name("Gaussian") == "gaussian"
    assert check_dataset_name("cifar10") == "CIFAR-10" and check_dataset_name("CIFAR_100") == "CIFAR-100"
    assert check_dataset_name("lsun-resize") == "LSUN_resize" and check_dataset_name("LSUN") == "LSUN"
    assert all(check_dataset_name(name) == name for name in IN_DATASETS + OOD_DATASETS + AUX_DATASETS)
    with pytest.raises(UserError) as error:
        check_dataset_name("Gausian")
    assert str(error.value).startswith("unknown data set 'Gausian'. Known: in-distribution CIFAR-10, CIFAR-100, "
                                       "digits, ImageNet; OOD "
                                       "SVHN, dtd, places365, LSUN, LSUN_resize, iSUN, gaussian, ")
    with pytest.raises(UserError, match="data set 'Gaussian' is spelt 'gaussian'"):
        get_dataset("Gaussian")


def test_bad_options_and_ood_training_split_are_user_errors():
    with pytest.raises(UserError, match="num_samples, seed"):
        get_dataset("gaussian", size=3)
    with pytest.raises(UserError, match="its options: augment"):
        get_dataset("digits", seed=1)
    with pytest.raises(UserError, match="OOD test set"):
        get_dataset("rademacher", train=True)


def test_the_training_split_without_augmentation_is_deterministic():
    augmented, plain = get_dataset("digits", train=True), get_dataset("digits", train=True, augment=False)
    torch.manual_seed(0)
    assert not all(torch.equal(augmented[i][0], plain[i][0]) for i in range(8))  # random crops move them
    assert all(torch.equal(plain[i][0], plain[i][0]) for i in range(8))
    assert [plain[i][1] for i in range(8)] == [augmented[i][1] for i in range(8)]


def test_missing_files_name_the_path(tmp_path):
    expected = {"SVHN": "ood_datasets/svhn/selected_test_32x32.mat", "dtd": "ood_datasets/dtd/images",
                "places365": "ood_datasets/places365/places365_test_list.txt", "LSUN": "ood_datasets/LSUN",
                "LSUN_resize": "ood_datasets/LSUN_resize", "iSUN": "ood_datasets/iSUN",
                "tinyimages": "unlabeled_datasets/80M_Tiny_Images/tiny_images.bin",
                "random300k": "unlabeled_datasets/300K_random_images.npy"}
    for name, path in expected.items():
        assert not dataset_available(name, tmp_path)
        with pytest.raises(DataNotFoundError) as error:
            get_dataset(name, tmp_path)
        assert str(tmp_path / path) in str(error.value)
        assert "http" in str(error.value), name
    for name in ("digits", "gaussian", "rademacher", "blobs", "sample_photos"):
        assert dataset_available(name, tmp_path)
