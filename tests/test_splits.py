"""Near-OOD sets: digits open-set splits (``digits-<known>`` and ``heldout``) and the CIFAR pair, through the
registry and the unchanged scripts."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import models
import track_gradient
import train_original
from tests.test_cifar import write_cifar
from utils.checkpoints import load_model, save_checkpoint
from utils.data import (
    NORMALIZATION,
    NUM_CLASSES,
    OOD_DATASETS,
    check_dataset_name,
    check_in_dataset,
    dataset_available,
    get_dataset,
    ood_group,
    ood_test_set,
)
from utils.data.bundled import Digits
from utils.errors import UserError
from utils.gradients import gradient_path, load_gradients
from utils.runtime import run_script


def test_split_names_are_canonical_and_checked():
    assert check_dataset_name("digits-543210") == "digits-012345" == check_in_dataset("Digits-012345")
    assert check_dataset_name("HeldOut") == "heldout"
    assert NUM_CLASSES["digits-135"] == 3 and NORMALIZATION["digits-135"] == NORMALIZATION["digits"]
    for bad in ("digits-0", "digits-0123456789", "digits-112"):
        with pytest.raises(UserError):
            check_dataset_name(bad)
    with pytest.raises(UserError, match="not an in-distribution"):
        check_in_dataset("gaussian")
    with pytest.raises(UserError, match="spelt 'digits-012'"):
        get_dataset("digits-210")
    with pytest.raises(KeyError):
        NUM_CLASSES["SVHN"]


def test_split_holds_the_known_classes_remapped_and_heldout_the_others():
    target = load_digits().target
    known = (1, 3, 5, 8)
    for train in (False, True):
        full = Digits(train, augment=False)
        split = get_dataset("digits-1358", train=train, augment=False)
        expected = [(image, known.index(label)) for image, label in (full[i] for i in range(len(full)))
                    if label in known]
        assert len(split) == len(expected) == sum(np.isin(full.labels, known))
        for (image, label), (want_image, want_label) in zip((split[i] for i in range(len(split))), expected):
            assert torch.equal(image, want_image) and label == want_label
    test_size = len(Digits(False))
    held = ood_test_set("heldout", "digits-1358")
    labels = Digits(False).labels
    others = [i for i, label in enumerate(labels) if label not in known]
    assert len(held) == len(others) == test_size - len(get_dataset("digits-1358"))
    assert all(torch.equal(held[k][0], Digits(False)[i][0]) and held[k][1] == -1 for k, i in enumerate(others[:20]))
    assert len(target) == 1797  # the whole bundled set: the splits partition its test images


def test_groups_and_bad_pairings():
    assert ood_group("near", "digits-012345") == ("heldout",)
    assert ood_group("far", "digits-012345") == OOD_DATASETS
    assert ood_group("all", "CIFAR-10") == ("CIFAR-100", *OOD_DATASETS)
    assert ood_group("near", "CIFAR-100") == ("CIFAR-10",) and ood_group("near", "digits") == ()
    with pytest.raises(UserError, match="not an OOD set of CIFAR-10"):
        ood_test_set("heldout", "CIFAR-10")
    with pytest.raises(UserError, match="near-OOD set of a digits split"):
        get_dataset("heldout")
    assert dataset_available("heldout") and dataset_available("digits-01")


@pytest.mark.parametrize(("in_dataset", "near"), [("CIFAR-10", "CIFAR-100"), ("CIFAR-100", "CIFAR-10")])
def test_cifar_pair_is_near_ood_of_each_other(tmp_path, monkeypatch, in_dataset, near):
    written = {name: write_cifar(tmp_path, name, monkeypatch, np.random.default_rng(k))
               for k, name in enumerate(("CIFAR-10", "CIFAR-100"))}
    ood = ood_test_set(near, in_dataset, tmp_path)
    data, _ = written[near]["test"]
    assert len(ood) == len(data)
    for index in range(len(data)):
        image, label = ood[index]
        assert label == -1
        assert torch.equal(image, torch.from_numpy(data[index].reshape(3, 32, 32).astype(np.float32)) / 255)
    assert ood_group("near", in_dataset) == (near,) and dataset_available(near, tmp_path)


def test_scripts_train_and_track_a_split(tmp_path):
    """train_original.py and track_gradient.py take a split; checkpoints and files go under its name."""
    roots = [f"--checkpoint-root={tmp_path / 'c'}", f"--gradient-root={tmp_path / 'g'}", "--gpu=-1"]
    run_script(lambda: train_original.main(["--name=m", "--in-dataset=digits-210", "--epochs=1", "--limit=64",
                                            "--batch-size=32", "--amp=off", *roots[:1], "--gpu=-1"]))
    model, meta = load_model("digits-012", "m", root=tmp_path / "c")
    assert meta["num_classes"] == 3 and model.fc.out_features == 3
    run_script(lambda: track_gradient.main(["--name=m", "--in-dataset=digits-012", "--dataset=near", "--score=pred",
                                            "--limit=9", *roots]))
    held = load_gradients(gradient_path("digits-012", "m", "pred", "heldout", tmp_path / "g"))
    test = load_gradients(gradient_path("digits-012", "m", "pred", "digits-012", tmp_path / "g"))
    assert (held["label"] == -1).all() and held["num_samples"] == 9
    assert set(test["label"]) <= {0, 1, 2} and test["num_samples"] == 9


def test_tracking_a_cifar10_model_on_near_reads_cifar100_as_ood(tmp_path, monkeypatch):
    """--dataset near for a CIFAR-10 model: CIFAR-100's test images (files in torchvision's format), label -1."""
    written = {name: write_cifar(tmp_path / "data", name, monkeypatch, np.random.default_rng(k))
               for k, name in enumerate(("CIFAR-10", "CIFAR-100"))}
    mean, std = NORMALIZATION["CIFAR-10"]
    model = models.get_model("resnet20", 10, mean, std)
    save_checkpoint(tmp_path / "c" / "CIFAR-10" / "net", model,
                    {"name": "net", "arch": "resnet20", "in_dataset": "CIFAR-10", "num_classes": 10, "mean": mean,
                     "std": std, "arch_kwargs": {}, "loss": "energy", "epoch": 1, "args": {}})
    roots = [f"--data-root={tmp_path / 'data'}", f"--checkpoint-root={tmp_path / 'c'}",
             f"--gradient-root={tmp_path / 'g'}"]
    run_script(lambda: track_gradient.main(["--name=net", "--in-dataset=CIFAR-10", "--dataset=near", "--score=pred",
                                            "--gpu=-1", *roots]))
    near = load_gradients(gradient_path("CIFAR-10", "net", "pred", "CIFAR-100", tmp_path / "g"))
    test = load_gradients(gradient_path("CIFAR-10", "net", "pred", "CIFAR-10", tmp_path / "g"))
    assert near["num_samples"] == len(written["CIFAR-100"]["test"][1]) and (near["label"] == -1).all()
    np.testing.assert_array_equal(test["label"], written["CIFAR-10"]["test"][1])
