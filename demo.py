"""The whole pipeline in a few minutes on a CPU, on data that needs no download.

In-distribution: six classes of scikit-learn's bundled handwritten digits, the open-set split
``digits-012345`` (upscaled to 32x32 RGB; labels 0-5).
Auxiliary outliers for energy training: random crops of the photographs scikit-learn ships.
OOD test sets: near-OOD, ``heldout``: the test images of the four other digits (6-9), the open-set
recognition protocol; far-OOD: the synthetic gaussian, rademacher and blobs sets of Outlier Exposure.

It runs the real scripts, in order — both trainings, both trackings, both models' per-layer tables and
the comparison of every tracked detector — with every output under one folder (``--out``, default
``demo_output/``)::

    python demo.py            # ~6 minutes on two CPU cores
    python demo.py --quick    # a smoke run (what the test suite runs)
"""
import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.demo_reference import format_check, load_reference, run_values
from utils.runtime import describe_kernels, get_device, pinned_kernel_env, run_script

IN_DATASET = "digits-012345"  # 6 known classes, 4 unknown: the ratio of Neal et al.'s MNIST splits
QUICK_LIMIT = 100  # images a set in the smoke run (--quick), the test suite's
OOD_SETS = ("heldout", "gaussian", "rademacher", "blobs")  # near-OOD first
ROOT = Path(__file__).resolve().parent
ENV = pinned_kernel_env()  # the thread count and kernels the documented numbers were computed with


def run(script: str, *args: str) -> None:
    command = [sys.executable, str(ROOT / script), *args]
    print(f"\n$ python {script} {' '.join(args)}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env=ENV)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="folder for checkpoints/, gradients/, results/")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer epochs and samples")
    parser.add_argument("--gpu", default="0", help="CUDA device; falls back to the CPU when CUDA is absent")
    parser.add_argument("--seed", type=int, default=1,
                        help="the trainings' seed (1: the documented run; bench/demo_spread.py runs several)")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    # As many optimizer steps as 8, 3 and 10 epochs of all ten digits (1,297 training images; the split has 781)
    epochs, finetune_epochs, bce_epochs, limit = ("5", "2", "5", QUICK_LIMIT) if args.quick else ("13", "5", "17", 1000)
    # Without CUDA, say so here once rather than in each of the scripts, and ask them for the CPU.
    gpu = args.gpu if get_device(args.gpu).type == "cuda" else "-1"
    common = [f"--in-dataset={IN_DATASET}", f"--gpu={gpu}"]
    seed = [f"--seed={args.seed}"]
    # Training is bit-identical run to run with the same threads and kernels, and changes with them: say which.
    print(f"demo: {IN_DATASET} on {'cuda:' + gpu if gpu != '-1' else 'the CPU'}, torch {torch.__version__}, "
          f"{ENV['OMP_NUM_THREADS']} threads and pinned kernels: {describe_kernels(ENV)} (set them to change; the "
          "documented numbers are at these)", flush=True)
    # 781 training images: small batches give the few epochs enough optimizer steps.
    batches = ["--batch-size=32", "--oe-batch-size=64"]
    checkpoints, gradients, results = (f"--checkpoint-root={out / 'checkpoints'}",
                                       f"--gradient-root={out / 'gradients'}", f"--results-root={out / 'results'}")
    start = time.time()
    # Gradients and results belong to the models trained below; never mix in an earlier run's files.
    shutil.rmtree(out / "gradients", ignore_errors=True)
    shutil.rmtree(out / "results", ignore_errors=True)

    # Energy training as in the energy paper: a cross-entropy model (lambda = 0) fine-tuned with the energy
    # loss. From scratch with the default margins, a few epochs on 781 digits do not learn the classes.
    run("train_energy.py", "--name=ce", *common, *batches, "--aux-dataset=sample_photos", "--lamb=0",
        f"--epochs={epochs}", "--lr=0.05", *seed, checkpoints, "--overwrite")
    run("train_energy.py", "--name=energy", *common, *batches, "--aux-dataset=sample_photos",
        f"--epochs={finetune_epochs}", f"--pretrained={out / 'checkpoints' / IN_DATASET / 'ce' / 'last.pt'}",
        *seed, checkpoints, "--overwrite")
    run("train_original.py", "--name=bce", *common, "--batch-size=32", f"--epochs={bce_epochs}", "--lr=0.05",
        *seed, checkpoints, "--overwrite")
    # "train": the split's training images the combined row, Mahalanobis and KNN are fit on; then the OOD
    # sets, every detector of track_gradient.py from one pass.
    for dataset in ("train", *OOD_SETS):
        run("track_gradient.py", "--name=energy", f"--dataset={dataset}", "--score=all", f"--limit={limit}",
            *common, checkpoints, gradients)
        run("track_gradient_original.py", "--name=bce", f"--dataset={dataset}", f"--limit={limit}",
            *common, checkpoints, gradients)
    plot = [] if args.quick else ["--plot"]
    run("compute_gradient_metrics.py", "--name=energy", "--saved_form=norm_single", "--score=min", "--dataset=all",
        f"--in-dataset={IN_DATASET}", gradients, results, *plot)
    run("compute_gradient_metrics.py", "--name=bce", "--saved_form=original_single", "--dataset=all",
        f"--in-dataset={IN_DATASET}", gradients, results, *plot)
    for name in ("energy", "bce"):  # every tracked detector and the baselines in one table
        run("compute_gradient_metrics.py", f"--name={name}", "--compare", f"--in-dataset={IN_DATASET}", gradients,
            results, *plot)
    reference = None if args.quick else load_reference()
    if reference is not None:  # the smoke run's short recipe has no reference
        print("\n" + format_check(run_values(out / "results", IN_DATASET), reference))
    print(f"\ndemo finished in {time.time() - start:.0f} s; everything is under {out}")


if __name__ == "__main__":
    run_script(main)
