"""The benchmark: every detector and baseline on near- and far-OOD sets, mean ± std over training seeds.

For each run (a training seed and, on digits, an open-set split of its own), it drives the real scripts:

1. trains the models the detectors need — ``ce``: cross-entropy (``train_energy.py --lamb=0``); ``energy``:
   ``ce`` fine-tuned with the energy loss (the energy paper's recipe); ``bce``: one sigmoid per class
   (``train_original.py``);
2. tracks, on the in-distribution training subset (``--dataset train``: what the combined row, Mahalanobis
   and KNN are fit on), the ID test set and every near- and far-OOD set present, every detector of
   ``track_gradient.py --score all`` on ``ce`` and on ``energy`` (and, by name, the low-dimensional gradient,
   which ``--score all`` leaves out for its cost) and the confounding label on ``bce``;
3. compares them (``compute_gradient_metrics.py --compare``) and reads each row's metrics per OOD set.

Each row's near-OOD and far-OOD figures are the unweighted mean over the sets of the group in one run; the
table gives their mean ± std (sample std, ddof = 1) over runs, with each model's test accuracy. Since each run
is another split, the spread between runs hides gaps that every run shows, so each row also has, per group:

* its **paired difference from MSP**: in each run, the row's AUROC minus that run's MSP AUROC on the
  cross-entropy model (``ce: MSP``, the field's reference), then the mean ± std of those differences over runs
  and in how many runs it is above 0;
* its **mean rank** over runs: in each run the rows (those of every run) ranked by AUROC, 1 the best, ties
  sharing the mean of their ranks.

Rows are sorted by the paired difference (near-OOD, far-OOD where there is no near set), then by the mean
rank. New detectors of ``utils/detectors/`` and baselines of ``utils/feature_baselines/`` appear without an
edit here: ``--score all`` tracks every detector (but those in ``BY_NAME``, tracked by name) and ``--compare``
reports every tracked one and every baseline.

Near-OOD: the held-out classes of a digits open-set split (``heldout``), CIFAR-100 for CIFAR-10 and the
reverse. Far-OOD: the seed's six sets and the synthetic ones, those present (``utils.data.ood_group``).

    python bench/benchmark.py                                 # digits open-set splits, 3 runs, CPU (~43 min)
    python bench/benchmark.py --in-dataset CIFAR-10 --gpu 0   # CIFAR, where the data and a GPU are
    python bench/benchmark.py --quick                         # a smoke run (what the tests run)
    python bench/benchmark.py --in-dataset CIFAR-10 --benchmark openood --gpu 0   # OpenOOD v1.5's lists

``--benchmark=openood`` trains as before and tracks and compares on OpenOOD v1.5's image lists under
``--data-root`` (``docs/openood.md``): its near / far groups, its ``train_<in>.txt`` for the fits, each
comparison also in OpenOOD's form (``openood.json``); the table's FPR95 stays ours (ID positive).

Writes ``<out>/benchmark.md`` and ``<out>/benchmark.json``; every run's checkpoints, gradients and results
stay under ``<out>/runs/<in-dataset>-seed<seed>/``.
"""
import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.cli import benchmark_root  # noqa: E402
from utils.data import BENCHMARKS, DEFAULT_BENCHMARK, check_in_dataset, ood_group  # noqa: E402
from utils.data.splits import is_digits_split  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.runtime import describe_kernels, get_device, pinned_kernel_env, run_script  # noqa: E402

ENV = pinned_kernel_env()  # the thread count and kernels of the documented tables
DIGITS_SPLITS = ("digits-012345", "digits-135789", "digits-024679")  # 6 known, 4 unknown (Neal et al.'s MNIST ratio)
MODELS = {"ce": "cross-entropy", "energy": "ce fine-tuned with the energy loss", "bce": "one sigmoid per class"}
GROUPS = ("near", "far")
OPENOOD_TRAINED = ("CIFAR-10", "CIFAR-100")  # OpenOOD's benchmarks whose models the CIFAR plan trains
METRICS = ("FPR95", "AUROC")
REFERENCE = "ce: MSP"  # the row every row's paired difference subtracts, run by run


@dataclass(frozen=True)
class Plan:
    """Epochs, batch sizes and samples of one benchmark: the digits default, CIFAR, or the smoke run."""
    ce_epochs: int
    energy_epochs: int
    bce_epochs: int
    lr: float
    batch_size: int
    oe_batch_size: int
    aux_dataset: str
    limit: int | None        # samples tracked per set (None: all); also the training subset's size
    train_limit: int | None  # training images per epoch (None: all)


PLANS = {
    # the demo's recipe: ~780 training images in a 6-class split, small batches, as many optimizer steps as 8, 3
    # and 10 epochs of all ten digits (3 energy epochs left one seed at 48 % test accuracy: the regulariser starts
    # at ~270 on a cross-entropy model's energies); 500 samples a set: every ID test (~300) and heldout (~200)
    # image, 500 of each synthetic set
    "digits": Plan(13, 5, 17, 0.05, 32, 64, "sample_photos", 500, None),
    # the recipes of the scripts (energy_ood, the origin's BCE), on the full training set
    "CIFAR": Plan(100, 10, 100, 0.1, 128, 256, "tinyimages", None, None),
    "quick": Plan(1, 1, 1, 0.05, 32, 64, "sample_photos", 40, 96),
}


# Detectors that --score all leaves out for their cost, tracked by name: the low-dimensional gradient (its paper's
# CIFAR form), projected through per-sample gradients, 50x faster than its forward-mode products on ResNet-20
# (docs/detectors_2024.md#cost).
BY_NAME = {"lowdim": ("--lowdim-projection=gradients",)}


def run(script: str, *args: str) -> None:
    print(f"\n$ python {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(ROOT / script), *args], check=True, cwd=ROOT, env=ENV)


def machine() -> str:
    """The machine in words: CPU model and cores, torch and the threads and kernels its runs use, the GPU where used."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {torch.multiprocessing.cpu_count()} cores; torch {torch.__version__} with "
            f"{ENV['OMP_NUM_THREADS']} threads ({describe_kernels(ENV)}){gpu}; Python {platform.python_version()}")


def train_and_track(in_dataset: str, seed: int, plan: Plan, gpu: str, folder: Path, data_root: str,
                    benchmark: str = DEFAULT_BENCHMARK) -> None:
    """Train ``ce``, ``energy`` and ``bce`` with ``seed`` and track every detector on every set, under ``folder``."""
    roots = [f"--checkpoint-root={folder / 'checkpoints'}", f"--data-root={data_root}"]
    common = [f"--in-dataset={in_dataset}", f"--gpu={gpu}", f"--seed={seed}", *roots]
    if plan.train_limit:
        common.append(f"--limit={plan.train_limit}")
    batches = [f"--batch-size={plan.batch_size}", f"--oe-batch-size={plan.oe_batch_size}",
               f"--aux-dataset={plan.aux_dataset}"]
    run("train_energy.py", "--name=ce", *common, *batches, "--lamb=0", f"--epochs={plan.ce_epochs}",
        f"--lr={plan.lr}", "--overwrite")
    run("train_energy.py", "--name=energy", *common, *batches, f"--epochs={plan.energy_epochs}",
        f"--pretrained={folder / 'checkpoints' / in_dataset / 'ce' / 'last.pt'}", "--overwrite")
    run("train_original.py", "--name=bce", *common, f"--batch-size={plan.batch_size}", f"--epochs={plan.bce_epochs}",
        f"--lr={plan.lr}", "--overwrite")

    track = [f"--in-dataset={in_dataset}", f"--gpu={gpu}", *roots, f"--gradient-root={folder / 'gradients'}",
             f"--benchmark={benchmark}"]
    if plan.limit:
        track.append(f"--limit={plan.limit}")
    for dataset in ("train", "all"):  # the training subset first: with --limit the ID test file is the same
        for name in ("ce", "energy"):
            run("track_gradient.py", f"--name={name}", f"--dataset={dataset}", "--score=all", *track)
        run("track_gradient_original.py", "--name=bce", f"--dataset={dataset}", *track)
    for name in ("ce", "energy"):  # one run each: the fit, the training subset's file first, then every set
        for score, options in BY_NAME.items():
            run("track_gradient.py", f"--name={name}", "--dataset=all", f"--score={score}", *options, *track)
    for name in MODELS:
        run("compute_gradient_metrics.py", f"--name={name}", "--compare", f"--in-dataset={in_dataset}",
            f"--gradient-root={folder / 'gradients'}", f"--results-root={folder / 'results'}",
            f"--benchmark={benchmark}")


def test_accuracy(folder: Path, in_dataset: str, name: str) -> float:
    """The last epoch's test accuracy (%) from the run's ``log.csv``."""
    with open(folder / "checkpoints" / in_dataset / name / "log.csv") as f:
        return float(list(csv.DictReader(f))[-1]["test_acc"])


def row_label(entry: dict) -> str:
    """A comparison row's name in the benchmark: the detector (``combined`` rows say so) or the baseline."""
    return f"{entry['name']} combined" if entry["kind"] == "combined" else entry["name"]


def collect(folder: Path, in_dataset: str, benchmark: str = DEFAULT_BENCHMARK) -> dict:
    """One run's figures: per model and row, each group's mean over its sets; and each model's test accuracy."""
    groups = {group: set(ood_group(group, in_dataset, benchmark)) for group in GROUPS}
    results = Path(benchmark_root(str(folder / "results"), benchmark))
    rows = {}
    for model in MODELS:
        table = json.loads((results / in_dataset / model / "compare" / "comparison.json").read_text())
        sets = [d for d in table["datasets"] if d != "average"]
        for entry in table["rows"]:
            figures = {}
            for group, members in groups.items():
                chosen = [d for d in sets if d in members]
                if chosen:
                    figures[group] = {m: float(np.mean([entry["results"][d][m] for d in chosen])) for m in METRICS}
                    figures[group]["sets"] = chosen
            rows[f"{model}: {row_label(entry)}"] = {"model": model, "row": row_label(entry), "kind": entry["kind"],
                                                    **figures}
    return {"rows": rows, "accuracy": {model: test_accuracy(folder, in_dataset, model) for model in MODELS}}


def mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values}


def ranks(runs: list[dict], keys: list[str], group: str) -> dict[str, list[float]]:
    """Each row's rank by ``group`` AUROC in each run among ``keys`` (1 the best; ties share their mean rank)."""
    per_run = [rankdata([-r["figures"]["rows"][key][group]["AUROC"] for key in keys], method="average")
               for r in runs]
    return {key: [float(ranked[i]) for ranked in per_run] for i, key in enumerate(keys)}


def paired(runs: list[dict], key: str, group: str) -> dict:
    """The row's ``group`` AUROC minus the same run's ``REFERENCE`` AUROC: mean ± std over runs, and in how
    many runs it is above 0."""
    differences = [r["figures"]["rows"][key][group]["AUROC"] - r["figures"]["rows"][REFERENCE][group]["AUROC"]
                   for r in runs]
    return {**mean_std(differences), "above": sum(d > 0 for d in differences), "runs": len(differences)}


def summarise(runs: list[dict]) -> dict:
    """Mean ± std over runs of every row's group metrics (rows present in every run) and of the accuracies;
    each row's paired AUROC difference from ``REFERENCE`` (where every run has it) and its mean rank."""
    keys = [key for key in runs[0]["figures"]["rows"] if all(key in r["figures"]["rows"] for r in runs)]
    summary = {}
    for key in keys:
        first = runs[0]["figures"]["rows"][key]
        entry = {k: first[k] for k in ("model", "row", "kind")}
        for group in GROUPS:
            if group in first:
                entry[group] = {m: mean_std([r["figures"]["rows"][key][group][m] for r in runs]) for m in METRICS}
        summary[key] = entry
    for group in GROUPS:
        ranked = [key for key in keys if group in summary[key]]
        for key, values in ranks(runs, ranked, group).items():
            summary[key][group]["rank"] = mean_std(values)
            if REFERENCE in ranked:
                summary[key][group]["vs_msp"] = paired(runs, key, group)
    accuracy = {model: mean_std([r["figures"]["accuracy"][model] for r in runs]) for model in MODELS}
    return {"rows": summary, "accuracy": accuracy, "reference": REFERENCE}


def ordered(summary: dict, group: str) -> list[dict]:
    """The rows, largest paired difference from MSP in ``group`` first, then smallest mean rank (rows without
    the group last)."""
    def key(entry: dict) -> tuple[float, float]:
        figures = entry.get(group)
        if figures is None:
            return (np.inf, np.inf)
        return (-figures.get("vs_msp", {}).get("mean", 0.0), figures["rank"]["mean"])
    return sorted(summary["rows"].values(), key=key)


def cell(stat: dict | None) -> str:
    return "–" if stat is None else f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def difference_cell(stat: dict | None) -> str:
    """``+1.23 ± 0.45 (3/3)``: the mean paired difference ± its std, and the runs in which it is above 0."""
    return "–" if stat is None else f"{stat['mean']:+.2f} ± {stat['std']:.2f} ({stat['above']}/{stat['runs']})"


def rank_cell(stat: dict | None) -> str:
    return "–" if stat is None else f"{stat['mean']:.1f}"


def markdown(report: dict) -> str:
    """The benchmark as Markdown: header (command, machine, wall time), accuracies, then one row per detector
    and baseline, the largest near-OOD paired difference from MSP first (far-OOD where there is no near set)."""
    summary, runs = report["summary"], report["runs"]
    on = "" if report.get("benchmark", DEFAULT_BENCHMARK) == DEFAULT_BENCHMARK else " on OpenOOD v1.5's image lists"
    lines = [f"# OOD benchmark: {report['in_dataset']}{on}", "",
             f"Command: `{report['command']}`  ",
             f"Machine: {report['machine']}  ",
             f"Wall time: {report['wall_s'] / 60:.1f} min for {len(runs)} run(s): "
             + ", ".join(f"{r['in_dataset']} seed {r['seed']}" for r in runs) + ".  ",
             f"Plan: {report['plan']}.", "",
             "Each cell: mean ± std (ddof = 1) over the runs of the unweighted mean over the group's sets, in %. "
             "ID is positive; FPR95 is the FPR at 95 % TPR. Near-OOD: "
             + (", ".join(report["sets"]["near"]) or "none") + "; far-OOD: " + ", ".join(report["sets"]["far"]) + ".",
             f"Δ vs MSP: in each run the row's AUROC minus that run's `{report['summary']['reference']}` AUROC, mean "
             "± std over runs, and (k/n) the runs in which it is above 0. Rank: the mean over runs of the row's "
             "AUROC rank among all rows (1 = best). Sorted by Δ, then rank.",
             "Detectors by their headline row; `combined` rows and the feature baselines (Mahalanobis, KNN, ReAct, "
             "ASH, SCALE, ViM, fDBD, GEN, RMDS; OpenOOD's defaults) are fit on ID training images "
             "only. Rows name the model they are computed on: " + "; ".join(f"`{k}` {v}" for k, v in MODELS.items())
             + ".", "", "| model | test accuracy |", "|---|---|"]
    lines += [f"| {model} | {cell(stat)} |" for model, stat in summary["accuracy"].items()]
    sort_group = "near" if report["sets"]["near"] else "far"
    lines += ["", "| model | detector / baseline | " + " | ".join(
        f"{group} {title}" for group in GROUPS for title in ("FPR95 ↓", "AUROC ↑", "Δ AUROC vs MSP", "rank ↓"))
        + " |", "|---|---|" + "---|" * 4 * len(GROUPS)]
    for entry in ordered(summary, sort_group):
        cells = [text for group in GROUPS for text in (
            *(cell(entry.get(group, {}).get(m)) for m in METRICS),
            difference_cell(entry.get(group, {}).get("vs_msp")), rank_cell(entry.get(group, {}).get("rank")))]
        lines.append(f"| {entry['model']} | {entry['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-dataset", default="digits", type=check_in_dataset,
                        help="digits: the open-set splits of --splits, one per seed; a split (digits-012345) for "
                             "that one; CIFAR-10 or CIFAR-100")
    parser.add_argument("--splits", nargs="+", default=list(DIGITS_SPLITS), type=check_in_dataset,
                        help="the digits open-set splits; run k uses split k mod their number")
    parser.add_argument("--seeds", type=int, default=3,
                        help="training runs (seeds 1..N); 3 by default: a run takes ~14 min on a 2-core CPU")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 1 epoch each, 40 samples a set")
    parser.add_argument("--aux-dataset", help="the energy fine-tuning's auxiliary outliers (default: sample_photos "
                                              "on digits, tinyimages on CIFAR; random300k is OE's replacement)")
    parser.add_argument("--gpu", default="-1", help="CUDA device; -1 (default) for the CPU")
    parser.add_argument("--data-root", default="datasets", help="where the data files are")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default=DEFAULT_BENCHMARK,
                        help="the OOD sets tracked: default, this project's; openood, OpenOOD v1.5's image lists "
                             "(CIFAR-10 / CIFAR-100; docs/openood.md)")
    parser.add_argument("--out", default="bench_output", help="folder for the runs and the report")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 1
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}.")
    if args.benchmark != DEFAULT_BENCHMARK and args.in_dataset not in OPENOOD_TRAINED:
        raise UserError(f"--benchmark={args.benchmark} runs on the in-distribution sets this benchmark trains, "
                        f"{' and '.join(OPENOOD_TRAINED)}, not {args.in_dataset} (ImageNet models are imported, "
                        "not trained: docs/openood.md has the commands).")
    if any(not is_digits_split(s) for s in args.splits):
        raise UserError("--splits takes digits open-set splits, e.g. digits-012345.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    family = "digits" if args.in_dataset == "digits" or is_digits_split(args.in_dataset) else "CIFAR"
    plan = PLANS["quick" if args.quick else family]
    if args.aux_dataset:
        plan = replace(plan, aux_dataset=args.aux_dataset)
    gpu = args.gpu if get_device(args.gpu).type == "cuda" else "-1"
    out = Path(args.out).resolve()
    command = "python bench/benchmark.py" + (f" {' '.join(argv)}" if argv else " ".join(["", *sys.argv[1:]]))
    print(f"benchmark: {command}\nmachine: {machine()}\nplan: {plan}", flush=True)
    start = time.time()
    runs = []
    for k in range(args.seeds):
        seed = k + 1
        in_dataset = args.splits[k % len(args.splits)] if args.in_dataset == "digits" else args.in_dataset
        folder = out / "runs" / f"{in_dataset}-seed{seed}"
        shutil.rmtree(folder / "gradients", ignore_errors=True)  # never mix in an earlier run's files
        shutil.rmtree(folder / "results", ignore_errors=True)
        run_start = time.time()
        train_and_track(in_dataset, seed, plan, gpu, folder, args.data_root, args.benchmark)
        runs.append({"in_dataset": in_dataset, "seed": seed, "wall_s": time.time() - run_start,
                     "figures": collect(folder, in_dataset, args.benchmark)})
    report = {"in_dataset": args.in_dataset, "benchmark": args.benchmark, "command": command, "machine": machine(),
              "plan": asdict(plan),
              "wall_s": time.time() - start, "torch_threads": int(ENV["OMP_NUM_THREADS"]),
              "sets": {group: sorted({d for r in runs for e in r["figures"]["rows"].values()
                                      for d in e.get(group, {}).get("sets", [])}) for group in GROUPS},
              "near_of": {r["in_dataset"]: list(ood_group("near", r["in_dataset"], args.benchmark)) for r in runs},
              "runs": runs, "summary": summarise(runs)}
    text = markdown(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(text)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + text + f"\nwrote {out / 'benchmark.md'} and {out / 'benchmark.json'} "
          f"({report['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    run_script(main)
