"""A training run's folder and exact resumption: what ``utils.training.start`` checks before a run, what each
epoch saves, and what ``--resume`` loads back.

``last.pt`` carries, beside the weights, the optimizer, scheduler and AMP-scaler states, the RNG states of
every process and the log so far, so a resumed run continues exactly as if it had not stopped.
"""
from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from utils import distributed
from utils.checkpoints import (
    TRAIN_COMMANDS,
    describe_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from utils.errors import UserError
from utils.io import atomic_write
from utils.runtime import seed_everything

# Arguments that may change between a run and its --resume: where things are, not what is trained.
OPERATIONAL_ARGS = ("gpu", "workers", "data_root", "checkpoint_root", "resume", "overwrite", "amp")


@dataclass
class RunFolder:
    """One training run in this process: its arguments, place in the job, device and checkpoint folder — what
    saving and resuming need (``utils.training.Run`` adds the steps of an epoch)."""
    args: argparse.Namespace
    loss: str  # "energy" | "bce", recorded in the checkpoint
    dist: distributed.Context
    device: torch.device
    directory: Path
    checkpoint: dict | None  # the run's last.pt when resuming
    meta: dict = field(default_factory=dict)  # filled in by Run.model()

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def print(self, *values: Any) -> None:
        if self.is_main:
            print(*values, flush=True)


@dataclass
class TrainState:
    """How far a run has come: epochs done, the log rows so far, the AMP loss scaler, steps this session."""
    epoch: int
    history: list[dict]
    scaler: torch.amp.GradScaler
    steps: int = 0


def check_arguments(args: argparse.Namespace, context: distributed.Context, device: torch.device) -> None:
    """Refuse arguments no run can use, before anything is loaded."""
    for option in ("epochs", "batch_size", "oe_batch_size", "limit"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} must be positive, got {value}.")
    for option in ("batch_size", "oe_batch_size"):
        value = getattr(args, option, None)
        if value is not None and value % context.world_size:
            raise UserError(f"--{option.replace('_', '-')}={value} is the global batch and must split evenly "
                            f"over the {context.world_size} processes.")
    if args.sync_bn and context.enabled and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation); drop it on the CPU.")
    if args.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; use --amp=fp16 or --amp=off.")


def prepare_directory(directory: Path, args: argparse.Namespace, loss: str,
                      context: distributed.Context) -> dict | None:
    """Check the checkpoint folder against ``--resume``/``--overwrite``; returns ``last.pt`` when resuming."""
    last = directory / "last.pt"
    trained = sorted(p.name for p in directory.glob("epoch_*.pt")) + (["last.pt"] if last.is_file() else [])
    if args.resume:
        if not last.is_file():
            raise UserError(f"nothing to resume: {last} does not exist; start the run without --resume.")
        checkpoint = load_checkpoint(last)
        _check_same_run(checkpoint["meta"], args, loss, last)
        return checkpoint
    if trained and not args.overwrite:
        raise UserError(f"{directory} already holds a trained model ({describe_checkpoints(directory)}); continue it "
                        f"with --resume or start over with --overwrite.")
    if trained and context.is_main:
        for name in trained + ["meta.json", "log.csv"]:
            (directory / name).unlink(missing_ok=True)
    return None


def _check_same_run(meta: dict, args: argparse.Namespace, loss: str, path: Path) -> None:
    if meta.get("loss") != loss:
        raise UserError(f"{path} was trained with the {meta.get('loss')} loss; resume it with "
                        f"{TRAIN_COMMANDS.get(meta.get('loss'), 'its own script')}.")
    saved, given = meta.get("args", {}), vars(args)
    differences = [f"--{key.replace('_', '-')}: {saved.get(key)!r} in the run, {given.get(key)!r} now"
                   for key in sorted(set(saved) | set(given))
                   if key not in OPERATIONAL_ARGS and saved.get(key) != given.get(key)]
    if differences:
        raise UserError(f"--resume continues {path} with its own arguments (see meta.json next to it), but these "
                        f"differ: {'; '.join(differences)}. Repeat the run's arguments, or start a new run.")


def save_epoch(run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
               state: TrainState) -> None:
    """Save the epoch's checkpoint with everything ``--resume`` needs (every process's RNG state), and the log."""
    rng_states = distributed.all_gather_object(rng_state(run.device))
    if not run.is_main:
        return
    meta = {**run.meta, "epoch": state.history[-1]["epoch"]}
    train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": state.scaler.state_dict(), "rng": rng_states, "history": state.history}
    save_checkpoint(run.directory, model, meta, train_state)
    _write_log(run.directory / "log.csv", state.history)


def restore(run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
            scaler: torch.amp.GradScaler) -> tuple[int, list[dict]]:
    """Load the run's ``last.pt`` into the model and training state; returns (epochs done, log so far)."""
    checkpoint, epoch = run.checkpoint, run.checkpoint["meta"]["epoch"]
    unwrap(model).load_state_dict(checkpoint["state_dict"])
    state = checkpoint["train_state"]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == run.dist.world_size:
        set_rng_state(state["rng"][run.dist.rank], run.device)
    else:
        run.print(f"note: resuming a {len(state['rng'])}-process run on {run.dist.world_size} process(es); "
                  f"the random streams from here on differ from an uninterrupted run.")
        seed_everything(run.args.seed + 1000 * epoch + run.dist.rank)
    run.print(f"resuming {run.directory / 'last.pt'} after epoch {epoch}")
    return epoch, list(state["history"])


def _write_log(path: Path, history: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
