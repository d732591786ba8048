"""Throughput of per-sample gradient tracking: the plain loop, the batched engine, and the ceiling.

* loop:    each detector's definition (``Detector.reference``): a batch of one, ``loss.backward()`` for each
           loss it needs (K for min/max/exgrad), ``p.grad`` read per layer;
* engine:  ``utils.detectors.gradient_scores`` on batches of ``--batch-size`` rows (K rows an image for
           min/max/exgrad, one for pred/gradnorm/original; ``all``: each distinct set of rows once);
* ceiling: a plain batched forward + backward of the same rows (each image repeated once per row), with the
           usual summed weight gradients: what one training step on that work costs.

With ``--score all`` it also times the detectors' separate engine runs, one after the other, against the one
shared pass. All run on the same random model and the same random images (``tests/test_detectors.py`` holds
the engine to the loop's numbers). ``--memory`` also reports the engine's peak memory over 500 and 2,000
images (fresh processes; RSS on the CPU, allocated memory on CUDA), which ``--batch-size`` bounds whatever
the number of images.

    python bench/track_bench.py --arch resnet20 --score min
    python bench/track_bench.py --arch resnet20 --score all
    python bench/track_bench.py --arch wrn40_2 --score original --n 32 --memory
"""
import argparse
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from utils.detectors import DETECTORS, TRACK_GRADIENT_SCORES, Detector, gradient_scores, rows_per_sample  # noqa: E402

NUM_CLASSES = 10


def make_model(arch: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return models.get_model(arch, NUM_CLASSES).to(device).eval()


def images(n: int, device: str, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)


def loop(model: nn.Module, x: torch.Tensor, detectors: list[Detector]) -> None:
    """Each detector's batch-of-one definition on every image, one ``backward()`` per loss."""
    for image in x:
        for detector in detectors:
            detector.reference(model, image)


def ceiling(model: nn.Module, x: torch.Tensor, detectors: list[Detector]) -> None:
    """One forward + backward of the rows the engine back-propagates: each image once per row, each row's
    loss the linear one whose dL/dlogits is that row."""
    rows = rows_per_sample(detectors, NUM_CLASSES)
    logits = model(x.repeat_interleave(rows, 0))
    with torch.no_grad():
        cotangents = torch.cat([d.output_gradients(logits[::rows]) for d in {d.rows: d for d in detectors}.values()])
    model.zero_grad(set_to_none=True)
    logits.backward(cotangents.transpose(0, 1).reshape(-1, NUM_CLASSES))


def engine(model: nn.Module, x: torch.Tensor, detectors: list[Detector]) -> None:
    gradient_scores(model, x, detectors)


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
    model = make_model(arch, device)
    detectors = chosen(score)
    per_batch = max(1, batch_size // rows_per_sample(detectors, NUM_CLASSES))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(0, n, per_batch):
        engine(model, images(min(per_batch, n - i), device, seed=i), detectors)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux reports KiB


def chosen(score: str) -> list[Detector]:
    return [DETECTORS[name] for name in (TRACK_GRADIENT_SCORES if score == "all" else [score])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20", choices=models.ARCHS)
    parser.add_argument("--score", default="min", choices=(*DETECTORS, "all"),
                        help="a detector (original: the confounding label), or all of track_gradient.py's")
    parser.add_argument("--batch-size", type=int, default=256, help="rows back-propagated at once, as in tracking")
    parser.add_argument("--n", type=int, default=50, help="images timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory over 500 and 2,000 images")
    args = parser.parse_args()
    detectors = chosen(args.score)
    rows = rows_per_sample(detectors, NUM_CLASSES)
    per_batch = max(1, args.batch_size // rows)

    model = make_model(args.arch, args.device)
    x = images(args.n, args.device)
    print(f"{args.arch}, score {args.score}, {rows} row(s) an image, batches of {per_batch} images, n = {args.n}, "
          f"device {args.device}, {torch.get_num_threads()} threads")

    loop_rate = throughput(lambda b: loop(model, b, detectors), x, 1, args.device)
    engine_rate = throughput(lambda b: engine(model, b, detectors), x, per_batch, args.device)
    ceiling_rate = throughput(lambda b: ceiling(model, b, detectors), x, per_batch, args.device)
    print(f"loop     {loop_rate:8.1f} images/s")
    print(f"engine   {engine_rate:8.1f} images/s   {engine_rate / loop_rate:.2f}x the loop")
    print(f"ceiling  {ceiling_rate:8.1f} images/s   engine at {engine_rate / ceiling_rate:.2f} of it "
          f"(forward + backward of {per_batch * rows} rows a batch)")
    if len(detectors) > 1:
        seconds = sum(1 / throughput(lambda b, d=d: engine(model, b, [d]), x, per_batch_of(d, args.batch_size),
                                     args.device) for d in detectors)  # per image, the detectors one after another
        print(f"separate {1 / seconds:8.1f} images/s   each detector's own engine run, one after the other: "
              f"the shared pass is {engine_rate * seconds:.2f}x faster")

    if args.memory:
        spawn = multiprocessing.get_context("spawn")
        for n in (500, 2000):
            with spawn.Pool(1) as pool:
                mib = pool.apply(peak_memory_mib, (args.arch, args.score, args.batch_size, n, args.device))
            print(f"engine peak memory over {n:5d} images: {mib:7.0f} MiB")


def per_batch_of(detector: Detector, batch_size: int) -> int:
    return max(1, batch_size // rows_per_sample([detector], NUM_CLASSES))


if __name__ == "__main__":
    main()
