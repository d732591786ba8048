"""The ImageNet-1K section of ``bench/cuda_check.py`` (``docs/imagenet.md``): on torchvision's ResNet-50 at 224 px
with 1,000 classes (random weights), GradNorm's paper score (``--layers last``) against a plain forward pass and
the official batch-of-one loop; every-layer ``gradnorm`` and ``pred`` against the ceiling (one training step of the
same batch), vmap and the loop, with the peak GPU memory of the engine beside the ceiling's; what 50,000 images
take at each rate; and a reduced BiT tracked on the device against the float64 CPU loop. ``quick``: a ResNet-50 of
one bottleneck a stage and 10 classes on a few 32-px images, each rate from one pass, no vmap, and the BiT on one
image, so that the CPU smoke run stays short."""
import copy
import time
from collections.abc import Callable

import torch
from track_bench import (
    REPEATS,
    ceiling,
    engine,
    forward,
    images,
    loop,
    official_gradnorm_loop,
    throughput,
    vmap_scores,
)

import models
from utils.detectors import DETECTORS, Detector, gradient_scores
from utils.per_sample import tf32_mode

VALIDATION_IMAGES = 50_000
CLASSES = 1000


def peak(measure: Callable[[], float], device: torch.device) -> tuple[float, float | None]:
    """``measure()`` and the peak GPU memory it allocated (MiB; None on the CPU)."""
    if device.type != "cuda":
        return measure(), None
    torch.cuda.reset_peak_memory_stats(device)
    return measure(), torch.cuda.max_memory_allocated(device) / 2 ** 20


def imagenet(device: torch.device, quick: bool) -> list[dict]:
    size, n, loop_n, batch, last_batch = (32, 2, 1, 2, 2) if quick else (224, 512, 32, 64, 256)
    repeats = 1 if quick else REPEATS
    where = str(device)
    rows = []
    with tf32_mode(False):
        torch.manual_seed(0)
        model = models.get_model("resnet50", 10 if quick else CLASSES,
                                 **({"layers": (1, 1, 1, 1)} if quick else {})).to(where).eval()
        x = images(n, where, size=size)
        gradnorm = DETECTORS["gradnorm"]
        forward_rate = throughput(lambda b: forward(model, b), x, last_batch, where, repeats)
        last_rate, last_peak = peak(lambda: throughput(lambda b: engine(model, b, [gradnorm.on_last_layer()]), x,
                                                       last_batch, where, repeats), device)
        official_rate = throughput(lambda b: official_gradnorm_loop(model, b), x[:loop_n], 1, where, repeats=1)
        rows.append({"workload": f"resnet50 {size} px, gradnorm --layers last", "images/s": last_rate,
                     "reference": f"forward {forward_rate:.1f}, official loop {official_rate:.1f}",
                     "ratio": f"{last_rate / forward_rate:.2f} of forward, {last_rate / official_rate:.1f}x loop",
                     "peak MiB": last_peak, "50,000 images (min)": VALIDATION_IMAGES / last_rate / 60,
                     "targets met": last_rate >= 0.9 * forward_rate and last_rate >= 20 * official_rate})
        rows += [every_layer_row(model, DETECTORS[name], x, batch, loop_n, size, device, repeats, not quick)
                 for name in ("gradnorm", "pred")]
    rows.append(bit_exactness(device, 10 if quick else CLASSES, 1 if quick else 2))
    return rows


def every_layer_row(model: torch.nn.Module, detector: Detector, x: torch.Tensor, batch: int, loop_n: int, size: int,
                    device: torch.device, repeats: int, with_vmap: bool) -> dict:
    """Every-layer tracking at ``batch`` images a batch against the ceiling, the loop and vmap, and its peak memory
    against the ceiling's (one training step of the same batch)."""
    where = str(device)
    rate, engine_peak = peak(lambda: throughput(lambda b: engine(model, b, [detector]), x, batch, where, repeats),
                             device)
    ceiling_rate, ceiling_peak = peak(lambda: throughput(lambda b: ceiling(model, b, [detector]), x, batch, where,
                                                         repeats), device)
    loop_rate = throughput(lambda b: loop(model, b, [detector]), x[:loop_n], 1, where, repeats=1)
    vmap_rate = None
    try:
        if with_vmap:
            vmap_rate = throughput(lambda b: vmap_scores(model, b, detector), x[:16], min(16, batch), where, repeats=1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
    memory = engine_peak / ceiling_peak if engine_peak else None
    return {"workload": f"resnet50 {size} px, {detector.name} every layer, --batch-size {batch}", "images/s": rate,
            "reference": f"ceiling {ceiling_rate:.1f}, loop {loop_rate:.1f}, vmap "
                         f"{'not run or out of memory' if vmap_rate is None else f'{vmap_rate:.1f}'}",
            "ratio": f"{rate / ceiling_rate:.2f} of ceiling", "peak MiB": engine_peak,
            "memory ÷ training step": memory, "50,000 images (min)": VALIDATION_IMAGES / rate / 60,
            "targets met": rate >= 0.8 * ceiling_rate and (vmap_rate is None or rate > vmap_rate)
            and (memory is None or memory <= 1.5)}


def bit_exactness(device: torch.device, classes: int, count: int) -> dict:
    """A reduced BiT (one unit a block, width 32), float32 on the device with TF32 off, against its float64 CPU
    batch-of-one loop: the largest relative difference over every tracked layer, GradNorm and pred."""
    torch.manual_seed(0)
    model = models.get_model("bit_r50x1", classes, (0.5,) * 3, (0.5,) * 3, block_units=(1, 1, 1, 1), width=32).eval()
    reference = copy.deepcopy(model).double()
    x = torch.rand(count, 3, 48, 48)
    started, worst = time.perf_counter(), 0.0
    model = model.to(device)
    for name in ("gradnorm", "pred"):
        detector = DETECTORS[name]
        _, scores = gradient_scores(model, x.to(device), [detector])
        for i, image in enumerate(x.double()):
            expected = detector.reference(reference, image)
            for layer, values in scores[name].layers.items():
                worst = max(worst, abs(values[i].item() - expected[layer]) / abs(expected[layer]))
    return {"workload": "reduced BiT 48 px on the device vs the float64 CPU loop (gradnorm, pred; every layer)",
            "largest relative difference": worst, "seconds": time.perf_counter() - started, "ok": worst < 1e-3}
