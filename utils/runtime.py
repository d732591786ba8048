"""What every script needs at start-up: the device from ``--gpu``, seeding, progress bars, the C allocator's
settings, and clean exits on user errors."""
import ctypes
import os
import platform
import random
import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from utils.errors import UserError

_said_cpu_fallback = False


def get_device(gpu: int | str | None) -> torch.device:
    """``--gpu=N`` → ``cuda:N``; the CPU when CUDA is absent (saying so on stderr, once a process);
    ``None`` or ``-1`` → CPU."""
    global _said_cpu_fallback
    if gpu is None or str(gpu) in ("", "-1", "cpu"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if not _said_cpu_fallback:
            print(f"warning: --gpu={gpu}: CUDA is not available; running on the CPU.", file=sys.stderr)
            _said_cpu_fallback = True
        return torch.device("cpu")
    index = int(gpu)
    if index >= torch.cuda.device_count():
        raise UserError(f"--gpu={gpu}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    return torch.device(f"cuda:{index}")


def progress(iterable: Iterable | None = None, **options) -> tqdm:
    """``tqdm(iterable, **options)``, shown only when it writes to a terminal (tqdm's ``disable=None``): in
    a log file, a bar's carriage-return updates pile up into lines thousands of characters long.
    ``disable=True`` still hides it everywhere."""
    return tqdm(iterable, **{**options, "disable": True if options.get("disable") else None})


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let the C allocator keep the memory torch frees on the CPU and hand it out again, rather than return each
    large block to the system and fault fresh pages in for the next one. glibc maps every block above its
    threshold (at most 32 MiB) anew and gives it back when freed: tracking WRN-40-2 at 256 images a batch spent
    about a sixth of its time faulting in and zero-filling pages (``docs/speed.md``), and a larger
    ``--batch-size`` was slower per image. Here large blocks come from the heap, which is trimmed only above
    2 GiB free: the process keeps its peak memory until it exits, as a caching allocator does. True where it
    applies (Linux with glibc); elsewhere it changes nothing."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def run_script(main: Callable[[], None]) -> None:
    """Run a script's ``main`` (with ``keep_freed_memory``); a ``UserError`` becomes one line on stderr and exit
    status 2."""
    keep_freed_memory()
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def default_workers() -> int:
    """DataLoader workers: up to 4, never more than the CPUs this process may use."""
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def loader_workers(requested: int | None, device: torch.device) -> int:
    """``--workers`` if given; else ``default_workers()`` on CUDA and 0 on the CPU, where loader processes
    would compete with the computation for the same cores."""
    if requested is not None:
        return requested
    return default_workers() if device.type == "cuda" else 0


# What makes a CPU run's numbers the same on another x86-64 machine (docs/demo.md, "What the numbers depend on"):
# the thread count, and the kernels torch's ATen, oneDNN and MKL pick by instruction set (MKL also by CPU vendor:
# on this project's AMD CPUs it does not take its AVX2 path unless asked). Set here where the user has not.
PINNED_KERNELS = {"OMP_NUM_THREADS": "2", "MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                  "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pinned_kernel_env() -> dict[str, str]:
    """The environment for the demo's and the benchmarks' script runs: ``os.environ`` with ``PINNED_KERNELS``
    added where unset, on a CPU with AVX2 or AVX-512 (elsewhere the thread count alone)."""
    pinned = PINNED_KERNELS if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else {
        "OMP_NUM_THREADS": PINNED_KERNELS["OMP_NUM_THREADS"]}
    return {**pinned, **os.environ}


def describe_kernels(env: dict[str, str]) -> str:
    """``PINNED_KERNELS``' variables as ``env`` sets them, for a run's first line."""
    return " ".join(f"{key}={env[key]}" for key in PINNED_KERNELS if key in env)
