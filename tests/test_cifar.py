"""``utils.data.cifar``: CIFAR-10/100 read from files written in torchvision's own layout and format; failed
downloads and corrupt files are clear errors."""
import hashlib
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from tests.test_data import is_shift
from utils.data import (
    NUM_CLASSES,
    dataset_available,
    get_dataset,
)
from utils.errors import DataNotFoundError, UserError

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


