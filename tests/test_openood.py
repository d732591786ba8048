"""OpenOOD v1.5's benchmark as it ships (``--benchmark=openood``): image lists and images written here in its
real layout (``benchmark_imglist/cifar10/*.txt``, ``images_classic/<set>/...``; PNG and JPEG; 28x28 grey as
MNIST, 32x32 as CIFAR and SVHN, 64x64 as Tiny ImageNet), read through the unchanged scripts, and held to
OpenOOD's own reading of them — its ``ImglistDataset`` and test transform, and its FPR@95 — written out here
independently."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics

import compute_gradient_metrics
import models
import track_gradient
import track_gradient_original
from bench import benchmark
from utils.checkpoints import save_checkpoint
from utils.data import (
    NORMALIZATION,
    check_dataset_name,
    dataset_available,
    ood_group,
    ood_test_set,
    resolve,
)
from utils.data import openood as openood_data
from utils.data.transforms import CIFAR
from utils.errors import DataNotFoundError, UserError
from utils.gradients import gradient_path, load_gradients
from utils.metrics import fpr95_ood_positive, openood_fpr95
from utils.runtime import run_script
from utils.tracking import TRAIN_SUBSET_SEED

# set: (list file, folder under images_classic, (width, height), PIL mode, extension, labels); None: a dict-label
# line
SETS = {
    "cifar10": ("test_cifar10.txt", "cifar10/test", (32, 32), "RGB", "png", (3, None, 7, 0)),
    "train": ("train_cifar10.txt", "cifar10/train", (32, 32), "RGB", "png", (1, 2, 3, 4, 5, 6)),
    "cifar100": ("test_cifar100.txt", "cifar100/test", (32, 32), "RGB", "png", (-1, -1, -1)),
    "tin": ("test_tin.txt", "tin/test", (64, 64), "RGB", "jpg", (-1, -1, -1)),
    "mnist": ("test_mnist.txt", "mnist/test", (28, 28), "L", "png", (-1, -1)),
    "svhn": ("test_svhn.txt", "svhn/test", (32, 32), "RGB", "png", (-1, -1, -1)),
    "texture": ("test_texture.txt", "texture/banded", (45, 38), "RGB", "jpg", (-1, -1)),  # resized and cropped
}  # places365 (far-OOD) is left out: a group with a missing list


def write_benchmark(root: Path, seed: int = 0) -> dict[str, list[tuple[Path, int]]]:
    """OpenOOD's CIFAR-10 files under ``root``; returns each list's (image, label as OpenOOD reads it)."""
    rng = np.random.default_rng(seed)
    lists = root / "benchmark_imglist" / "cifar10"
    lists.mkdir(parents=True)
    written = {}
    for name, (list_name, folder, size, mode, extension, labels) in SETS.items():
        lines, entries = [], []
        for i, label in enumerate(labels):
            relative = f"{folder}/{i:04d}.{extension}"  # names not in sorted order of the list: written reversed
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            path = root / "images_classic" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
            lines.append(f"{relative} " + ("{'label': 5, 'group': 1}" if label is None else str(label)))
            entries.append((path, 0 if label is None else label))  # OpenOOD: a dict line's label is 0
        (lists / list_name).write_text("\n".join(reversed(lines)) + "\n")
        written[name] = list(reversed(entries))
    return written


def openood_preprocess(path: Path, size: int = 32) -> torch.Tensor:
    """OpenOOD's test transform for a CIFAR model, written out: RGB, the shorter side resized to ``size``
    (bilinear), the centre ``size`` x ``size`` crop, values / 255, CHW."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((size if w <= h else int(w * scale), size if h <= w else int(h * scale)),
                             Image.BILINEAR)
        w, h = image.size
        left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
        array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def test_the_lists_are_read_as_openood_reads_them(tmp_path):
    written = write_benchmark(tmp_path)
    id_set = resolve("CIFAR-10", "CIFAR-10", "openood").build(tmp_path, CIFAR)
    assert [label for _, label in (id_set[i] for i in range(len(id_set)))] == [0, 7, 0, 3]  # reversed list order
    for name in ("cifar10", "cifar100", "tin", "mnist", "svhn", "texture"):
        dataset = id_set if name == "cifar10" else ood_test_set(name, "CIFAR-10", tmp_path, benchmark="openood")
        assert len(dataset) == len(written[name])
        for i, (path, label) in enumerate(written[name]):
            image, got = dataset[i]
            assert image.shape == (3, 32, 32) and got == (label if name == "cifar10" else -1)
            torch.testing.assert_close(image, openood_preprocess(path), rtol=0, atol=1e-6)


def test_the_registry_names_openoods_sets_and_groups(tmp_path):
    assert ood_group("near", "CIFAR-10", "openood") == ("cifar100", "tin")
    assert ood_group("far", "CIFAR-100", "openood") == ("mnist", "svhn", "texture", "places365")
    assert ood_group("near", "CIFAR-100", "openood") == ("cifar10", "tin")
    assert ood_group("all", "ImageNet", "openood") == ("ssb_hard", "ninco", "inaturalist", "textures", "openimage_o")
    assert ood_group("near", "CIFAR-10") == ("CIFAR-100",)  # the default benchmark unchanged
    assert check_dataset_name("TIN", "openood") == "tin" and check_dataset_name("cifar100") == "CIFAR-100"
    with pytest.raises(UserError, match="unknown OpenOOD set 'LSUN'"):
        check_dataset_name("LSUN", "openood")
    with pytest.raises(UserError, match="not a set of OpenOOD's cifar10 benchmark"):
        resolve("ninco", "CIFAR-10", "openood")
    assert resolve("cifar10", "CIFAR-10", "openood").name == "CIFAR-10"  # the ID test set, stored as today's
    assert resolve("train", "CIFAR-100", "openood").role == "train"
    # ImageNet's Textures live in images_classic/, its other sets in images_largescale/
    bench = openood_data.BENCHMARKS["ImageNet"]
    assert (bench.image_folder("textures"), bench.image_folder("ninco")) == ("images_classic", "images_largescale")
    write_benchmark(tmp_path)
    assert dataset_available("tin", tmp_path, "CIFAR-10", "openood")
    assert not dataset_available("places365", tmp_path, "CIFAR-10", "openood")


def test_a_missing_image_names_the_list_and_line(tmp_path):
    written = write_benchmark(tmp_path)
    written["svhn"][1][0].unlink()
    with pytest.raises(DataNotFoundError) as error:
        ood_test_set("svhn", "CIFAR-10", tmp_path, benchmark="openood")
    message = str(error.value)
    assert "test_svhn.txt, line 2" in message and "1 of the 3 images" in message and "\n" not in message


def test_a_bad_line_and_a_missing_list_are_one_paragraph(tmp_path):
    write_benchmark(tmp_path)
    with pytest.raises(DataNotFoundError, match="test_places365.txt not found"):
        ood_test_set("places365", "CIFAR-10", tmp_path, benchmark="openood")
    (tmp_path / "benchmark_imglist" / "cifar10" / "test_tin.txt").write_text("tin/test/0000.jpg\n")
    with pytest.raises(UserError, match="test_tin.txt, line 1"):
        ood_test_set("tin", "CIFAR-10", tmp_path, benchmark="openood")


def make_cifar10_checkpoint(root: Path, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    mean, std = NORMALIZATION["CIFAR-10"]
    model = models.get_model("resnet20", 10, mean, std)
    save_checkpoint(root / "CIFAR-10" / name, model,
                    {"name": name, "arch": "resnet20", "in_dataset": "CIFAR-10", "num_classes": 10, "mean": mean,
                     "std": std, "arch_kwargs": {}, "loss": "energy", "epoch": 1, "args": {}})
    return model.eval()


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_tracking_and_compare_under_openood(tmp_path, capsys):
    data, checkpoints, gradients, results = (tmp_path / d for d in ("data", "checkpoints", "gradients", "results"))
    written = write_benchmark(data)
    model = make_cifar10_checkpoint(checkpoints, "net")
    common = ["--name=net", "--in-dataset=CIFAR-10", "--benchmark=openood", "--gpu=-1", "--workers=0",
              f"--checkpoint-root={checkpoints}", f"--gradient-root={gradients}", f"--data-root={data}"]
    run_script(lambda: track_gradient.main([*common, "--dataset=all", "--score=pred"]))
    run_script(lambda: track_gradient.main([*common, "--dataset=train", "--score=pred", "--limit=4"]))
    out = capsys.readouterr().out
    assert "no data under" in out and "for places365; skipping them" in out

    # stored apart from today's sets: <gradient root>/openood/...; labels and MSP as OpenOOD's preprocessing
    # and a forward pass give them, in list order
    chosen = np.sort(np.random.default_rng(TRAIN_SUBSET_SEED).choice(6, 4, replace=False))
    for name, stored in (("cifar10", "CIFAR-10"), ("cifar100", "cifar100"), ("tin", "tin"), ("mnist", "mnist"),
                         ("svhn", "svhn"), ("texture", "texture"), ("train", "train")):
        record = load_gradients(gradient_path("CIFAR-10", "net", "pred", stored, gradients / "openood"))
        entries = [written[name][i] for i in chosen] if name == "train" else written[name]
        with torch.no_grad():
            logits = model(torch.stack([openood_preprocess(path) for path, _ in entries]))
        labels = [label for _, label in entries] if name in ("cifar10", "train") else [-1] * len(entries)
        np.testing.assert_array_equal(record["label"], labels)
        np.testing.assert_allclose(record["msp"], logits.softmax(1).amax(1).numpy(), rtol=1e-5)
    assert not gradient_path("CIFAR-10", "net", "pred", "tin", gradients).exists()

    run_script(lambda: compute_gradient_metrics.main(
        ["--name=net", "--in-dataset=CIFAR-10", "--benchmark=openood", "--compare", f"--gradient-root={gradients}",
         f"--results-root={results}", "--knn-k=1"]))
    out = capsys.readouterr().out
    assert "OOD is the positive class for FPR@95" in out and "ID is the positive class" in out
    folder = results / "openood" / "CIFAR-10" / "net" / "compare"
    ours, form = (json.loads((folder / f"{stem}.json").read_text()) for stem in ("comparison", "openood"))
    assert form["groups"] == {"near": ["cifar100", "tin"], "far": ["mnist", "svhn", "texture"]}
    assert form["columns"] == ["cifar100", "tin", "near", "mnist", "svhn", "texture", "far"]
    for entry, mine in zip(form["rows"], ours["rows"]):
        for group, sets in form["groups"].items():
            for metric in ("AUROC", "FPR95_OPENOOD"):
                assert entry["results"][group][metric] == pytest.approx(
                    np.mean([mine["results"][d][metric] for d in sets]))
    msp = next(entry for entry in form["rows"] if entry["name"] == "MSP")
    with torch.no_grad():
        id_msp = model(torch.stack([openood_preprocess(p) for p, _ in written["cifar10"]])).softmax(1).amax(1)
        tin_msp = model(torch.stack([openood_preprocess(p) for p, _ in written["tin"]])).softmax(1).amax(1)
    assert msp["results"]["tin"]["FPR95_OPENOOD"] == pytest.approx(
        100 * openoods_fpr95(id_msp.numpy(), tin_msp.numpy()), abs=1e-9)
    with open(folder / "openood.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["ood_dataset"] for row in rows} == set(form["columns"])
    with pytest.raises(SystemExit):  # OpenOOD's name of the ID set is the ID set
        compute_gradient_metrics.main(["--name=net", "--benchmark=openood", "--compare", "--dataset=cifar10"])
    assert "is the in-distribution set" in capsys.readouterr().err

    # the confounding label's script takes the same option, into its own folder
    run_script(lambda: track_gradient_original.main([*common, "--dataset=mnist", "--limit=1"]))
    record = load_gradients(gradient_path("CIFAR-10", "net", None, "mnist", gradients / "openood"))
    assert record["num_samples"] == 1 and record["label"].tolist() == [-1]


def test_the_benchmark_takes_openoods_lists_for_cifar_only():
    assert benchmark.parse_args(["--in-dataset=CIFAR-100", "--benchmark=openood"]).benchmark == "openood"
    with pytest.raises(UserError, match="CIFAR-10 and CIFAR-100, not digits"):
        benchmark.parse_args(["--benchmark=openood"])  # digits


def openoods_fpr95(id_conf: np.ndarray, ood_conf: np.ndarray) -> float:
    """``openood/evaluators/metrics.py``'s FPR@95, written out: OOD is the positive class, the score is the
    negated confidence, scikit-learn's ROC curve as it comes (intermediate points dropped), the FPR of the
    first point whose TPR reaches 0.95."""
    conf = np.concatenate([id_conf, ood_conf])
    ood_indicator = np.r_[np.zeros(len(id_conf)), np.ones(len(ood_conf))]
    fpr, tpr, _ = metrics.roc_curve(ood_indicator, -conf)
    return float(fpr[np.argmax(tpr >= 0.95)])


def test_openoods_fpr95_on_known_scores():
    # 20 OOD at 0..19 and 10 ID at 14.5..23.5: detecting 19 of 20 OOD (score <= 18) flags the ID at 14.5..17.5
    ood, id_ = np.arange(20.0), np.arange(10.0) + 14.5
    assert openood_fpr95(id_, ood) == pytest.approx(0.4) == pytest.approx(openoods_fpr95(id_, ood))
    assert fpr95_ood_positive(id_, ood) == pytest.approx(0.4)
    # ID and OOD on the same 20 values: every ROC step is diagonal, scikit-learn keeps only the ends, and
    # OpenOOD's first point at TPR >= 0.95 is (1, 1); the exact operating point is 0.95
    same = np.arange(20.0)
    assert openood_fpr95(same, same) == 1.0 == openoods_fpr95(same, same)
    assert fpr95_ood_positive(same, same) == pytest.approx(0.95)
    rng = np.random.default_rng(0)
    for _ in range(20):
        id_scores = rng.integers(0, 12, 300).astype(float)  # many ties
        ood_scores = rng.integers(0, 9, 200).astype(float)
        assert openood_fpr95(id_scores, ood_scores) == openoods_fpr95(id_scores, ood_scores)
        id_scores, ood_scores = rng.normal(1, 1, 300), rng.normal(0, 1.5, 120)  # no ties: the exact point
        assert openood_fpr95(id_scores, ood_scores) == pytest.approx(fpr95_ood_positive(id_scores, ood_scores))
