"""Start-up helpers: the CPU fallback said once and plainly, progress bars only on a terminal."""
import io
import warnings

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
