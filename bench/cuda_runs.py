"""The sections of ``bench/cuda_check.py`` that run the project's scripts: one real epoch of
``train_energy.py`` on the digits, and every path (AMP, ``--resume``, torchrun, the process group, shards).

Imported by ``bench/cuda_check.py``, which puts the project's root and ``bench/`` on the path."""
from __future__ import annotations

import csv
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from cuda_sizes import Sizes

import train_energy
from utils import training
from utils.checkpoints import load_model
from utils.distributed import all_reduce_sum
from utils.gradients import gradient_path, load_gradients
from utils.runtime import loader_workers

ROOT = Path(__file__).resolve().parents[1]


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


