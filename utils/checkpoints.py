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
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import models
from utils.errors import UnreadableFileError, UserError, unreadable
from utils.io import atomic_write

CHECKPOINT_ROOT = "checkpoints"
TRAIN_COMMANDS = {"energy": "train_energy.py", "bce": "train_original.py"}
META_KEYS = ("arch", "num_classes", "mean", "std", "in_dataset")  # what rebuilds and identifies a model


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


def saved_epochs(directory: str | Path) -> list[int]:
    """The epochs N of the ``epoch_<N>.pt`` files in ``directory``, in increasing order."""
    numbers = (path.stem.removeprefix("epoch_") for path in Path(directory).glob("epoch_*.pt"))
    return sorted(int(number) for number in numbers if number.isdigit())


def _ranges(epochs: list[int], form: str = "{}") -> str:
    """``[1, 2, 3, 5]`` as ``"1 to 3, 5"``, each epoch written as ``form.format(epoch)``."""
    spans: list[list[int]] = []
    for epoch in epochs:
        if spans and epoch == spans[-1][1] + 1:
            spans[-1][1] = epoch
        else:
            spans.append([epoch, epoch])
    return ", ".join(form.format(first) + ("" if first == last else f" to {form.format(last)}")
                     for first, last in spans)


def describe_checkpoints(directory: str | Path) -> str:
    """What a run folder holds, e.g. ``epoch_1.pt to epoch_100.pt, last.pt``."""
    last = "last.pt" if (Path(directory) / "last.pt").is_file() else ""
    names = [_ranges(saved_epochs(directory), "epoch_{}.pt"), last]
    return ", ".join(name for name in names if name)


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = [repr(key) for key in list(obj)[:4]]
        return f"a dict with keys {', '.join(keys)}{' …' if len(obj) > 4 else ''}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def _parse_checkpoint(content: bytes, path: Path, remedy: str, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dict in ``content`` (the bytes of ``path``), checked to be one these scripts wrote."""
    try:
        checkpoint = torch.load(io.BytesIO(content), map_location=device, weights_only=True)
    except Exception as error:  # a truncated or foreign file fails in many ways (Runtime-, EOF-, KeyError …)
        raise unreadable(path, "checkpoint", error, remedy) from None
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    if not (isinstance(meta, dict) and isinstance(checkpoint.get("state_dict"), dict)
            and all(key in meta for key in META_KEYS)):
        raise UnreadableFileError(
            f"{path} holds {_describe(checkpoint)}, not a checkpoint of train_energy.py or train_original.py: "
            f"a dict of 'state_dict' and 'meta', the metadata ({', '.join(META_KEYS)}) that rebuilds the model "
            f"(a bare state dict lacks it). {remedy}")
    return checkpoint


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dict in ``path``; a missing, unreadable or foreign file is a ``UserError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return _parse_checkpoint(path.read_bytes(), path, "Copy it again, or train it again with train_energy.py or "
                             "train_original.py (--overwrite).", device)


def load_model(in_dataset: str, name: str, epoch: int | None = None, device: str | torch.device = "cpu",
               root: str | Path = CHECKPOINT_ROOT, arch: str | None = None) -> tuple[nn.Module, dict]:
    """Load the model trained as ``checkpoints/<in_dataset>/<name>/`` (``epoch=None``: the last epoch).

    Returns the model in eval mode on ``device`` and its metadata, with ``checkpoint`` (the file read) and
    ``checkpoint_sha256`` (the start of its content's hash) added. A missing or unreadable checkpoint, one
    whose metadata disagrees with ``in_dataset`` or ``arch``, or an ``epoch`` that was not saved is a
    ``UserError`` that says what to do.
    """
    path = checkpoint_path(in_dataset, name, epoch, root)
    train_hint = (f"train it with `python train_energy.py --name={name} --in-dataset={in_dataset}` "
                  f"(or train_original.py for a BCE model)")
    if not path.is_file():
        epochs = saved_epochs(path.parent)
        if epoch is not None and epochs:
            raise UserError(f"model {name!r} on {in_dataset} has no epoch {epoch}: {path} does not exist. "
                            f"{path.parent} holds epochs {_ranges(epochs)}: use one of these with --epoch, "
                            f"or leave --epoch out for the last.")
        raise UserError(f"no checkpoint for model {name!r} on {in_dataset}: {path} does not exist; {train_hint}.")
    content = path.read_bytes()
    checkpoint = _parse_checkpoint(content, path, f"Copy it again, or {train_hint}.")
    meta = dict(checkpoint["meta"])
    if meta["in_dataset"] != in_dataset:
        raise UserError(f"{path} was trained on {meta['in_dataset']}, not {in_dataset}; {train_hint}.")
    if arch is not None and meta["arch"] != arch:
        raise UserError(f"{path} holds a {meta['arch']}, not the {arch} that --model-arch={arch} asks for: "
                        f"pass --model-arch={meta['arch']} (or leave it out).")
    model = build_model(meta)
    model.load_state_dict(checkpoint["state_dict"])
    meta["checkpoint"] = str(path)
    meta["checkpoint_sha256"] = hashlib.sha256(content).hexdigest()[:16]  # tells a retrained model apart
    return model.to(device).eval(), meta


def rng_state(device: torch.device) -> dict:
    """Python's, NumPy's and torch's random states in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
