"""Energy training from scratch on the bundled digits: which recipe trains a classifier as accurate as
cross-entropy alone while meeting both energy margins (README, "Energy training from scratch").

Every recipe runs the real ``train_energy.py`` for the same number of optimizer steps (ResNet-20, batches
of 32 digits and 64 photo crops, lr 0.1 cosine, margins −25 / −7, λ 0.1):

* ``scratch, λ from step 1`` — the paper's loss from the first step (``--energy-warmup=0 --energy-ramp=0``);
* ``scratch, warm-up / ramp`` — cross-entropy alone for a fraction of the epochs (``--energy-warmup``), then
                               λ rising linearly over a fraction (``--energy-ramp``), then the paper's loss;
                               train_energy.py's defaults: a quarter, then half of the epochs;
* ``CE, then fine-tune``     — cross-entropy (``--lamb=0``) for 3/4 of the epochs, then ``--pretrained``
                               fine-tuning with the paper's settings (lr 0.001) for the last 1/4;
* ``CE alone``               — ``--lamb=0`` throughout.

For each run: the test accuracy and the mean energies of the last epoch (digits, photo crops: what the
margins bound), and FPR95 / AUROC of the energy score (−E, ID positive) of the digits test set against
the first 1,000 images of each synthetic OOD set. Prints a table of means ± std over the seeds and writes
every run's numbers to ``<out>/results.json``.

    python bench/energy_recipe_study.py             # 3 seeds × 6 recipes × 20 epochs (820 steps each)
    python bench/energy_recipe_study.py --quick     # a smoke run on 64 images (what the test suite runs)
"""
import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_energy  # noqa: E402
from utils.checkpoints import load_model  # noqa: E402
from utils.data import get_dataset  # noqa: E402
from utils.energy import energy_score  # noqa: E402
from utils.metrics import ood_metrics  # noqa: E402

OOD_SETS = ("gaussian", "rademacher", "blobs")
BATCH, OE_BATCH = 32, 64


def recipes(epochs: int) -> dict[str, list[list[str]]]:
    """Recipe label → the train_energy.py arguments of each of its stages (``{ckpt}``: the previous stage's
    last.pt); every recipe trains ``epochs`` epochs in all."""
    finetune = max(1, epochs // 4)
    return {
        "scratch, λ from step 1": [[f"--epochs={epochs}", "--energy-warmup=0", "--energy-ramp=0"]],
        "scratch, warm-up 0.5, no ramp": [[f"--epochs={epochs}", "--energy-warmup=0.5", "--energy-ramp=0"]],
        "scratch, no warm-up, ramp 0.5": [[f"--epochs={epochs}", "--energy-warmup=0", "--energy-ramp=0.5"]],
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


def run_recipe(stages: list[list[str]], name: str, seed: int, out: Path, limit: int | None,
               ood_limit: int) -> dict:
    common = ["--in-dataset=digits", "--gpu=-1", "--workers=0", f"--batch-size={BATCH}",
              f"--oe-batch-size={OE_BATCH}", "--aux-dataset=sample_photos", f"--seed={seed}",
              f"--checkpoint-root={out / 'checkpoints'}", "--overwrite", *([f"--limit={limit}"] if limit else [])]
    started, log, checkpoint = time.time(), [], ""
    for stage, argv in enumerate(stages):
        stage_name = f"{name}-s{seed}-{stage}"
        train_energy.main([f"--name={stage_name}", *common, *(a.format(ckpt=checkpoint) for a in argv)])
        directory = out / "checkpoints" / "digits" / stage_name
        with open(directory / "log.csv", newline="") as f:
            log += [{key: float(value) for key, value in row.items() if value} for row in csv.DictReader(f)]
        checkpoint = str(directory / "last.pt")

    model, _ = load_model("digits", stage_name, root=out / "checkpoints")
    score_in = -energies(model, get_dataset("digits", train=False), ood_limit)
    ood = {}
    for dataset in OOD_SETS:
        metrics = ood_metrics(score_in.numpy(), -energies(model, get_dataset(dataset), ood_limit).numpy())
        ood[dataset] = {"FPR95": 100 * metrics["FPR95"], "AUROC": 100 * metrics["AUROC"]}
    train_images = min(limit or math.inf, len(get_dataset("digits", train=True)))
    last = log[-1]
    return {"seed": seed, "epochs": len(log), "steps": len(log) * math.ceil(train_images / BATCH),
            "test_acc": last["test_acc"], "energy_in": last["energy_in"], "energy_out": last["energy_out"],
            "FPR95": statistics.mean(v["FPR95"] for v in ood.values()),
            "AUROC": statistics.mean(v["AUROC"] for v in ood.values()),
            "ood": ood, "log": log, "seconds": time.time() - started}


def table(results: dict[str, list[dict]]) -> str:
    def cell(runs: list[dict], key: str, digits: int = 1) -> str:
        values = [run[key] for run in runs]
        spread = f" ± {statistics.pstdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{spread}"

    lines = ["| recipe | test acc. % | E(digits) | E(photos) | FPR95 % ↓ | AUROC % ↑ |",
             "|---|---|---|---|---|---|"]
    for label, runs in results.items():
        lines.append(f"| {label} | {cell(runs, 'test_acc')} | {cell(runs, 'energy_in')} | "
                     f"{cell(runs, 'energy_out')} | {cell(runs, 'FPR95')} | {cell(runs, 'AUROC', 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/energy_recipe_study", help="(default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="(default: 1 2 3)")
    parser.add_argument("--epochs", type=int, default=20, help="per recipe, in all (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: seed 1, 4 epochs on 64 training and test images, 100 OOD images")
    args = parser.parse_args(argv)
    seeds, epochs, limit, ood_limit = ([1], 4, 64, 100) if args.quick else (args.seeds, args.epochs, None, 1000)
    out = Path(args.out)

    results = {}
    for index, (label, stages) in enumerate(recipes(epochs).items()):
        results[label] = [run_recipe(stages, f"recipe{index}", seed, out, limit, ood_limit) for seed in seeds]
        print(f"\n{label}: " + ", ".join(f"seed {r['seed']}: {r['test_acc']:.1f} %" for r in results[label]),
              flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nDigits, ResNet-20, {epochs} epochs = {results['CE alone'][0]['steps']} steps per recipe, "
          f"seeds {' '.join(map(str, seeds))} (mean ± std); last-epoch mean energies; energy score vs "
          f"{', '.join(OOD_SETS)} (average):\n")
    print(table(results))


if __name__ == "__main__":
    main()
