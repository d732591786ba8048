"""Start-up helpers: the CPU fallback said once and plainly, progress bars only on a terminal, freed memory kept for
reuse, the pinned threads and kernels of the documented runs."""
import io
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from utils import runtime
from utils.runtime import get_device, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cpu_fallback_is_said_once_a_process_without_a_source_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_said_cpu_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [get_device(gpu) for gpu in (0, "0", "1")] == [torch.device("cpu")] * 3
    assert caught == []
    assert capsys.readouterr().err == "warning: --gpu=0: CUDA is not available; running on the CPU.\n"
    monkeypatch.setattr(runtime, "_said_cpu_fallback", False)
    assert get_device(-1) == get_device(None) == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_progress_bars_only_on_a_terminal(monkeypatch):
    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        monkeypatch.setattr("sys.stderr", stream)
        assert list(progress(range(5), desc="epoch 1/3")) == [0, 1, 2, 3, 4]
    assert log.getvalue() == ""
    assert "epoch 1/3" in terminal.getvalue() and "5/5" in terminal.getvalue()
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    assert list(progress(range(3), disable=True)) == [0, 1, 2] and quiet.getvalue() == ""
    with progress(total=4, unit="img") as bar:  # the form tracking uses: no iterable, updated by hand
        bar.update(4)
    assert "4/4" in quiet.getvalue()


FAULTS_OF_FRESH_BLOCKS = """
import resource, sys, torch
from utils.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rounds(n):
    for _ in range(n):
        torch.ones(2 ** 24).sum()  # 64 MiB, freed at once
rounds(10)  # the heap settles
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_reused_rather_than_faulted_in_again():
    """A 64 MiB tensor allocated and freed 20 times: glibc maps it anew each time (16,384 fresh 4 KiB pages to fault
    in and zero) unless ``keep_freed_memory`` has told it to keep freed blocks for reuse (then the heap may still
    grow a few times while small allocations fragment it)."""
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_FRESH_BLOCKS, mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1])
        return int(run.stdout)
    fresh = faults("default")
    assert fresh >= 20 * 16_000
    assert faults("keep") < fresh / 2


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_pinned_kernels_are_set_where_unset_and_reach_a_child(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting wins
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    env = runtime.pinned_kernel_env()
    assert env["OMP_NUM_THREADS"] == "1"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        assert "ATEN_CPU_CAPABILITY" not in env
        return
    assert {key: env[key] for key in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")} == {
        "MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert runtime.describe_kernels(env).startswith("OMP_NUM_THREADS=1 MKL_CBWR=AVX2")
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability(), "
                            "torch.get_num_threads())"], env=env, capture_output=True, text=True, check=True)
    assert child.stdout.split() == ["AVX2", "1"]
