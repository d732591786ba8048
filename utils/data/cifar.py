"""CIFAR-10 and CIFAR-100 through torchvision, in torchvision's layout under ``<data root>/cifar10`` and
``<data root>/cifar100`` (the layout of the ATOM / energy_ood scripts)."""
import shutil
from pathlib import Path

from torch.utils.data import Dataset

from utils.data.common import train_augmentation
from utils.errors import DataNotFoundError, UserError

FOLDERS = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100"}


def _class_and_folder(name: str) -> tuple[type, str]:
    """torchvision's data set class for ``name`` and its folder under the data root. torchvision is imported
    here, not at start-up: it costs seconds, and most runs read no CIFAR (docs/choices.md)."""
    from torchvision import datasets

    return {"CIFAR-10": datasets.CIFAR10, "CIFAR-100": datasets.CIFAR100}[name], FOLDERS[name]


def _missing_files(name: str, data_root: Path) -> list[Path]:
    cls, folder = _class_and_folder(name)
    base = data_root / folder / cls.base_folder
    files = [base / file for file, _ in cls.train_list + cls.test_list] + [base / cls.meta["filename"]]
    return [file for file in files if not file.is_file()]


def _layout(name: str, data_root: Path) -> str:
    cls, folder = _class_and_folder(name)
    return (f"Download {cls.url} and unpack it in {data_root / folder}, which gives "
            f"{data_root / folder / cls.base_folder}/ holding "
            f"{', '.join(file for file, _ in cls.train_list + cls.test_list)} and {cls.meta['filename']}.")


def locate(name: str, data_root: Path) -> None:
    """Raise ``DataNotFoundError`` unless every file torchvision reads is present (no checksums here)."""
    missing = _missing_files(name, data_root)
    if missing:
        raise DataNotFoundError(f"{name}: {missing[0]} not found. {_layout(name, data_root)}")


def build(name: str, data_root: Path, train: bool, *, augment: bool = True) -> Dataset:
    """torchvision's ``CIFAR10``/``CIFAR100``; downloaded only when files are missing.

    ``train=True`` augments with RandomCrop(32, padding=4) and RandomHorizontalFlip as in Outlier Exposure
    (``augment=False``: the training images as they are); ``train=False`` is ToTensor only. torchvision
    checks the md5 of every file it reads.
    """
    from torchvision import transforms

    cls, folder = _class_and_folder(name)
    steps = [transforms.ToTensor()] + ([train_augmentation()] if train and augment else [])
    download = bool(_missing_files(name, data_root))
    # The outermost folder a download would create; a failed one takes it away again, with what it wrote.
    target = data_root / folder
    created = next((path for path in (*reversed(target.parents), target) if not path.exists()), None)
    try:
        return cls(str(target), train=train, transform=transforms.Compose(steps), download=download)
    except (OSError, RuntimeError) as error:
        if download:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise DataNotFoundError(f"{name}: not found under {data_root / folder} and downloading it failed "
                                    f"({error}). {_layout(name, data_root)}") from error
        raise UserError(f"{name}: the files under {data_root / folder / cls.base_folder} failed torchvision's "
                        f"integrity check ({error}); delete that folder to download them again. "
                        f"{_layout(name, data_root)}") from error
