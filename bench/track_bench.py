"""Throughput of per-sample gradient tracking: the plain loop, the batched engine, and the ceiling.

* loop:    each detector's definition (``Detector.reference``): a batch of one, ``loss.backward()`` for each
           loss it needs (K for min/max/exgrad), ``p.grad`` read per layer;
* engine:  ``utils.detectors.gradient_scores`` on batches of ``--batch-size`` rows (K rows an image for
           min/max/exgrad, one for pred/gradnorm/original; ``all``: each distinct set of rows once);
* ceiling: a plain batched forward + backward of the same rows (each image repeated once per row), with the
           usual summed weight gradients: what one training step on that work costs;
* vmap:    ``torch.func``'s ``vmap`` over per-sample vector-Jacobian products of the tracked weights (the way
           pytorch-ood takes per-sample gradients), at its best batch, on the same images, with the largest
           relative difference of its values from the engine's (for a single weight-gradient detector).

``--paths`` times each path of the Conv2d rule (``utils.norm_rules.conv2d_paths``) on each of the model's
convolutions, beside the batched weight gradient: what the rule's cost estimates are calibrated on.

``--sweep`` also times the engine and the ceiling at 32 to 256 images a batch: a larger ``--batch-size`` should
never be slower per image. Every rate is the best of three passes, the methods taking turns (``best_rates``).

With ``--score all`` it also times the detectors' separate engine runs, one after the other, against the one
shared pass. For ``odin`` the loop is the official path (a batch of one, ``backward()`` to the normalised input,
a second forward) and the engine its batched form.

``--layers last`` times the last-layer path (``utils.detectors.last_layer_scores``: one forward pass, no
backward) against a plain batched forward pass of the same images (the target: at least 0.8 of its rate), and
against the two per-sample GradNorm loops it replaces: the official one (Huang et al.: a batch of one, the loss
back-propagated through the whole network, the fc weight's ``.grad`` read) and OpenOOD v1.5's (penultimate
features of the batch, then per sample a ``backward()`` through a copy of the fc layer alone).

All run on the same random model and the same random images (``tests/test_detectors.py`` holds the engine to
the loop's numbers). ``--memory`` also reports the engine's peak memory over 500 and 2,000
images (fresh processes; RSS on the CPU, allocated memory on CUDA), which ``--batch-size`` bounds whatever
the number of images.

    python bench/track_bench.py --arch resnet20 --score min
    python bench/track_bench.py --arch wrn40_2 --score original --n 256 --sweep
    python bench/track_bench.py --arch resnet20 --score all
    python bench/track_bench.py --arch wrn40_2 --score original --n 32 --memory
    python bench/track_bench.py --arch resnet18 --score gradnorm --layers last --n 2000
    python bench/track_bench.py --arch wrn40_2 --score odin --n 200
    python bench/track_bench.py --arch wrn40_2 --paths --n 64

ImageNet-1K (``--size 224 --classes 1000``; ``docs/imagenet.md``): GradNorm's paper score against a forward pass
and the official loops, every-layer GradNorm and ``pred`` against the ceiling, vmap and the loop, and the peak
memory of each beside one training step of the same batch:

    python bench/track_bench.py --arch resnet50 --size 224 --classes 1000 --score gradnorm --layers last --n 256
    python bench/track_bench.py --arch resnet50 --size 224 --classes 1000 --score pred --batch-size 64 --n 128 --memory
"""
import argparse
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from utils.detectors import (  # noqa: E402
    DETECTORS,
    SCORE_ALL,
    Detector,
    Scores,
    gradient_scores,
    rows_per_sample,
)
from utils.norm_rules import conv2d_paths, in_chunks  # noqa: E402
from utils.per_sample import tf32_mode  # noqa: E402
from utils.runtime import keep_freed_memory  # noqa: E402

NUM_CLASSES = 10  # the default of --classes
VMAP_BATCHES = (16, 64, 256)  # images per vmap call; the best is reported
SWEEP = (32, 64, 128, 256)  # images a batch for --sweep
REPEATS = 3  # passes over the images a rate is the best of


def make_model(arch: str, device: str, classes: int = NUM_CLASSES) -> nn.Module:
    torch.manual_seed(0)
    return models.get_model(arch, classes).to(device).eval()


def images(n: int, device: str, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def loop(model: nn.Module, x: torch.Tensor, detectors: list[Detector]) -> None:
    """Each detector's batch-of-one definition on every image, one ``backward()`` per loss."""
    for image in x:
        for detector in detectors:
            detector.reference(model, image)


def ceiling(model: nn.Module, x: torch.Tensor, detectors: list[Detector]) -> None:
    """One forward + backward of the rows the engine back-propagates: each image once per row, each row's
    loss the linear one whose dL/dlogits is that row."""
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    rows = rows_per_sample(detectors, classes)
    logits = model(x.repeat_interleave(rows, 0))
    with torch.no_grad():
        cotangents = torch.cat([d.output_gradients(logits[::rows]) for d in {d.rows: d for d in detectors}.values()])
    model.zero_grad(set_to_none=True)
    logits.backward(cotangents.transpose(0, 1).reshape(-1, classes))


def engine(model: nn.Module, x: torch.Tensor, detectors: list[Detector]) -> None:
    gradient_scores(model, x, detectors)


def forward(model: nn.Module, x: torch.Tensor) -> None:
    """A plain batched forward pass: what ``--layers last`` is measured against (TF32 off, as in tracking)."""
    with torch.no_grad(), tf32_mode(False):
        model(x)


def vmap_scores(model: nn.Module, x: torch.Tensor, detector: Detector) -> Scores:
    """The detector's values by ``torch.func``: per image (``vmap``), a vector-Jacobian product of the tracked
    weights for each of the detector's rows (``vmap`` of the pull-back), then each per-sample gradient's norm."""
    tracked = {name: p.detach() for name, p in models.tracked_parameters(model).items()}
    fixed = {**{name: p.detach() for name, p in model.named_parameters() if name not in tracked},
             **dict(model.named_buffers())}
    requests = detector.requests(list(tracked)[-1])

    def one_image(image: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        logits, pullback = vjp(lambda weights: functional_call(model, {**fixed, **weights}, (image[None],)), tracked)
        (grads,) = vmap(pullback)(detector.output_gradients(logits))  # each weight's gradient for every row
        norms = [{name: torch.linalg.vector_norm(grads[name].flatten(1), p, 1) for name in layers or tracked}
                 for p, layers in requests]
        return logits[0], norms

    logits, norms = vmap(one_image)(x)
    return detector.reduce([{name: v.T for name, v in request.items()} for request in norms], logits)


def vmap_difference(model: nn.Module, x: torch.Tensor, detector: Detector) -> float:
    """The largest relative difference of vmap's totals from the engine's: the two compute the same values."""
    _, scores = gradient_scores(model, x, [detector])
    expected = scores[detector.name].total
    return ((vmap_scores(model, x, detector).total - expected).abs() / expected).max().item()


def official_gradnorm_loop(model: nn.Module, x: torch.Tensor, temperature: float = 1.0) -> list[float]:
    """GradNorm as its official code computes it: per image, the loss Σ_k −log softmax(f(x)/T)_k back-propagated
    through the whole network, then the L1 norm of the head's weight gradient (fc, or BiT's head.conv)."""
    head = list(models.tracked_parameters(model).values())[-1]
    scores = []
    for image in x:
        model.zero_grad(set_to_none=True)
        logits = model(image[None]) / temperature
        torch.mean(torch.sum(-F.log_softmax(logits, dim=-1), dim=-1)).backward()
        scores.append(head.grad.abs().sum().item())
    return scores


def openood_gradnorm_loop(model: nn.Module, x: torch.Tensor) -> list[float]:
    """GradNorm as OpenOOD v1.5 computes it: the batch's penultimate features in one pass, then per sample a
    ``backward()`` through a copy of the fc layer alone and the L1 norm of its weight's gradient."""
    kept = {}
    handle = model.fc.register_forward_hook(lambda module, args, output: kept.update(h=args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    fc = nn.Linear(model.fc.in_features, model.fc.out_features).to(x.device, x.dtype)
    fc.load_state_dict(model.fc.state_dict())
    scores = []
    for h in kept["h"]:
        fc.zero_grad(set_to_none=True)
        torch.mean(torch.sum(-F.log_softmax(fc(h[None]), dim=-1), dim=-1)).backward()
        scores.append(fc.weight.grad.abs().sum().item())
    return scores


def last_layer_report(model: nn.Module, x: torch.Tensor, detectors: list[Detector], batch_size: int,
                      device: str) -> None:
    """``--layers last``: its rate against a plain forward pass and the two GradNorm loops."""
    last = [d.on_last_layer() for d in detectors]
    forward_rate = throughput(lambda b: forward(model, b), x, batch_size, device)
    last_rate = throughput(lambda b: engine(model, b, last), x, batch_size, device)
    official_rate = throughput(lambda b: official_gradnorm_loop(model, b), x, 1, device)
    print(f"forward           {forward_rate:9.1f} images/s   (batches of {batch_size}, no gradient)")
    print(f"--layers last     {last_rate:9.1f} images/s   {last_rate / forward_rate:.2f} of the forward pass "
          "(target >= 0.8; 0.9 on ImageNet)")
    print(f"official GradNorm {official_rate:9.1f} images/s   --layers last is {last_rate / official_rate:.1f}x faster")
    if isinstance(getattr(model, "fc", None), nn.Linear):  # OpenOOD's loop copies a Linear fc
        openood_rate = throughput(lambda b: openood_gradnorm_loop(model, b), x, batch_size, device)
        print(f"OpenOOD GradNorm  {openood_rate:9.1f} images/s   --layers last is {last_rate / openood_rate:.1f}x "
              "faster")


def best_rates(steps: dict[str, tuple[Callable[[torch.Tensor], object], int]], x: torch.Tensor, device: str,
               repeats: int = REPEATS) -> dict[str, float]:
    """Images per second of each ``step`` over ``x`` in batches of its size, after one warm-up batch each: in each
    of ``repeats`` rounds every step makes one pass in turn, and each keeps its best pass (a shared machine only
    ever slows a pass down, and taking turns spreads a slow spell over all of them)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for step, images_per_batch in steps.values():
        step(x[:images_per_batch])
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, (step, images_per_batch) in steps.items():
            sync()
            start = time.perf_counter()
            for i in range(0, len(x), images_per_batch):
                step(x[i:i + images_per_batch])
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(x) / seconds for name, seconds in best.items()}


def throughput(step: Callable[[torch.Tensor], object], x: torch.Tensor, images_per_batch: int, device: str,
               repeats: int = REPEATS) -> float:
    """Images per second of one ``step`` (``best_rates``)."""
    return best_rates({"step": (step, images_per_batch)}, x, device, repeats)["step"]


def peak_memory_mib(arch: str, score: str, batch_size: int, n: int, device: str, classes: int = NUM_CLASSES,
                    size: int = 32, method: str = "engine") -> float:
    """The peak memory (MiB) of the engine (or, ``method="ceiling"``, of one training step's forward + backward of
    the same rows) over ``n`` images generated batch by batch: RSS of this process on the CPU (run it in a fresh
    process), allocated memory on CUDA."""
    keep_freed_memory()
    model = make_model(arch, device, classes)
    detectors = chosen(score)
    per_batch = max(1, batch_size // rows_per_sample(detectors, classes))
    step = engine if method == "engine" else ceiling
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(0, n, per_batch):
        step(model, images(min(per_batch, n - i), device, seed=i, size=size), detectors)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux reports KiB


def chosen(score: str) -> list[Detector]:
    """The detectors of ``--score`` (``all``: the engine's, those of --score all that need no fit first)."""
    if score != "all":
        return [DETECTORS[score]]
    return [DETECTORS[name] for name in SCORE_ALL if not DETECTORS[name].fit_first]


def convolution_inputs(model: nn.Module, x: torch.Tensor) -> dict[tuple, tuple[nn.Conv2d, torch.Tensor, torch.Size]]:
    """Each distinct convolution of the model (channels in and out, kernel, stride, input size) on ``x``: the module,
    its input and the shape of its output."""
    seen = {}

    def keep(module: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, tuple(args[0].shape[2:]))
        seen.setdefault(key, (module, args[0], output.shape))

    handles = [module.register_forward_hook(keep) for module in model.modules() if isinstance(module, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def paths_report(model: nn.Module, x: torch.Tensor, device: str, rows: tuple[int, ...] = (1, 10)) -> None:
    """``--paths``: for each distinct convolution of the model, the time per image of every path of the Conv2d rule
    (``utils.norm_rules.conv2d_paths``, each in its chunks) on the model's own inputs to it and random output
    gradients, L2, for R rows an image, beside the batched weight gradient of the same rows (what a training step
    computes); * marks the path the rule takes. What ``COST_PER_MULTIPLY_ADD`` is calibrated on."""
    for (channels, out_channels, kernel, stride, size), (conv, a, shape) in convolution_inputs(model, x).items():
        for R in rows:
            g = torch.randn(R, *shape, device=device)
            paths = conv2d_paths(conv, a, g, 2)
            chosen = min(paths, key=lambda name: paths[name][1])
            steps = {"weight grad": partial(torch.nn.grad.conv2d_weight, a.repeat(R, 1, 1, 1), conv.weight.shape,
                                            g.flatten(0, 1), conv.stride, conv.padding, conv.dilation)}
            steps.update({name + "*" * (name == chosen): partial(in_chunks, path, elements, conv, a, g, 2)
                          for name, (path, _, elements) in paths.items()})
            rates = best_rates({name: (lambda _, run=run: run(), len(a)) for name, run in steps.items()}, a, device)
            print(f"{channels:4d}->{out_channels:<4d} {kernel[0]}x{kernel[1]}/{stride[0]} {size[0]:3d}x{size[1]:<3d} "
                  f"R={R:<3d}" + " | ".join(f"{name} {1e6 / rate:7.0f}" for name, rate in rates.items()))


def vmap_batches(n: int) -> list[int]:
    return sorted({min(batch, n) for batch in VMAP_BATCHES})


def vmap_report(model: nn.Module, x: torch.Tensor, detector: Detector, engine_rate: float,
                vmap_rates: dict[int, float]) -> None:
    """torch.func's vmap on the same images, at its best batch, and how far its values are from the engine's."""
    batch, rate = max(vmap_rates.items(), key=lambda item: item[1])
    print(f"vmap     {rate:8.1f} images/s   engine at {engine_rate / rate:.2f}x it (vmap at its best batch, {batch} of "
          f"{', '.join(map(str, vmap_batches(len(x))))}; largest relative difference of its totals from the "
          f"engine's: {vmap_difference(model, x[:8], detector):.1e})")


def main() -> None:
    keep_freed_memory()  # as the scripts do (utils.runtime.run_script)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20", choices=models.ARCHS)
    parser.add_argument("--score", default="min", choices=(*DETECTORS, "all"),
                        help="a detector (original: the confounding label), or all of track_gradient.py's")
    parser.add_argument("--batch-size", type=int, default=256, help="rows back-propagated at once, as in tracking")
    parser.add_argument("--n", type=int, default=50, help="images timed")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (224 for ImageNet's ResNet-50)")
    parser.add_argument("--classes", type=int, default=NUM_CLASSES, help="classes of the model (1000 for ImageNet)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory", action="store_true",
                        help="also measure the engine's peak memory over 500 and 2,000 images, and one training "
                             "step's (the ceiling's) over 500")
    parser.add_argument("--layers", choices=("all", "last"), default="all",
                        help="last: time --layers last against a forward pass and the GradNorm loops")
    parser.add_argument("--paths", action="store_true",
                        help="time every path of the Conv2d rule on each of the model's convolutions, and stop")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also time the engine at {', '.join(map(str, SWEEP))} images a batch")
    args = parser.parse_args()
    detectors = chosen(args.score)
    if args.layers == "last":
        model = make_model(args.arch, args.device, args.classes)
        detectors = [d for d in detectors if d.has_weight_gradients]
        print(f"{args.arch}, {args.size} px, {args.classes} classes, --layers last, "
              f"{', '.join(d.name for d in detectors)}, n = {args.n}, device {args.device}, "
              f"{torch.get_num_threads()} threads")
        last_layer_report(model, images(args.n, args.device, size=args.size), detectors, args.batch_size, args.device)
        return
    if args.paths:
        print(f"{args.arch}, the Conv2d rule's paths on {args.n} images, L2, device {args.device}, "
              f"{torch.get_num_threads()} threads; microseconds an image, * the path the rule takes")
        paths_report(make_model(args.arch, args.device, args.classes), images(args.n, args.device, size=args.size),
                     args.device)
        return
    rows = rows_per_sample(detectors, args.classes)
    per_batch = max(1, args.batch_size // rows)

    model = make_model(args.arch, args.device, args.classes)
    x = images(args.n, args.device, size=args.size)
    print(f"{args.arch}, {args.size} px, {args.classes} classes, score {args.score}, {rows} row(s) an image, batches "
          f"of {per_batch} images, n = {args.n}, device {args.device}, {torch.get_num_threads()} threads")

    steps = {"loop": (lambda b: loop(model, b, detectors), 1),
             "engine": (lambda b: engine(model, b, detectors), per_batch),
             "ceiling": (lambda b: ceiling(model, b, detectors), per_batch)}
    with_vmap = len(detectors) == 1 and detectors[0].has_weight_gradients
    if with_vmap:
        steps.update({("vmap", batch): (lambda b: vmap_scores(model, b, detectors[0]), batch)
                      for batch in vmap_batches(len(x))})
    if args.sweep:
        steps.update({(kind, images_per_batch): (lambda b, step=steps[kind][0]: step(b), images_per_batch)
                      for images_per_batch in SWEEP for kind in ("engine", "ceiling")})
    rates = best_rates(steps, x, args.device)
    engine_rate, ceiling_rate = rates["engine"], rates["ceiling"]
    print(f"loop     {rates['loop']:8.1f} images/s")
    print(f"engine   {engine_rate:8.1f} images/s   {engine_rate / rates['loop']:.2f}x the loop")
    print(f"ceiling  {ceiling_rate:8.1f} images/s   engine at {engine_rate / ceiling_rate:.2f} of it "
          f"(forward + backward of {per_batch * rows} rows a batch)")
    if with_vmap:
        vmap_report(model, x, detectors[0], engine_rate,
                    {key[1]: rate for key, rate in rates.items() if isinstance(key, tuple) and key[0] == "vmap"})
    if args.sweep:
        for images_per_batch in SWEEP:
            engine_at, ceiling_at = rates["engine", images_per_batch], rates["ceiling", images_per_batch]
            print(f"engine at {images_per_batch:4d} images a batch ({images_per_batch * rows:5d} rows): "
                  f"{engine_at:8.1f} images/s   ceiling {ceiling_at:8.1f}   engine at {engine_at / ceiling_at:.2f}")
    if len(detectors) > 1:
        seconds = sum(1 / throughput(lambda b, d=d: engine(model, b, [d]), x,
                                     per_batch_of(d, args.batch_size, args.classes), args.device)
                      for d in detectors)  # per image, the detectors one after another
        print(f"separate {1 / seconds:8.1f} images/s   each detector's own engine run, one after the other: "
              f"the shared pass is {engine_rate * seconds:.2f}x faster")

    if args.memory:
        spawn = multiprocessing.get_context("spawn")
        measured = {}
        for method, n in (("ceiling", 500), ("engine", 500), ("engine", 2000)):
            with spawn.Pool(1) as pool:
                measured[method, n] = pool.apply(peak_memory_mib, (args.arch, args.score, args.batch_size, n,
                                                                   args.device, args.classes, args.size, method))
            ratio = measured[method, n] / measured["ceiling", 500]
            print(f"{method:7s} peak memory over {n:5d} images: {measured[method, n]:7.0f} MiB   {ratio:.2f}x one "
                  "training step's (target <= 1.5)")


def per_batch_of(detector: Detector, batch_size: int, classes: int = NUM_CLASSES) -> int:
    return max(1, batch_size // rows_per_sample([detector], classes))


if __name__ == "__main__":
    main()
