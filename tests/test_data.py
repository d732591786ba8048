"""Every loader of ``utils.data`` on small files written in the real formats."""
import hashlib
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10, CIFAR100

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
from utils.data.bundled import photo_pyramid
from utils.data.tinyimages import TinyImages
from utils.errors import DataNotFoundError, UnreadableFileError, UserError

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


# ---------------------------------------------------------------------------------------------- names


def test_names_and_constants():
    assert IN_DATASETS == ("CIFAR-10", "CIFAR-100", "digits")
    assert OOD_DATASETS == ("SVHN", "dtd", "places365", "LSUN", "LSUN_resize", "iSUN", "gaussian", "rademacher",
                            "blobs")
    assert AUX_DATASETS == ("tinyimages", "random300k", "sample_photos")
    assert NUM_CLASSES == {"CIFAR-10": 10, "CIFAR-100": 100, "digits": 10}
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
                                       "digits; OOD SVHN, dtd, places365, LSUN, LSUN_resize, iSUN, gaussian, ")
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


# ---------------------------------------------------------------------------------------------- CIFAR

CIFARS = {"CIFAR-10": (CIFAR10, "cifar10", "labels", "label_names"),
          "CIFAR-100": (CIFAR100, "cifar100", "fine_labels", "fine_label_names")}


def write_cifar(root: Path, name: str, monkeypatch, rng: np.random.Generator) -> dict:
    """One training and one test batch in the pickle format of the CIFAR site; torchvision's md5 table
    is pointed at these files. Returns {"train": (data, labels), "test": (data, labels)}."""
    cls, folder, label_key, names_key = CIFARS[name]
    base = root / folder / cls.base_folder
    base.mkdir(parents=True)
    classes = NUM_CLASSES[name]

    def dump(file: str, contents: dict) -> list[str]:
        (base / file).write_bytes(pickle.dumps(contents, protocol=2))
        return [file, hashlib.md5((base / file).read_bytes()).hexdigest()]

    written = {}
    for split, (file, _), count in (("train", cls.train_list[0], 5), ("test", cls.test_list[0], 3)):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=count).tolist()
        entry = dump(file, {"batch_label": split, "data": data, label_key: labels})
        monkeypatch.setattr(cls, f"{split}_list", [entry])
        written[split] = (data, labels)
    _, md5 = dump(cls.meta["filename"], {names_key: [f"class{k}" for k in range(classes)]})
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5})
    return written


@pytest.mark.parametrize("name", ["CIFAR-10", "CIFAR-100"])
def test_cifar_reads_torchvision_layout(tmp_path, monkeypatch, name):
    assert not dataset_available(name, tmp_path)
    written = write_cifar(tmp_path, name, monkeypatch, np.random.default_rng(0))
    assert dataset_available(name, tmp_path)
    for split, train in (("train", True), ("test", False)):
        data, labels = written[split]
        dataset = get_dataset(name, tmp_path, train=train)
        assert len(dataset) == len(labels)
        for index in range(len(labels)):
            image, label = dataset[index]
            expected = torch.from_numpy(data[index].reshape(3, 32, 32).astype(np.float32)) / 255
            assert image.dtype == torch.float32 and label == labels[index] and isinstance(label, int)
            if train:
                assert is_shift(image, expected, flips=True)
            else:
                assert torch.equal(image, expected)
    data, labels = written["train"]
    plain = get_dataset(name, tmp_path, train=True, augment=False)  # what --dataset train tracks
    for index in range(len(labels)):
        expected = torch.from_numpy(data[index].reshape(3, 32, 32).astype(np.float32)) / 255
        assert torch.equal(plain[index][0], expected) and plain[index][1] == labels[index]


def test_cifar_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("no network")
    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DataNotFoundError) as error:
        get_dataset("CIFAR-10", tmp_path)
    message = str(error.value)
    assert CIFAR10.url in message and str(tmp_path / "cifar10" / "cifar-10-batches-py") in message
    assert "no network" in message


@pytest.mark.parametrize("existing", ["nothing", "data root", "cifar10 folder"])
def test_cifar_failed_download_removes_only_the_folders_it_created(tmp_path, monkeypatch, existing):
    def partial_download(self):  # as torchvision's: make the folder, start writing the archive, fail
        Path(self.root).mkdir(parents=True, exist_ok=True)
        (Path(self.root) / CIFAR10.filename).write_bytes(b"the first bytes")
        raise URLError("connection reset")
    monkeypatch.setattr(CIFAR10, "download", partial_download)
    data_root = tmp_path / "datasets"
    if existing != "nothing":
        (data_root / "ood_datasets").mkdir(parents=True)
    if existing == "cifar10 folder":
        (data_root / "cifar10").mkdir()
    with pytest.raises(DataNotFoundError, match="connection reset"):
        get_dataset("CIFAR-10", data_root)
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert left == {"nothing": [], "data root": ["datasets", "datasets/ood_datasets"],
                    "cifar10 folder": ["datasets", "datasets/cifar10", "datasets/cifar10/cifar-10-python.tar.gz",
                                       "datasets/ood_datasets"]}[existing]


def test_cifar_corrupted_files_are_not_downloaded_over(tmp_path, monkeypatch):
    with monkeypatch.context() as patched:
        write_cifar(tmp_path, "CIFAR-10", patched, np.random.default_rng(0))
    # The real md5 table is back; the files written above do not match it.
    monkeypatch.setattr(CIFAR10, "train_list", CIFAR10.train_list[:1])
    with pytest.raises(UserError, match="integrity"):
        get_dataset("CIFAR-10", tmp_path)


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


def damage(path: Path, how: str) -> None:
    """Rewrite ``path`` as a file cut in half, or as text that is no such file at all."""
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2] if how == "truncated" else b"not this kind of file\n" * 40)


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


# ---------------------------------------------------------------------------------------------- generated sets


@pytest.mark.parametrize("name", ["gaussian", "rademacher", "blobs"])
def test_synthetic_sets_are_seeded(name):
    dataset = get_dataset(name)
    assert len(dataset) == 10_000 and len(get_dataset(name, num_samples=5)) == 5
    image, label = dataset[123]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == -1
    assert torch.equal(image, get_dataset(name)[123][0])
    assert not torch.equal(image, dataset[124][0])
    assert not torch.equal(image, get_dataset(name, seed=1)[123][0])
    with pytest.raises(IndexError):
        dataset[10_000]


def test_generated_sets_draw_each_image_from_its_own_seeded_generator():
    expected = np.clip(np.random.default_rng([3, 17]).normal(0.5, 0.25, size=(3, 32, 32)), 0, 1)
    assert torch.equal(get_dataset("gaussian", seed=3)[17][0], torch.from_numpy(expected.astype(np.float32)))
    rng = np.random.default_rng([3, 17])
    photo = photo_pyramid()[rng.integers(16)]
    top, left = rng.integers(photo.shape[0] - 31), rng.integers(photo.shape[1] - 31)
    assert torch.equal(get_dataset("sample_photos", seed=3)[17][0], chw(photo[top:top + 32, left:left + 32]))
    for name in ("blobs", "sample_photos"):
        with pytest.raises(UserError, match=f"{name}: num_samples must be positive"):
            get_dataset(name, num_samples=0)
        with pytest.raises(IndexError):
            get_dataset(name, num_samples=3)[3]


def test_synthetic_statistics():
    sample = lambda name: torch.stack([get_dataset(name)[index][0] for index in range(200)])  # noqa: E731
    gaussian = sample("gaussian")
    assert gaussian.min() >= 0 and gaussian.max() <= 1
    assert abs(gaussian.mean() - 0.5) < 0.005 and 0.23 < gaussian.std() < 0.25  # N(0.5, 0.25^2), clipped at 2 sigma
    assert 0.01 < (gaussian == 0).float().mean() < 0.04

    rademacher = sample("rademacher")
    assert set(rademacher.unique().tolist()) == {0.0, 1.0} and abs(rademacher.mean() - 0.5) < 0.01

    blobs = sample("blobs")
    nonzero = blobs[blobs > 0]
    assert nonzero.min() >= 0.75 and blobs.max() <= 1
    assert 0.1 < (blobs > 0).float().mean() < 0.7
    # OE blurs across the channel axis too, so the channels of a blob image are strongly correlated.
    assert np.corrcoef(blobs[:, 0].flatten(), blobs[:, 2].flatten())[0, 1] > 0.2


def test_digits():
    train, test = get_dataset("digits", train=True), get_dataset("digits")
    assert (len(train), len(test)) == (1297, 500)
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    labels = np.array([test[index][1] for index in range(len(test))])
    proportional = np.bincount(load_digits().target) * 500 / 1797
    assert np.all(np.abs(np.bincount(labels, minlength=10) - proportional) <= 1)  # stratified
    assert torch.equal(torch.stack([test[index][0] for index in range(20)]),
                       torch.stack([get_dataset("digits")[index][0] for index in range(20)]))

    images = train.images.expand(-1, 3, -1, -1)
    assert images.min() >= 0 and images.max() <= 1
    mean, std = NORMALIZATION["digits"]
    assert np.allclose(images.mean(dim=(0, 2, 3)), mean, atol=1e-4)
    assert np.allclose(images.std(dim=(0, 2, 3)), std, atol=1e-4)

    torch.manual_seed(0)
    for index in range(30):  # a crop, never a mirror image
        augmented, label = train[index]
        assert label == train.labels[index] and is_shift(augmented, images[index], flips=False)


def test_sample_photos():
    dataset = get_dataset("sample_photos", num_samples=50)
    assert len(dataset) == 50 and len(get_dataset("sample_photos")) == 10_000
    crops = torch.stack([dataset[index][0] for index in range(50)])
    assert crops.shape == (50, 3, 32, 32) and crops.min() >= 0 and crops.max() <= 1
    assert dataset[7][1] == -1
    assert torch.equal(crops, torch.stack([get_dataset("sample_photos", num_samples=50)[index][0]
                                           for index in range(50)]))
    assert len({crop.sum().item() for crop in crops}) == 50
    assert not torch.equal(crops[0], get_dataset("sample_photos", seed=1)[0][0])
    flipped = get_dataset("sample_photos", train=True)[0][0]
    assert torch.equal(flipped, crops[0]) or torch.equal(flipped, crops[0].flip(-1))
