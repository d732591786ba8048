"""One prepared check of every CUDA path, and the GPU figures the README reports.

On one GPU, in a few minutes, it checks and times:

1. exactness: every detector's per-layer values tracked on the device in float32 against its float64
   batch-of-one definition on the CPU (``Detector.reference``), ResNet-20 and WRN-40-2, with TF32 off (as
   the engine tracks) and, for the record, on;
2. tracking speed: the loop, the engine and the ceiling (``bench/track_bench.py``'s definitions) for ``min``
   and the confounding label, at tracking's default ``--batch-size`` and the best of a few, with the
   engine's peak GPU memory; beside them ``torch.func``'s ``vmap`` over per-sample vector-Jacobian products
   (pytorch-ood's way of taking per-sample gradients) at its best batch;
3. training speed: the energy loss's step (128 ID + 256 outlier images, CIFAR-shaped) in float32 and bf16
   AMP, channels_last off and on; and one real epoch of ``train_energy.py`` on the bundled digits, its time
   split into waiting for the training loaders and the rest;
4. ImageNet-1K (``bench/cuda_imagenet.py``): ResNet-50 at 224 px with 1,000 classes, ``--layers last`` against a
   forward pass and the official loop, every-layer gradnorm and pred against the ceiling, vmap and the loop with
   peak memory beside one training step's, the time for 50,000 images; a reduced BiT against the float64 loop;
5. paths: ``train_energy.py`` with ``--amp bf16`` and ``--amp fp16``, ``--resume`` of a run, ``torchrun``
   (NCCL between 2 GPUs where there are 2), an all-reduce in a process group, and ``track_gradient.py
   --shard 0/2`` and ``1/2`` merging: each exits 0 and its outputs load.

It writes ``report.md`` and ``report.json`` to ``--out`` and prints the Markdown. A section that fails is
recorded and the others still run; the exit status is 1 if a check failed. Speed targets (engine ≥ 20× the
loop, ≥ 0.8 of the ceiling, ahead of vmap) are reported, not enforced. ``--device cpu --quick`` runs the
same on the CPU in under a minute, with fewer images and ResNet-20 only (the test suite does).

    python bench/cuda_check.py                        # cuda:0; aimed at <= 6 minutes on one H100
    python bench/cuda_check.py --quick                # the GPU smoke run: every path, small sizes
    python bench/cuda_check.py --device cpu --quick --out /tmp/cuda_check
"""
import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cuda_imagenet import imagenet  # noqa: E402
from cuda_measure import exactness, tracking_speed, training_speed  # noqa: E402
from cuda_runs import digits_epoch, paths  # noqa: E402
from cuda_sizes import FULL, QUICK  # noqa: E402

from utils.per_sample import tf32_settings  # noqa: E402

SECTIONS = {"exactness": "Exactness: tracked on the device vs the float64 CPU loop",
            "tracking": "Tracking speed (images/s; TF32 off)", "training": "Training step speed",
            "epoch": "One epoch of train_energy.py on digits",
            "imagenet": "ImageNet-1K: ResNet-50 at 224 px, 1,000 classes (images/s; TF32 off)", "paths": "Paths"}


# the report

def environment(device: torch.device) -> dict:
    """What the figures were measured on, and the TF32 settings this process started with."""
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    tf32 = [getattr(owner, name) for owner, name in tf32_settings()]
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "torch": torch.__version__, "CUDA": torch.version.cuda, "cuDNN": torch.backends.cudnn.version(),
            "Python": platform.python_version(), "GPUs": torch.cuda.device_count(), "CPU cores": os.cpu_count(),
            "TF32 outside tracking (matmul, convolutions)": ", ".join(map(str, tf32)),
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_section(name: str, title: str, section: Callable[[], list[dict]]) -> dict:
    """The section's rows; ok unless it raised or one of its checks (a row's ``ok``) failed."""
    started = time.perf_counter()
    try:
        rows, error = section(), None
    except Exception:  # recorded, so that one failing path does not hide the others
        rows, error = [], traceback.format_exc()
    ok = error is None and all(row.get("ok") is not False for row in rows)
    return {"name": name, "title": title, "ok": ok, "seconds": time.perf_counter() - started, "rows": rows,
            "error": error}


def cell(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**FAILED**" if key == "ok" else "no"
    if isinstance(value, float):
        return f"{value:.1e}" if 0 < abs(value) < 0.01 else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return "—" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    lines = ["# CUDA check", "", *(f"* {key}: {value}" for key, value in report["environment"].items()),
             f"* result: {'every check passed' if report['ok'] else 'a check FAILED'} in {report['seconds']:.0f} s", ""]
    for section in report["sections"]:
        lines += [f"## {section['title']} — {'ok' if section['ok'] else 'FAILED'} ({section['seconds']:.0f} s)", ""]
        if section["error"]:
            lines += ["```", section["error"].rstrip(), "```", ""]
        columns = list(dict.fromkeys(key for row in section["rows"] for key in row))
        if columns:
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(key, row.get(key)) for key in columns) + " |" for row in section["rows"]]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer images, ResNet-20 only: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("cuda_check_report"),
                        help="folder for report.md, report.json and the runs' files (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections, of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device is visible; run it on a GPU machine, or with --device cpu")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    sizes = QUICK if args.quick else FULL
    work = args.out / "runs"  # checkpoints and gradients of the runs, made afresh
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started, setting = time.perf_counter(), environment(device)
    checks = {"exactness": lambda: exactness(device, sizes), "tracking": lambda: tracking_speed(device, sizes),
              "training": lambda: training_speed(device, sizes), "epoch": lambda: digits_epoch(device, sizes, work),
              "imagenet": lambda: imagenet(device, args.quick),
              "paths": lambda: paths(device, sizes, work, args.quick)}
    sections = [run_section(name, title, checks[name]) for name, title in SECTIONS.items()
                if name in (args.only or SECTIONS)]
    report = {"environment": setting, "sizes": asdict(sizes), "quick": args.quick,
              "ok": all(s["ok"] for s in sections), "seconds": time.perf_counter() - started, "sections": sections}
    text = markdown(report)
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(text)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
