"""Checkpoints: ``checkpoints/<in-dataset>/<name>/``.

* ``epoch_<N>.pt`` — ``{"state_dict", "meta"}`` after epoch N (1-based);
* ``last.pt``      — the same for the newest epoch plus ``"train_state"`` (optimizer, scheduler, RNG
  states …) from which ``--resume`` continues exactly;
* ``meta.json``    — the metadata in readable form; ``log.csv`` — one row per epoch.

``meta`` holds what is needed to rebuild the model (``arch``, ``num_classes``, ``mean``, ``std``,
``arch_kwargs``) and what it is (``name``, ``in_dataset``, ``loss``, ``epoch``, ``args``).
"""
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from utils.errors import UserError
from utils.io import atomic_write

CHECKPOINT_ROOT = "checkpoints"
TRAIN_COMMANDS = {"energy": "train_energy.py", "bce": "train_original.py"}


def checkpoint_dir(in_dataset: str, name: str, root: str | Path = CHECKPOINT_ROOT) -> Path:
    return Path(root) / in_dataset / name


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(directory: str | Path, model: nn.Module, meta: dict, train_state: dict | None = None) -> None:
    """Write ``epoch_<meta['epoch']>.pt``, then ``last.pt`` (with ``train_state``) and ``meta.json``."""
    directory = Path(directory)
    state_dict = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    save_torch({"state_dict": state_dict, "meta": meta}, directory / f"epoch_{meta['epoch']}.pt")
    save_torch({"state_dict": state_dict, "meta": meta, "train_state": train_state}, directory / "last.pt")
    atomic_write(directory / "meta.json", lambda f: f.write(json.dumps(meta, indent=2, default=str).encode()))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel / DataParallel / compiled wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def build_model(meta: dict) -> nn.Module:
    """A fresh model of the architecture, classes and normalisation that ``meta`` describes."""
    return models.get_model(meta["arch"], meta["num_classes"], meta["mean"], meta["std"], **meta.get("arch_kwargs", {}))


def checkpoint_path(in_dataset: str, name: str, epoch: int | None = None, root: str | Path = CHECKPOINT_ROOT) -> Path:
    directory = checkpoint_dir(in_dataset, name, root)
    return directory / ("last.pt" if epoch is None else f"epoch_{epoch}.pt")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The raw checkpoint dict; a missing file is a ``UserError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=device, weights_only=True)


def load_model(in_dataset: str, name: str, epoch: int | None = None, device: str | torch.device = "cpu",
               root: str | Path = CHECKPOINT_ROOT, arch: str | None = None) -> tuple[nn.Module, dict]:
    """Load the model trained as ``checkpoints/<in_dataset>/<name>/`` (``epoch=None``: the last epoch).

    Returns the model in eval mode on ``device`` and its metadata, with ``checkpoint`` (the file read) and
    ``checkpoint_sha256`` (the start of its content's hash) added. A missing checkpoint, or one whose
    metadata disagrees with ``in_dataset`` or ``arch``, is a ``UserError`` that names the command that
    trains the right one.
    """
    path = checkpoint_path(in_dataset, name, epoch, root)
    train_hint = (f"train it with `python train_energy.py --name={name} --in-dataset={in_dataset}` "
                  f"(or train_original.py for a BCE model)")
    if not path.is_file():
        where = f"epoch {epoch} of " if epoch is not None else ""
        available = sorted(p.name for p in path.parent.glob("epoch_*.pt")) if path.parent.is_dir() else []
        raise UserError(f"no checkpoint for {where}model {name!r} on {in_dataset}: {path} does not exist"
                        + (f" (present: {', '.join(available)})" if available else "") + f"; {train_hint}.")
    content = path.read_bytes()
    checkpoint = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    meta = dict(checkpoint["meta"])
    if meta.get("in_dataset") != in_dataset:
        raise UserError(f"{path} was trained on {meta.get('in_dataset')}, not {in_dataset}; {train_hint}.")
    if arch is not None and meta.get("arch") != arch:
        raise UserError(f"{path} is a {meta.get('arch')}, not a {arch}; {train_hint} --model-arch={arch}.")
    model = build_model(meta)
    model.load_state_dict(checkpoint["state_dict"])
    meta["checkpoint"] = str(path)
    meta["checkpoint_sha256"] = hashlib.sha256(content).hexdigest()[:16]  # tells a retrained model apart
    return model.to(device).eval(), meta
