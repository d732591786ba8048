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
4. paths: ``train_energy.py`` with ``--amp bf16`` and ``--amp fp16``, ``--resume`` of a run, ``torchrun``
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
import copy
import csv
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, vjp, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from track_bench import NUM_CLASSES, ceiling, engine, images, loop, make_model, throughput  # noqa: E402

import models  # noqa: E402
import train_energy  # noqa: E402
from utils import optim, training  # noqa: E402
from utils.checkpoints import load_model  # noqa: E402
from utils.detectors import CONFOUNDING, DETECTORS, Detector, Scores, gradient_scores, rows_per_sample  # noqa: E402
from utils.distributed import all_reduce_sum  # noqa: E402
from utils.gradients import gradient_path, load_gradients  # noqa: E402
from utils.per_sample import tf32_mode, tf32_settings  # noqa: E402
from utils.runtime import loader_workers  # noqa: E402

TOLERANCE = 1e-4  # float32 against the float64 definition, as the tests hold the engine on the CPU
TIMED = (DETECTORS["min"], CONFOUNDING)
T = TypeVar("T")
SECTIONS = {"exactness": "Exactness: tracked on the device vs the float64 CPU loop",
            "tracking": "Tracking speed (images/s; TF32 off)", "training": "Training step speed",
            "epoch": "One epoch of train_energy.py on digits", "paths": "Paths"}


@dataclass(frozen=True)
class Sizes:
    """How much each section measures: ``FULL`` for the figures, ``QUICK`` for a smoke run."""
    archs: tuple[str, ...]
    exact_images: int              # compared against the float64 loop
    loop_images: int               # timed through the loop
    timed_images: int              # timed through the engine and the ceiling
    batch_sizes: tuple[int, ...]   # rows back-propagated at once; the first is tracking's default --batch-size
    vmap_images: int
    vmap_batches: tuple[int, ...]  # images per vmap call
    step_batch: tuple[int, int]    # in-distribution and outlier images per training step
    steps: int                     # timed training steps
    limit: int                     # digits images the training runs use (--limit)
    tracked: int                   # images each tracking run tracks (--limit)


FULL = Sizes(archs=("resnet20", "wrn40_2"), exact_images=32, loop_images=16, timed_images=2048,
             batch_sizes=(256, 1024, 4096), vmap_images=512, vmap_batches=(16, 64, 256), step_batch=(128, 256),
             steps=20, limit=1297, tracked=256)
QUICK = Sizes(archs=("resnet20",), exact_images=4, loop_images=2, timed_images=8, batch_sizes=(256,),
              vmap_images=4, vmap_batches=(4,), step_batch=(16, 32), steps=2, limit=32, tracked=16)


def calibrated_model(arch: str) -> nn.Module:
    """``track_bench``'s random model, float64 on the CPU, with BatchNorm statistics estimated on random images
    as training would leave them (with the initial ones a random WRN's logits reach the hundreds)."""
    model = make_model(arch, "cpu")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(images(32, "cpu", seed=2))
    return model.double().eval()


# 1. exactness

def as_values(scores: Scores, i: int) -> dict[str, float]:
    """Sample ``i``'s values in the form of ``Detector.reference``: every layer, total, extra rows, class."""
    values = {**scores.layers, "total": scores.total, **scores.extra}
    return {**{key: v[i].item() for key, v in values.items()}, "class": int(scores.chosen[i])}


def relative_difference(values: dict[str, float], reference: dict[str, float]) -> float:
    """The largest relative difference of one sample's values from the reference's (the class aside)."""
    return max(abs(values[key] - expected) / abs(expected) for key, expected in reference.items() if key != "class")


def exactness(device: torch.device, sizes: Sizes) -> list[dict]:
    """Each detector tracked on the device in float32 against its float64 definition on the CPU. A float32
    result is exact when each image's difference is within ``TOLERANCE``, or within 10 times the float32 loop's
    own on that image: on a few images a float32 computation, the plain loop included, moves by ~1e-3 (an
    activation within rounding of a ReLU's kink)."""
    rows = []
    for arch in sizes.archs:
        model64 = calibrated_model(arch)
        x64 = images(sizes.exact_images, "cpu", seed=3).double()
        model32 = copy.deepcopy(model64).float()
        model, x = copy.deepcopy(model32).to(device), x64.float().to(device)
        references, floors = {}, {}
        for name, detector in DETECTORS.items():
            references[name] = [detector.reference(model64, image) for image in x64]
            floors[name] = [relative_difference(detector.reference(model32, image.float()), reference)
                            for image, reference in zip(x64, references[name])]
        for tf32 in (False, True):
            _, scores = gradient_scores(model, x, list(DETECTORS.values()), tf32=tf32)
            for name, reference in references.items():
                values = [as_values(scores[name], i) for i in range(len(x))]
                differences = [relative_difference(v, r) for v, r in zip(values, reference)]
                agree = sum(v["class"] == r["class"] for v, r in zip(values, reference))
                exact = all(d <= max(TOLERANCE, 10 * f) for d, f in zip(differences, floors[name]))
                rows.append({"arch": arch, "detector": name, "TF32": "on" if tf32 else "off", "images": len(x),
                             "max relative difference": max(differences),
                             "median": statistics.median(differences),
                             "float32 loop's max": max(floors[name]), "labels agree": f"{agree}/{len(x)}",
                             "ok": None if tf32 else exact and agree == len(x)})
    return rows


# 2. tracking speed

def vmap_scores(model: nn.Module, x: torch.Tensor, detector: Detector) -> Scores:
    """The detector's values by ``torch.func``: per image (``vmap``), a vector-Jacobian product of the tracked
    weights for each of the detector's rows (``vmap`` of the pull-back), then each per-sample gradient's norm."""
    tracked = {name: p.detach() for name, p in models.tracked_parameters(model).items()}
    fixed = {**{name: p.detach() for name, p in model.named_parameters() if name not in tracked},
             **dict(model.named_buffers())}
    requests = detector.requests(list(tracked)[-1])

    def one_image(image: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        logits, pullback = vjp(lambda weights: functional_call(model, {**fixed, **weights}, (image[None],)), tracked)
        (grads,) = vmap(pullback)(detector.output_gradients(logits))  # each weight's gradient for every row
        norms = [{name: torch.linalg.vector_norm(grads[name].flatten(1), p, 1) for name in layers or tracked}
                 for p, layers in requests]
        return logits[0], norms

    logits, norms = vmap(one_image)(x)
    return detector.reduce([{name: v.T for name, v in request.items()} for request in norms], logits)


def vmap_difference(model: nn.Module, x: torch.Tensor, detector: Detector) -> float:
    """The largest relative difference of vmap's totals from the engine's: the two compute the same values."""
    _, scores = gradient_scores(model, x, [detector])
    expected = scores[detector.name].total
    return ((vmap_scores(model, x, detector).total - expected).abs() / expected).max().item()


def unless_out_of_memory(measure: Callable[[], T]) -> T | None:
    """``measure()``, or None if it ran out of GPU memory."""
    try:
        return measure()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def peak_mib(measure: Callable[[], float], device: torch.device) -> tuple[float, float | None]:
    """``measure()`` and the peak GPU memory it allocated (MiB; None on the CPU)."""
    if device.type != "cuda":
        return measure(), None
    torch.cuda.reset_peak_memory_stats(device)
    return measure(), torch.cuda.max_memory_allocated(device) / 2 ** 20


def tracking_speed(device: torch.device, sizes: Sizes) -> list[dict]:
    """Images/s of the loop, the engine and the ceiling (all with TF32 off, as the engine tracks) and of vmap."""
    rows = []
    with tf32_mode(False):
        for arch in sizes.archs:
            model = make_model(arch, str(device))
            x = images(sizes.timed_images, str(device))
            for detector in TIMED:
                rows += speed_rows(model, arch, detector, x, device, sizes)
    return rows


def speed_rows(model: nn.Module, arch: str, detector: Detector, x: torch.Tensor, device: torch.device,
               sizes: Sizes) -> list[dict]:
    """The engine and the ceiling at each ``--batch-size`` (one that runs out of memory is left out), reported
    at the default and the best; the loop; vmap at its best batch."""
    where, per_image = str(device), rows_per_sample([detector], NUM_CLASSES)
    loop_rate = throughput(lambda b: loop(model, b, [detector]), x[:sizes.loop_images], 1, where)
    vmap_rates = {batch: unless_out_of_memory(lambda batch=batch: throughput(
                      lambda b: vmap_scores(model, b, detector), x[:sizes.vmap_images], batch, where))
                  for batch in sizes.vmap_batches}
    vmap_rate, vmap_batch = max((rate, batch) for batch, rate in vmap_rates.items() if rate is not None)
    measured = {}
    for batch_size in sizes.batch_sizes:
        per_batch = max(1, batch_size // per_image)
        measured[batch_size] = unless_out_of_memory(lambda per_batch=per_batch: (
            *peak_mib(lambda: throughput(lambda b: engine(model, b, [detector]), x, per_batch, where), device),
            throughput(lambda b: ceiling(model, b, [detector]), x, per_batch, where)))
    default = sizes.batch_sizes[0]
    best = max((b for b in measured if measured[b]), key=lambda b: measured[b][0])
    labels = {default: "default", best: "best"} if best != default else {default: "default, best"}
    agreement = vmap_difference(model, x[:4], detector)
    rows = []
    for batch_size, label in labels.items():
        rate, peak, ceiling_rate = measured[batch_size]
        rows.append({"arch": arch, "detector": detector.name, "--batch-size": f"{batch_size} ({label})",
                     "loop": loop_rate, "engine": rate, "ceiling": ceiling_rate, "engine ÷ loop": rate / loop_rate,
                     "engine ÷ ceiling": rate / ceiling_rate, "peak MiB": peak,
                     "vmap (best batch)": f"{vmap_rate:.1f} ({vmap_batch} images)", "engine ÷ vmap": rate / vmap_rate,
                     "vmap vs engine": agreement,
                     "targets met": rate >= 20 * loop_rate and rate >= 0.8 * ceiling_rate and rate > vmap_rate})
    return rows


# 3. training speed

def step_rate(arch: str, device: torch.device, amp: torch.dtype | None, channels_last: bool, sizes: Sizes) -> float:
    """Images per second (in-distribution and outlier together) of ``train_energy.py``'s step on random
    CIFAR-shaped batches: autocast forward, the energy loss with its default margins, backward, SGD."""
    defaults = train_energy.parse_args(["--name=step"])
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = models.get_model(arch, NUM_CLASSES).to(device, memory_format=memory_format).train()
    optimizer = optim.sgd(model, defaults.lr, defaults.weight_decay)
    n_in, n_out = sizes.step_batch
    x_in, x_out = (images(n, str(device), seed).to(memory_format=memory_format) for n, seed in ((n_in, 4), (n_out, 5)))
    batch_in, batch_out = (x_in, torch.arange(n_in, device=device) % NUM_CLASSES), (x_out, None)

    def step(_: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, _, _ = train_energy.energy_loss(model, batch_in, batch_out, lamb=defaults.lamb, m_in=defaults.m_in,
                                                  m_out=defaults.m_out, T=defaults.T)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    steps_per_second = throughput(step, torch.empty(sizes.steps), 1, str(device))  # one "image" = one step
    return steps_per_second * (n_in + n_out)


def training_speed(device: torch.device, sizes: Sizes) -> list[dict]:
    """The step's images/s in float32 and bf16 AMP (CUDA only, as in training), channels_last off and on."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training.start sets it
    precisions = {"float32": None, "bf16 AMP": torch.bfloat16} if device.type == "cuda" else {"float32": None}
    return [{"arch": arch, "images a step": "+".join(map(str, sizes.step_batch)), "precision": precision,
             "channels_last": "on" if channels_last else "off",
             "images/s": step_rate(arch, device, amp, channels_last, sizes)}
            for arch in sizes.archs for precision, amp in precisions.items() for channels_last in (False, True)]


class TimedLoader:
    """A DataLoader that adds the time spent waiting for each of its batches to ``waiting[0]``."""

    def __init__(self, loader: torch.utils.data.DataLoader, waiting: list[float]):
        self.loader, self.waiting = loader, waiting

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.waiting[0] += time.perf_counter() - started
            yield batch


def digits_epoch(device: torch.device, sizes: Sizes, folder: Path) -> list[dict]:
    """One epoch of ``train_energy.main`` itself on the bundled digits, with its own loaders, whose waits are
    timed (``TimedLoader``); the rest of the epoch's time (from its log) is computing."""
    waiting = [0.0]
    run_loaders = training.Run.loader, training.Run.outlier_loader
    training.Run.loader = lambda run, *a, **k: TimedLoader(run_loaders[0](run, *a, **k), waiting)
    training.Run.outlier_loader = lambda run, *a, **k: TimedLoader(run_loaders[1](run, *a, **k), waiting)
    try:
        train_energy.main(["--name=epoch", "--epochs=1", *digits_arguments(device, sizes, folder)])
    finally:
        training.Run.loader, training.Run.outlier_loader = run_loaders
    with open(folder / "checkpoints" / "digits" / "epoch" / "log.csv") as f:
        seconds = float(next(csv.DictReader(f))["seconds"])
    return [{"arch": "resnet20", "training images": sizes.limit, "images a step": "+".join(map(str, sizes.step_batch)),
             "loader workers": loader_workers(None, device),
             "epoch (s, training + test accuracy)": seconds, "waiting for training data (s)": waiting[0],
             "computing (s)": seconds - waiting[0], "bound by": "data" if waiting[0] > seconds / 2 else "computing"}]


# 4. paths

def digits_arguments(device: torch.device, sizes: Sizes, folder: Path) -> list[str]:
    """The training options every run here shares: the bundled digits and photo crops, this device."""
    n_in, n_out = sizes.step_batch
    return ["--in-dataset=digits", "--aux-dataset=sample_photos", f"--limit={sizes.limit}",
            f"--batch-size={n_in}", f"--oe-batch-size={n_out}", f"--gpu={gpu_flag(device)}",
            f"--checkpoint-root={folder / 'checkpoints'}", f"--data-root={folder / 'data'}"]


def gpu_flag(device: torch.device) -> int:
    return (device.index or 0) if device.type == "cuda" else -1


def run_command(path: str, arguments: list[str], folder: Path, check: Callable[[str], str]) -> dict:
    """Run ``python ARGUMENTS`` in ``folder``; ok when it exits 0 and ``check(its output)`` (which loads what it
    wrote and says what it found) raises nothing."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *arguments], cwd=folder, capture_output=True, text=True, timeout=600)
    row = {"path": path, "exit status": result.returncode, "seconds": time.perf_counter() - started}
    output = result.stdout + result.stderr
    try:
        if result.returncode:
            raise RuntimeError(output[-1500:])
        row["outputs"], row["ok"] = check(output), True
    except Exception as error:  # recorded in the report, with the command's output
        row["outputs"], row["ok"] = f"{type(error).__name__}: {error}", False
    return row


def loads_model(folder: Path, name: str, device: torch.device) -> Callable[[str], str]:
    def check(output: str) -> str:
        model, meta = load_model("digits", name, device=device, root=folder / "checkpoints")
        assert meta["epoch"] == 1, meta["epoch"]
        assert model(torch.rand(2, 3, 32, 32, device=device)).isfinite().all()
        return f"checkpoints/digits/{name}/last.pt loads (epoch 1)"
    return check


def all_reduce(device: torch.device) -> dict:
    """``utils.distributed.all_reduce_sum`` in a one-process group: NCCL on CUDA, gloo on the CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend, started = "nccl" if device.type == "cuda" else "gloo", time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        total = all_reduce_sum(torch.ones(4, device=device)).sum().item()
    finally:
        dist.destroy_process_group()
    return {"path": f"{backend} all-reduce (one-process group)", "exit status": 0,
            "seconds": time.perf_counter() - started, "outputs": f"sum {total:g}", "ok": total == 4}


def paths(device: torch.device, sizes: Sizes, folder: Path, quick: bool) -> list[dict]:
    cuda, common = device.type == "cuda", digits_arguments(device, sizes, folder)
    train = [str(ROOT / "train_energy.py"), "--epochs=1", *common]
    first = "bf16" if cuda else "cpu"  # the CPU always trains in float32
    rows = [run_command("train_energy.py --amp bf16" if cuda else "train_energy.py (float32: the CPU)",
                        [*train, f"--name={first}", "--amp=bf16"], folder, loads_model(folder, first, device))]
    if cuda:
        rows.append(run_command("train_energy.py --amp fp16 (loss scaling)", [*train, "--name=fp16", "--amp=fp16"],
                                folder, loads_model(folder, "fp16", device)))
    resumed = "fp16" if cuda else first
    rows.append(run_command(f"train_energy.py --resume (the {resumed} run)",
                            [*train, f"--name={resumed}", "--amp=fp16" if cuda else "--amp=bf16", "--resume"], folder,
                            restored))
    if quick and not cuda:
        rows.append({"path": "torchrun", "outputs": "skipped: --quick on the CPU", "ok": None})
    else:  # one process creates no process group: NCCL is then checked by the all-reduce below
        processes = min(2, torch.cuda.device_count()) if cuda else 2
        backend = ("NCCL" if cuda else "gloo") if processes > 1 else "one process"
        rows.append(run_command(f"torchrun --nproc_per_node={processes} ({backend})",
                                ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *train,
                                 "--name=torchrun"], folder, loads_model(folder, "torchrun", device)))
    rows.append(all_reduce(device))
    track = [str(ROOT / "track_gradient.py"), f"--name={first}", "--dataset=gaussian", "--in-dataset=digits",
             f"--limit={sizes.tracked}", "--batch-size=40", f"--gpu={gpu_flag(device)}",
             f"--checkpoint-root={folder / 'checkpoints'}", f"--gradient-root={folder / 'gradients'}",
             f"--data-root={folder / 'data'}"]
    rows.append(run_command("track_gradient.py --shard 0/2", [*track, "--shard=0/2"], folder,
                            lambda out: part_saved(folder / "gradients", first)))
    rows.append(run_command("track_gradient.py --shard 1/2 (merges)", [*track, "--shard=1/2"], folder,
                            lambda out: merged(folder / "gradients", first, sizes.tracked)))
    return rows


def restored(output: str) -> str:
    assert "resuming" in output, "the run did not resume"
    return "last.pt restored (optimizer, scheduler, scaler, RNG states); nothing left to train"


def part_saved(root: Path, name: str) -> str:
    path = gradient_path("digits", name, "min", "gaussian", root).with_name("gaussian.shard0of2.pkl")
    record = load_gradients(path)
    assert record["shard"]["index"] == 0 and record["num_samples"] > 0, record["shard"]
    return f"{path.name}: {record['num_samples']} samples"


def merged(root: Path, name: str, num_samples: int) -> str:
    files = [gradient_path("digits", name, "min", dataset, root) for dataset in ("digits", "gaussian")]
    for path in files:
        record = load_gradients(path)
        assert record["num_samples"] == len(record["total"]) == num_samples, (path, record["num_samples"])
    leftover = list(root.rglob("*.shard*"))
    assert not leftover, leftover
    return f"merged {', '.join(p.name for p in files)}: {num_samples} samples each, no parts left"


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
