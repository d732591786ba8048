"""The files that hold per-sample gradient norms (the engine that computes them is ``utils.per_sample``,
the detectors that say which gradients ``utils.detectors``).

A gradients file is ``gradients/<in-dataset>/<name>/<detector>/<dataset>.pkl`` (the confounding label's
folder is ``original``; with ``--layers last``, ``<detector>-last``, so that last-layer files never replace
full ones), a pickled dict::

    {"version": 1,
     "model":   {"name", "arch", "in_dataset", "num_classes", "checkpoint", "epoch", "checkpoint_sha256"},
     "method":  "norm" | "original",   "score": "min" | "max" | "pred" | "gradnorm" | "exgrad" | None,
     "dataset": "LSUN",                "num_samples": N,
     "norm":    "L2" | "L1" | "none",                # the norm of every layer value (GradNorm: L1; ODIN: none)
     "layers":  {"conv1.weight": float32[N], ...},   # per-layer norms, model order
     "total":   float32[N],                          # the same norm over all tracked layers together
     "extra":   {"fc.weight:L1": float32[N]},        # further rows a detector defines (ExGrad's paper form)
     "options": {"temperature": 1.0},                # settings that change the values (GradNorm's T, ODIN's
                                                     # T and epsilon; "layers": "last" for --layers last)
     "class":   int64[N],  "pred": int64[N],  "label": int64[N] (-1 for OOD),
     "msp": float32[N],  "energy": float32[N],       # output-based baselines, same pass
     "features": {"penultimate": float32[N, D], ...},  # per-sample vectors a detector or baseline fits on
     "head":    {"weight": float32[K, D], "bias": float32[K]}}  # the last layer: logits = W h + b (baselines)

``norm``, ``extra``, ``options``, ``features`` and ``head`` are optional when reading (files of the seed's
format are L2 and have none).

It is written atomically and read back with a restricted unpickler that admits only builtin
containers and numpy arrays, so a file from elsewhere cannot run code.
"""
import io
import pickle
import re
from pathlib import Path

import numpy as np

from utils.detectors import TRACK_GRADIENT_SCORES, Detector
from utils.errors import UserError
from utils.io import atomic_write

FORMAT_VERSION = 1
GRADIENT_ROOT = "gradients"
METHODS = ("norm", "original")
NORMS = ("L2", "L1", "none")
MODEL_KEYS = ("name", "arch", "in_dataset", "num_classes", "checkpoint", "epoch")
# Written by the tracking scripts beside MODEL_KEYS, so that files of a model retrained under the same
# name and epoch are never mixed up with the old ones; not required of files from elsewhere.
CHECKPOINT_HASH_KEY = "checkpoint_sha256"
PER_SAMPLE_KEYS = {"total": np.float32, "class": np.int64, "pred": np.int64, "label": np.int64,
                   "msp": np.float32, "energy": np.float32}


def new_record(model: dict, detector: Detector, dataset: str, layers: dict[str, np.ndarray],
               extra: dict[str, np.ndarray], features: dict[str, np.ndarray] | None = None,
               head: dict[str, np.ndarray] | None = None, **per_sample: np.ndarray) -> dict:
    """A record of ``detector``'s values on ``dataset`` in the format above, from per-sample arrays of any
    numeric dtype (each is cast to the format's): ``layers``, ``extra``, ``features`` (N, D), ``head``
    (the last layer's ``weight`` and ``bias``) and every key of ``PER_SAMPLE_KEYS``."""
    return {**({"head": {name: np.asarray(v, np.float32) for name, v in head.items()}} if head else {}),
            "features": {name: np.asarray(v, np.float32) for name, v in (features or {}).items()},
            "version": FORMAT_VERSION, "model": model, "method": detector.method,
            "score": None if detector.method == "original" else detector.name, "dataset": dataset,
            "num_samples": len(per_sample["total"]), "norm": "none" if detector.norm is None else f"L{detector.norm}",
            "layers": {name: np.asarray(v, np.float32) for name, v in layers.items()},
            "extra": {name: np.asarray(v, np.float32) for name, v in extra.items()}, "options": detector.options(),
            **{key: np.asarray(per_sample[key], dtype) for key, dtype in PER_SAMPLE_KEYS.items()}}


def concatenate_records(records: list[dict]) -> dict:
    """One record of the samples of ``records``, in order (the parts of one data set); every other field, but
    ``shard``, is the first record's."""
    merged = {key: value for key, value in records[0].items() if key != "shard"}
    merged["num_samples"] = sum(r["num_samples"] for r in records)
    for group in ("layers", "extra", "features"):
        merged[group] = {name: np.concatenate([r[group][name] for r in records]) for name in merged.get(group, {})}
    merged.update({key: np.concatenate([r[key] for r in records]) for key in PER_SAMPLE_KEYS})
    return merged


def gradient_path(in_dataset: str, name: str, score: str | None, dataset: str,
                  root: str | Path = GRADIENT_ROOT, last_layer: bool = False) -> Path:
    """Where detector ``score``'s gradients of model ``name`` on ``dataset`` live; ``None`` (or ``original``)
    is the confounding label; ``last_layer``: those of ``--layers last``."""
    return Path(root) / in_dataset / name / f"{score or 'original'}{'-last' * last_layer}" / f"{dataset}.pkl"


class GradientFileError(UserError):
    """A gradients file that is missing, unreadable or not of the expected format."""


def check_record(record: dict, source: str = "record") -> dict:
    """Check a gradients record against the format; raise ``GradientFileError`` naming ``source``."""
    def fail(reason: str):
        raise GradientFileError(f"{source} is not a valid gradients file: {reason}")

    if not isinstance(record, dict):
        fail(f"it holds a {type(record).__name__}, not a dict")
    if record.get("version") != FORMAT_VERSION:
        fail(f"format version {record.get('version')!r}, expected {FORMAT_VERSION}")
    missing = [k for k in ("model", "method", "score", "dataset", "num_samples", "layers", *PER_SAMPLE_KEYS)
               if k not in record]
    if missing:
        fail(f"missing {', '.join(missing)}")
    if not isinstance(record["model"], dict) or any(k not in record["model"] for k in MODEL_KEYS):
        fail(f"'model' must be a dict with {', '.join(MODEL_KEYS)}")
    if record["method"] not in METHODS:
        fail(f"unknown method {record['method']!r}")
    if record["method"] == "norm" and record["score"] not in TRACK_GRADIENT_SCORES:
        fail(f"unknown score {record['score']!r}")
    if record.get("norm", "L2") not in NORMS:
        fail(f"unknown norm {record.get('norm')!r}")
    for key in ("extra", "options", "features"):
        if not isinstance(record.get(key, {}), dict):
            fail(f"'{key}' must be a dict")
    n = record["num_samples"]
    if not isinstance(n, int) or n <= 0:
        fail(f"num_samples is {n!r}: it holds no samples")
    if not isinstance(record["layers"], dict) or not record["layers"]:
        fail("'layers' is empty")
    arrays = {**{f"layers[{k!r}]": v for k, v in record["layers"].items()},
              **{f"extra[{k!r}]": v for k, v in record.get("extra", {}).items()},
              **{k: record[k] for k in PER_SAMPLE_KEYS}}
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.shape != (n,):
            fail(f"{key} must be an array of shape ({n},), got {getattr(value, 'shape', type(value).__name__)}")
        if value.dtype.kind not in "fiu":
            fail(f"{key} has dtype {value.dtype}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            fail(f"{key} holds {int((~np.isfinite(value)).sum())} NaN or infinite value(s)")
    for key, value in record.get("features", {}).items():
        if not isinstance(value, np.ndarray) or value.ndim != 2 or len(value) != n or value.dtype.kind != "f":
            fail(f"features[{key!r}] must be a float array of shape ({n}, D), got "
                 f"{getattr(value, 'shape', type(value).__name__)}")
        if not np.isfinite(value).all():
            fail(f"features[{key!r}] holds NaN or infinite values")
    if "head" in record:
        head = record["head"]
        weight, bias = (head.get(k) if isinstance(head, dict) else None for k in ("weight", "bias"))
        if not (isinstance(weight, np.ndarray) and isinstance(bias, np.ndarray) and weight.ndim == 2
                and bias.shape == weight.shape[:1] and np.isfinite(weight).all() and np.isfinite(bias).all()):
            fail("'head' must be a dict of a finite weight (K, D) and bias (K,)")
    return record


def save_gradients(record: dict, path: str | Path) -> None:
    """Check ``record`` and pickle it to ``path`` atomically."""
    check_record(record, str(path))
    atomic_write(path, lambda f: pickle.dump(record, f, protocol=pickle.HIGHEST_PROTOCOL))


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits builtin containers and numpy arrays / dtypes / scalars; refuses every other global."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # protocol 2 stores bytes via _codecs
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }
    _NUMPY_DTYPES = {"dtype", "Float32DType", "Float64DType", "Int64DType", "Int32DType", "UInt8DType", "BoolDType"}

    def find_class(self, module: str, name: str):
        allowed = (module, name) in self._ALLOWED or (module == "numpy.dtypes" and name in self._NUMPY_DTYPES)
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a gradients file holds only "
                                         "builtin containers and numpy arrays")
        return super().find_class(module, name)


def load_gradients(path: str | Path) -> dict:
    """Read a gradients file with the restricted unpickler and check its format.

    A missing file, a pickle that names anything but builtin containers and numpy arrays (it is refused
    before anything runs), or a record of the wrong shape is a ``GradientFileError`` naming ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise GradientFileError(f"gradients file not found: {path}")
    try:
        record = _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as error:  # a corrupt or foreign pickle fails in many ways (Overflow-, Memory-, LookupError …)
        raise GradientFileError(f"{path} is not a readable gradients file: {error}") from None
    return check_record(record, str(path))


TRAINING_SPLIT = "train"  # ``train.pkl``: the in-distribution training split (for fitting), never an OOD set
_SHARD_PART = re.compile(r"\.shard\d+of\d+$")  # ``<dataset>.shard<I>of<N>.pkl``: a part not merged yet


def ood_dataset_names(folder: str | Path, in_dataset: str) -> list[str]:
    """The OOD sets whose files are in a detector's ``folder``, alphabetical: every ``<dataset>.pkl`` but the
    ID test set (``<in-dataset>.pkl``), the ID training split (``train.pkl``) and unmerged shard parts."""
    stems = (path.stem for path in Path(folder).glob("*.pkl"))
    return sorted((s for s in stems if s not in (in_dataset, TRAINING_SPLIT) and not _SHARD_PART.search(s)),
                  key=str.lower)
