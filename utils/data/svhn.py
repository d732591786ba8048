"""SVHN as an OOD test set: the per-class subset of the test split that ``select_svhn_data.py`` writes.

The ``.mat`` layout is the SVHN site's (http://ufldl.stanford.edu/housenumbers/): ``X`` uint8 of shape
(32, 32, 3, N), ``y`` of shape (N, 1) with labels 1..10, where 10 is the digit 0.
"""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.data.common import NO_LABEL, not_found, to_tensor
from utils.errors import unreadable

SVHN_DIR = Path("ood_datasets/svhn")
TEST_FILE = SVHN_DIR / "test_32x32.mat"
SELECTED_FILE = SVHN_DIR / "selected_test_32x32.mat"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


def read_mat(path: Path, remedy: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of an SVHN ``.mat`` file, checked against the layout above; a file that is not one is an
    ``UnreadableFileError`` that names it and ends with ``remedy``, what to do."""
    try:
        import scipy.io  # imported where used: scipy costs time at start-up

        contents = scipy.io.loadmat(path)
    except Exception as error:  # a truncated or foreign file fails in many ways (OS-, Value-, IndexError …)
        raise unreadable(path, "SVHN .mat file", error, remedy) from None
    if "X" not in contents or "y" not in contents:
        raise unreadable(path, "SVHN .mat file", "it has no 'X' and 'y' arrays", remedy)
    images, labels = contents["X"], contents["y"]
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or labels.shape != (images.shape[3], 1):
        raise unreadable(path, "SVHN .mat file", f"expected X of shape (32, 32, 3, N) and y of shape (N, 1), "
                         f"got {images.shape} and {labels.shape}", remedy)
    return images, labels


def select_command(data_root: Path) -> str:
    """The command that writes the selected file under ``data_root``."""
    return "python select_svhn_data.py" + ("" if data_root == Path("datasets") else f" --data-root {data_root}")


def select_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every label, in file order (as ATOM's
    ``select_svhn_data.py``, which makes the 10,000-image SVHN test subset of the OOD literature)."""
    labels = np.asarray(labels).ravel()
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:per_class]] = True
    return np.flatnonzero(keep)


class SVHNSelected(Dataset):
    """The selected SVHN test images as CHW float tensors in [0, 1], label -1 (OOD)."""

    def __init__(self, path: Path, remedy: str):
        images, _ = read_mat(path, remedy)
        self.images = np.ascontiguousarray(images.transpose(3, 0, 1, 2))  # NHWC

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_tensor(self.images[index]), NO_LABEL


def locate(data_root: Path) -> Path:
    path = data_root / SELECTED_FILE
    if not path.is_file():
        raise not_found("SVHN", path, "It is the 10,000-image SVHN test subset (at most 1,000 per digit).",
                        f"Download test_32x32.mat from {SVHN_URL} into {data_root / SVHN_DIR}/ and run "
                        f"`{select_command(data_root)}` to write it.")
    return path


def build(data_root: Path) -> SVHNSelected:
    return SVHNSelected(locate(data_root), f"Write it again with `{select_command(data_root)}`.")
