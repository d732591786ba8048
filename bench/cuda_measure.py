"""The sections of ``bench/cuda_check.py`` that measure in this process: exactness of the tracked values on
the device, tracking speed, and the training step's speed.

Imported by ``bench/cuda_check.py``, which puts the project's root and ``bench/`` on the path."""
from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from typing import TypeVar

import torch
from cuda_sizes import Sizes
from torch import nn
from track_bench import (
    NUM_CLASSES,
    ceiling,
    engine,
    images,
    loop,
    make_model,
    throughput,
    vmap_difference,
    vmap_scores,
)

import models
import train_energy
from utils import optim
from utils.detectors import CONFOUNDING, DETECTORS, Detector, Scores, gradient_scores, rows_per_sample
from utils.per_sample import tf32_mode

TOLERANCE = 1e-4  # float32 against the float64 definition, as the tests hold the engine on the CPU
TIMED = (DETECTORS["min"], CONFOUNDING)
T = TypeVar("T")


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
        engine = [d for d in DETECTORS.values() if not d.fit_first]  # GROOD, lowdim: fit first (test_grood_lowdim)
        for detector in engine:
            name = detector.name
            references[name] = [detector.reference(model64, image) for image in x64]
            floors[name] = [relative_difference(detector.reference(model32, image.float()), reference)
                            for image, reference in zip(x64, references[name])]
        for tf32 in (False, True):
            # On the CPU oneDNN rounds a batch's convolutions otherwise than one image's, which can flip a ReLU
            # within rounding of its kink (GAIA-A's spatial means of gradients show it at ~1e-3): off here, as in
            # tests/test_per_sample.py, so that the CPU smoke run checks the engine, not oneDNN's batching.
            with torch.backends.mkldnn.flags(enabled=device.type != "cpu"):
                _, scores = gradient_scores(model, x, engine, tf32=tf32)
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
    loop_rate = throughput(lambda b: loop(model, b, [detector]), x[:sizes.loop_images], 1, where, repeats=1)
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

    steps_per_second = throughput(step, torch.empty(sizes.steps), 1, str(device), repeats=1)  # one "image" = one step
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


