"""Throughput of per-sample gradient tracking: the plain loop, the batched engine, and the ceiling.

* loop:    the detector's own definition (``Detector.reference``): a batch of one, ``loss.backward()`` for each
  tracked loss (K for min/max), ``p.grad`` read per layer;
* engine:  ``utils.detectors.gradient_scores`` on batches of ``--batch-size`` rows (K rows an image for min/max);
* ceiling: a plain batched forward + backward of the same rows (each image repeated once per row, the
  detector's dL/dlogits back-propagated), with the usual summed weight gradients: what one training step on
  that work costs.

All three run on the same random model and the same random images (``tests/test_detectors.py`` holds the
engine to the loop's numbers). ``--memory`` also reports the engine's
peak memory over 500 and 2,000 images (fresh processes; RSS on the CPU, allocated memory on CUDA), which
``--batch-size`` bounds whatever the number of images.

    python bench/track_bench.py --arch resnet20 --score min
    python bench/track_bench.py --arch wrn40_2 --score original --n 32 --memory
"""
import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from utils.detectors import DETECTORS, Detector, gradient_scores, rows_per_sample  # noqa: E402

NUM_CLASSES = 10


def make_model(arch: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return models.get_model(arch, NUM_CLASSES).to(device).eval()


def images(n: int, device: str, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)


def loop(model: nn.Module, x: torch.Tensor, detector: Detector) -> list[dict[str, float]]:
    """Each image's values by the detector's batch-of-one definition, one image at a time."""
    return [detector.reference(model, image) for image in x]


def ceiling(model: nn.Module, x: torch.Tensor, detector: Detector) -> None:
    """One forward + backward of the rows the engine back-propagates: each image once per row."""
    rows = rows_per_sample([detector], NUM_CLASSES)
    logits = model(x.repeat(rows, 1, 1, 1))
    cotangents = detector.output_gradients(logits[:len(x)].detach())  # (rows, B, K), row-major like the repeat
    model.zero_grad(set_to_none=True)
    logits.backward(cotangents.reshape(logits.shape))


def engine(model: nn.Module, x: torch.Tensor, detector: Detector) -> torch.Tensor:
    """The per-layer values (B, L) from ``gradient_scores``."""
    _, scores = gradient_scores(model, x, [detector])
    return torch.stack(list(scores[detector.name].layers.values()), 1)


def throughput(step: Callable[[torch.Tensor], object], x: torch.Tensor, images_per_batch: int, device: str) -> float:
    """Images per second of ``step`` over ``x`` in batches, after one warm-up batch."""
    step(x[:images_per_batch])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(0, len(x), images_per_batch):
        step(x[i:i + images_per_batch])
    sync()
    return len(x) / (time.perf_counter() - start)


def peak_memory_mib(arch: str, score: str, batch_size: int, n: int, device: str) -> float:
    """The engine's peak memory (MiB) over ``n`` images generated batch by batch: RSS of this process on the
    CPU (run it in a fresh process), allocated memory on CUDA."""
    model, detector = make_model(arch, device), DETECTORS[score]
    per_batch = max(1, batch_size // rows_per_sample([detector], NUM_CLASSES))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(0, n, per_batch):
        engine(model, images(min(per_batch, n - i), device, seed=i), detector)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20", choices=models.ARCHS)
    parser.add_argument("--score", default="min", choices=DETECTORS,
                        help="the detector; original: the confounding label (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows back-propagated at once, as in tracking")
    parser.add_argument("--n", type=int, default=50, help="images timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory over 500 and 2,000 images")
    args = parser.parse_args()
    detector = DETECTORS[args.score]
    rows = rows_per_sample([detector], NUM_CLASSES)
    per_batch = max(1, args.batch_size // rows)

    model = make_model(args.arch, args.device)
    x = images(args.n, args.device)
    print(f"{args.arch}, score {args.score}, {rows} row(s) an image, batches of {per_batch} images, n = {args.n}, "
          f"device {args.device}, {torch.get_num_threads()} threads")

    loop_rate = throughput(lambda b: loop(model, b, detector), x, 1, args.device)
    engine_rate = throughput(lambda b: engine(model, b, detector), x, per_batch, args.device)
    ceiling_rate = throughput(lambda b: ceiling(model, b, detector), x, per_batch, args.device)
    print(f"loop     {loop_rate:8.1f} images/s")
    print(f"engine   {engine_rate:8.1f} images/s   {engine_rate / loop_rate:.2f}x the loop")
    print(f"ceiling  {ceiling_rate:8.1f} images/s   engine at {engine_rate / ceiling_rate:.2f} of it "
          f"(forward + backward of {per_batch * rows} rows a batch)")

    if args.memory:
        spawn = multiprocessing.get_context("spawn")
        for n in (500, 2000):
            with spawn.Pool(1) as pool:
                mib = pool.apply(peak_memory_mib, (args.arch, args.score, args.batch_size, n, args.device))
            print(f"engine peak memory over {n:5d} images: {mib:7.0f} MiB")


if __name__ == "__main__":
    main()
