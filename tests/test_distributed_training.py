"""Training under ``torchrun`` with DistributedDataParallel, on the CPU with gloo and two processes."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import train_energy
from utils import training
from utils.checkpoints import load_model, unwrap
from utils.data import get_dataset

pytestmark = pytest.mark.slow  # minutes on two CPU cores: `pytest -m "not slow"` skips it

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_writes_a_checkpoint_that_loads(tmp_path):
    result = subprocess.run(  # python -m torch.distributed.run is torchrun
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train_energy.py"), "--name=ddp",
         f"--checkpoint-root={tmp_path}", "--in-dataset=digits", "--aux-dataset=sample_photos", "--limit=32",
         "--batch-size=8", "--oe-batch-size=8", "--epochs=1", "--workers=0", "--gpu=-1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("epoch 1/1  lr") == 1  # one log line: rank 0 only
    assert "2 process(es)" in result.stdout
    model, meta = load_model("digits", "ddp", root=tmp_path)
    assert meta["epoch"] == 1 and meta["loss"] == "energy"
    assert not any(key.startswith("module.") for key in model.state_dict())
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert sorted(p.name for p in (tmp_path / "digits" / "ddp").iterdir()) == \
        ["epoch_1.pt", "last.pt", "log.csv", "meta.json"]


def first_step_gradients(argv: list[str]) -> dict[str, torch.Tensor]:
    """The gradients of train_energy.py's first step, built as its ``main`` builds them, except that
    the images are not augmented and BatchNorm is in eval mode (running statistics): then every sample's
    loss term is independent of how the batch is split over processes. (``--sync-bn`` would do the same
    for train-mode BatchNorm, but SyncBatchNorm runs only on CUDA.)"""
    args = train_energy.parse_args(argv)
    with training.start(args, loss="energy") as run:
        model = run.model()
        in_loader = run.loader(get_dataset("digits", train=False), args.batch_size)
        out_loader = run.outlier_loader(get_dataset("sample_photos", train=False, num_samples=500),
                                        args.oe_batch_size, steps=len(in_loader))
        model.eval()
        batch_in, batch_out = next(zip(in_loader, out_loader))
        loss, _, _ = train_energy.energy_loss(model, batch_in, batch_out, lamb=args.lamb, m_in=args.m_in,
                                              m_out=args.m_out, T=args.T)
        loss.backward()
        return {name: p.grad.clone() for name, p in unwrap(model).named_parameters()}


def _worker(rank: int, world_size: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    gradients = first_step_gradients(argv)
    if rank == 0:
        torch.save(gradients, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_compute_the_gradient_of_the_global_batch(tmp_path):
    common = [f"--checkpoint-root={tmp_path}", "--in-dataset=digits", "--aux-dataset=sample_photos", "--gpu=-1",
              "--workers=0", "--batch-size=16", "--oe-batch-size=32",  # global batches: 8 + 16 per process
              "--m_out=100"]  # no outlier energy exceeds it: every outlier adds to the gradient
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), ["--name=ddp", *common], str(out)), nprocs=2)
    distributed = torch.load(out, weights_only=True)
    single = first_step_gradients(["--name=single", *common])

    assert distributed.keys() == single.keys()
    for name, gradient in single.items():
        assert gradient.abs().sum() > 0, name
        # float32 sums in a different order: equal up to rounding at the scale of the tensor
        torch.testing.assert_close(distributed[name], gradient, rtol=1e-4, atol=1e-5 * gradient.abs().max().item())
