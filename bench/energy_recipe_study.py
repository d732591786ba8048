"""Energy training from scratch on the bundled digits: which recipe trains a classifier as accurate as
cross-entropy alone while meeting both energy margins (README, "Energy training from scratch").

Every recipe runs the real ``train_energy.py`` for the same number of optimizer steps (ResNet-20, batches
of 32 digits and 64 photo crops, lr 0.1 cosine, margins −25 / −7, λ 0.1):

* ``scratch, λ from step 1`` — the paper's loss from the first step (``--energy-warmup=0 --energy-ramp=0``);
* ``scratch, warm-up / ramp`` — cross-entropy alone for a fraction of the epochs (``--energy-warmup``), then
                               λ rising linearly over a fraction (``--energy-ramp``), then the paper's loss;
                               train_energy.py's default: no warm-up, a ramp over half of the epochs;
* ``CE, then fine-tune``     — cross-entropy (``--lamb=0``) for 3/4 of the epochs, then ``--pretrained``
                               fine-tuning with the paper's settings (lr 0.001) for the last 1/4;
* ``CE alone``               — ``--lamb=0`` throughout.

For each run: the test accuracy and the mean energies of the last epoch (digits, photo crops: what the
margins bound), and FPR95 / AUROC of the energy score (−E, ID positive) of the digits test set against
the first 1,000 images of each synthetic OOD set. Prints a table of means ± std over the seeds and writes
every run's numbers to ``<out>/results.json``.

    python bench/energy_recipe_study.py             # 3 seeds × 6 recipes × 20 epochs (820 steps each), ~1 hour
    python bench/energy_recipe_study.py --cifar-path --seeds 1   # through the CIFAR loaders, ~15 minutes
    python bench/energy_recipe_study.py --quick     # a smoke run on 64 images (what the test suite runs)
"""
import argparse
import csv
import hashlib
import json
import math
import pickle
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_energy  # noqa: E402
from utils.checkpoints import load_model  # noqa: E402
from utils.data import get_dataset  # noqa: E402
from utils.data.bundled import Digits  # noqa: E402
from utils.energy import energy_score  # noqa: E402
from utils.metrics import ood_metrics  # noqa: E402

OOD_SETS = ("gaussian", "rademacher", "blobs")


@dataclass
class Setup:
    in_dataset: str
    aux_dataset: str
    batch: int
    oe_batch: int
    data_root: Path


DIGITS = Setup("digits", "sample_photos", 32, 64, Path("datasets"))
CIFAR_PATH_RECIPES = ("scratch, λ from step 1", "scratch, default", "CE alone")


def recipes(epochs: int) -> dict[str, list[list[str]]]:
    """Recipe label → the train_energy.py arguments of each of its stages (``{ckpt}``: the previous stage's
    last.pt); every recipe trains ``epochs`` epochs in all."""
    finetune = max(1, epochs // 4)
    return {
        "scratch, λ from step 1": [[f"--epochs={epochs}", "--energy-warmup=0", "--energy-ramp=0"]],
        "scratch, warm-up 0.5, no ramp": [[f"--epochs={epochs}", "--energy-warmup=0.5", "--energy-ramp=0"]],
        "scratch, warm-up 0.25, ramp 0.5": [[f"--epochs={epochs}", "--energy-warmup=0.25", "--energy-ramp=0.5"]],
        f"scratch, default (warm-up {train_energy.WARMUP:g}, ramp {train_energy.RAMP:g})": [[f"--epochs={epochs}"]],
        "CE, then fine-tune": [[f"--epochs={epochs - finetune}", "--lamb=0"],
                               [f"--epochs={finetune}", "--pretrained={ckpt}"]],
        "CE alone": [[f"--epochs={epochs}", "--lamb=0"]],
    }


@torch.no_grad()
def energies(model: torch.nn.Module, dataset: torch.utils.data.Dataset, limit: int) -> torch.Tensor:
    subset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(subset, batch_size=250)
    return torch.cat([energy_score(model(images)) for images, _ in loader])


def write_cifar_format(data_root: Path) -> Setup:
    """The digits written as CIFAR-10 (torchvision's pickled batches; the training images spread over the
    five training files) and 10,000 photo crops as the 300K-random-images ``.npy``, under ``data_root``;
    torchvision's md5 table, in this process, is pointed at the files written. Returns the setup that trains
    on them with the seed command's batches (128 / 256)."""
    base = data_root / "cifar10" / CIFAR10.base_folder
    base.mkdir(parents=True, exist_ok=True)

    def dump(file: str, contents: dict) -> list[str]:
        (base / file).write_bytes(pickle.dumps(contents, protocol=2))
        return [file, hashlib.md5((base / file).read_bytes()).hexdigest()]

    def as_uint8(dataset) -> tuple[np.ndarray, list[int]]:
        images, labels = zip(*(dataset[index] for index in range(len(dataset))))
        return (torch.stack(images) * 255).round().to(torch.uint8).numpy(), list(labels)

    images, labels = as_uint8(get_dataset("digits", train=False))
    CIFAR10.test_list = [dump("test_batch", {"data": images.reshape(len(images), -1), "labels": labels})]
    train = Digits(train=True)
    train.augment = None  # the training split's images as they are; the CIFAR loader augments
    images, labels = as_uint8(train)
    CIFAR10.train_list = [dump(f"data_batch_{k + 1}", {"data": part.reshape(len(part), -1), "labels": part_labels})
                          for k, (part, part_labels) in enumerate(zip(np.array_split(images, 5),
                                                                      np.array_split(np.array(labels), 5)))]
    _, md5 = dump(CIFAR10.meta["filename"], {"label_names": [str(k) for k in range(10)]})
    CIFAR10.meta = {**CIFAR10.meta, "md5": md5}
    crops, _ = as_uint8(get_dataset("sample_photos", num_samples=10_000))
    (data_root / "unlabeled_datasets").mkdir(exist_ok=True)
    np.save(data_root / "unlabeled_datasets" / "300K_random_images.npy", crops.transpose(0, 2, 3, 1))
    return Setup("CIFAR-10", "random300k", 128, 256, data_root)


def run_recipe(stages: list[list[str]], name: str, seed: int, setup: Setup, out: Path, limit: int | None,
               ood_limit: int) -> dict:
    common = [f"--in-dataset={setup.in_dataset}", f"--aux-dataset={setup.aux_dataset}",
              f"--batch-size={setup.batch}", f"--oe-batch-size={setup.oe_batch}", f"--data-root={setup.data_root}",
              "--gpu=-1", "--workers=0", f"--seed={seed}", f"--checkpoint-root={out / 'checkpoints'}",
              "--overwrite", *([f"--limit={limit}"] if limit else [])]
    started, log, checkpoint = time.time(), [], ""
    for stage, argv in enumerate(stages):
        stage_name = f"{name}-s{seed}-{stage}"
        train_energy.main([f"--name={stage_name}", *common, *(a.format(ckpt=checkpoint) for a in argv)])
        directory = out / "checkpoints" / setup.in_dataset / stage_name
        with open(directory / "log.csv", newline="") as f:
            log += [{key: float(value) for key, value in row.items() if value} for row in csv.DictReader(f)]
        checkpoint = str(directory / "last.pt")

    model, _ = load_model(setup.in_dataset, stage_name, root=out / "checkpoints")
    score_in = -energies(model, get_dataset(setup.in_dataset, setup.data_root, train=False), ood_limit)
    ood = {}
    for dataset in OOD_SETS:
        metrics = ood_metrics(score_in.numpy(), -energies(model, get_dataset(dataset), ood_limit).numpy())
        ood[dataset] = {"FPR95": 100 * metrics["FPR95"], "AUROC": 100 * metrics["AUROC"]}
    train_images = min(limit or math.inf, len(get_dataset(setup.in_dataset, setup.data_root, train=True)))
    last = log[-1]
    return {"seed": seed, "epochs": len(log), "steps": len(log) * math.ceil(train_images / setup.batch),
            "test_acc": last["test_acc"], "energy_in": last["energy_in"], "energy_out": last["energy_out"],
            "FPR95": statistics.mean(v["FPR95"] for v in ood.values()),
            "AUROC": statistics.mean(v["AUROC"] for v in ood.values()),
            "ood": ood, "log": log, "seconds": time.time() - started}


def table(results: dict[str, list[dict]]) -> str:
    def cell(runs: list[dict], key: str, digits: int = 1) -> str:
        values = [run[key] for run in runs]
        spread = f" ± {statistics.pstdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{spread}"

    lines = ["| recipe | test acc. % | per seed | E(ID) | E(outliers) | FPR95 % ↓ | AUROC % ↑ |",
             "|---|---|---|---|---|---|---|"]
    for label, runs in results.items():
        per_seed = " / ".join(f"{run['test_acc']:.1f}" for run in runs)
        lines.append(f"| {label} | {cell(runs, 'test_acc')} | {per_seed} | {cell(runs, 'energy_in')} | "
                     f"{cell(runs, 'energy_out')} | {cell(runs, 'FPR95')} | {cell(runs, 'AUROC', 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/energy_recipe_study", help="(default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="(default: 1 2 3)")
    parser.add_argument("--epochs", type=int, help="per recipe, in all (default: 20; 24 with --cifar-path)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: seed 1, 4 epochs on 64 training and test images, 100 OOD images")
    parser.add_argument("--cifar-path", action="store_true",
                        help="train through the CIFAR-10 and 300K-random-images loaders instead, on the digits "
                             "and photo crops written in those formats under <out>/data, with the seed "
                             "command's batches (128 / 256): three of the recipes, 24 epochs = 264 steps")
    args = parser.parse_args(argv)
    out = Path(args.out)
    setup = write_cifar_format(out / "data") if args.cifar_path else DIGITS
    seeds, epochs, limit, ood_limit = ([1], 4, 64, 100) if args.quick else \
        (args.seeds, args.epochs or (24 if args.cifar_path else 20), None, 1000)
    chosen = {label: stages for label, stages in recipes(epochs).items()
              if not args.cifar_path or label.startswith(CIFAR_PATH_RECIPES)}

    results = {}
    for index, (label, stages) in enumerate(chosen.items()):
        results[label] = [run_recipe(stages, f"recipe{index}", seed, setup, out, limit, ood_limit)
                          for seed in seeds]
        print(f"\n{label}: " + ", ".join(f"seed {r['seed']}: {r['test_acc']:.1f} %" for r in results[label]),
              flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{setup.in_dataset} loader ({'the digits' if args.cifar_path else 'bundled digits'}), ResNet-20, "
          f"batches {setup.batch} / {setup.oe_batch}, {epochs} epochs = {results['CE alone'][0]['steps']} steps "
          f"per recipe, seeds {' '.join(map(str, seeds))} (mean ± std); last-epoch mean energies (ID, "
          f"{setup.aux_dataset}); energy score vs {', '.join(OOD_SETS)} (average):\n")
    print(table(results))


if __name__ == "__main__":
    main()
