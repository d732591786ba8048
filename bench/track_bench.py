"""Throughput of per-sample gradient tracking: the plain loop, the batched engine, and the ceiling.

* loop:    a batch of one, ``loss.backward()`` for each tracked loss (K for min/max), ``p.grad`` read per layer;
* engine:  ``utils.gradients.gradient_norms`` on batches of ``--batch-size`` rows (K rows an image for min/max);
* ceiling: a plain batched forward + backward of the same rows (each image repeated once per loss), with the
  usual summed weight gradients: what one training step on that work costs.

All three run on the same random model and the same random images (``tests/test_gradients.py`` holds the
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from utils.gradients import SCORES, gradient_norms, rows_per_sample  # noqa: E402

NUM_CLASSES = 10


def make_model(arch: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return models.get_model(arch, NUM_CLASSES).to(device).eval()


def images(n: int, device: str, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)


def losses(logits: torch.Tensor, score: str | None) -> list[torch.Tensor]:
    """The tracked losses of one image (logits of shape (1, K)), as the plain loop computes them."""
    if score is None:
        return [F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))]
    labels = [logits.argmax(1)] if score == "pred" else [torch.tensor([k], device=logits.device)
                                                        for k in range(logits.shape[1])]
    return [F.cross_entropy(logits, label) for label in labels]


def loop(model: nn.Module, x: torch.Tensor, score: str | None) -> torch.Tensor:
    """Per-layer norms (N, L) of the tracked gradient, one image and one ``backward()`` at a time."""
    params = list(models.tracked_parameters(model).values())
    rows = []
    for image in x:
        candidates = []
        tracked = losses(model(image[None]), score)
        for i, loss in enumerate(tracked):
            model.zero_grad(set_to_none=True)
            loss.backward(retain_graph=i < len(tracked) - 1)
            candidates.append(torch.stack([p.grad.norm() for p in params]))
        candidates = torch.stack(candidates)
        totals = candidates.pow(2).sum(1)
        rows.append(candidates[totals.argmax() if score == "max" else totals.argmin()])
    return torch.stack(rows)


def ceiling(model: nn.Module, x: torch.Tensor, score: str | None) -> None:
    """One forward + backward of the rows the engine back-propagates: each image once per tracked loss."""
    if score in ("min", "max"):
        logits = model(x.repeat_interleave(NUM_CLASSES, 0))
        loss = F.cross_entropy(logits, torch.arange(NUM_CLASSES, device=x.device).repeat(len(x)), reduction="sum")
    else:
        logits = model(x)
        loss = (F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="sum") if score is None
                else F.cross_entropy(logits, logits.argmax(1), reduction="sum"))
    model.zero_grad(set_to_none=True)
    loss.backward()


def engine(model: nn.Module, x: torch.Tensor, score: str | None) -> torch.Tensor:
    out = gradient_norms(model, x, score)
    return torch.stack(list(out.layers.values()), 1)


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


def peak_memory_mib(arch: str, score: str | None, batch_size: int, n: int, device: str) -> float:
    """The engine's peak memory (MiB) over ``n`` images generated batch by batch: RSS of this process on the
    CPU (run it in a fresh process), allocated memory on CUDA."""
    model = make_model(arch, device)
    per_batch = max(1, batch_size // rows_per_sample(score, NUM_CLASSES))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(0, n, per_batch):
        engine(model, images(min(per_batch, n - i), device, seed=i), score)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20", choices=models.ARCHS)
    parser.add_argument("--score", default="min", choices=(*SCORES, "original"))
    parser.add_argument("--batch-size", type=int, default=256, help="rows back-propagated at once, as in tracking")
    parser.add_argument("--n", type=int, default=50, help="images timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory over 500 and 2,000 images")
    args = parser.parse_args()
    score = None if args.score == "original" else args.score
    rows = rows_per_sample(score, NUM_CLASSES)
    per_batch = max(1, args.batch_size // rows)

    model = make_model(args.arch, args.device)
    x = images(args.n, args.device)
    print(f"{args.arch}, score {args.score}, {rows} row(s) an image, batches of {per_batch} images, n = {args.n}, "
          f"device {args.device}, {torch.get_num_threads()} threads")

    loop_rate = throughput(lambda b: loop(model, b, score), x, 1, args.device)
    engine_rate = throughput(lambda b: engine(model, b, score), x, per_batch, args.device)
    ceiling_rate = throughput(lambda b: ceiling(model, b, score), x, per_batch, args.device)
    print(f"loop     {loop_rate:8.1f} images/s")
    print(f"engine   {engine_rate:8.1f} images/s   {engine_rate / loop_rate:.2f}x the loop")
    print(f"ceiling  {ceiling_rate:8.1f} images/s   engine at {engine_rate / ceiling_rate:.2f} of it "
          f"(forward + backward of {per_batch * rows} rows a batch)")

    if args.memory:
        spawn = multiprocessing.get_context("spawn")
        for n in (500, 2000):
            with spawn.Pool(1) as pool:
                mib = pool.apply(peak_memory_mib, (args.arch, score, args.batch_size, n, args.device))
            print(f"engine peak memory over {n:5d} images: {mib:7.0f} MiB")


if __name__ == "__main__":
    main()
