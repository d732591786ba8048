"""What GROOD and the low-dimensional gradient cost, beside a plain forward pass and NAC-UE's one pass: each one's
fit on ``--train`` random images (labelled as the model predicts them, so GROOD keeps them all) and its pass over a
batch of ``--n``. The low-dimensional gradient's pass projects onto ``--components`` directions (200, the official
CIFAR value) of a fit of that many random orthonormal directions and 5,000 training features (the timing does not
depend on their values), both ways (``--lowdim-projection jvp``: forward-mode products; ``gradients``: per-sample
gradients times the directions); its fits are timed on the ``--train`` images (the principal subspace with
min(200, --train) components, 13 passes; the class means, 2 passes), and one pass's unit (the per-sample gradients
of a batch) alone. Best of ``--repeats``; fits timed once.

    OMP_NUM_THREADS=2 python bench/fit_first_cost.py --arch resnet20 --n 16 --train 32 --components 40 --repeats 1
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from bench.activation_cost import best_time  # noqa: E402
from utils.detectors import DETECTORS, gradient_scores  # noqa: E402
from utils.detectors.lowdim import LowDim, LowDimFit, parameter_count, per_sample_gradients  # noqa: E402
from utils.runtime import keep_freed_memory  # noqa: E402


def once(run) -> tuple[float, object]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def main() -> None:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20", choices=models.ARCHS)
    parser.add_argument("--n", type=int, default=32, help="images in the batch")
    parser.add_argument("--train", type=int, default=64, help="training images the fits are timed on")
    parser.add_argument("--components", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.get_model(args.arch, 10).to(device).eval()
    x = torch.rand(args.n, 3, 32, 32, device=device)
    train_images = torch.rand(args.train, 3, 32, 32, device=device)
    with torch.no_grad():
        training = TensorDataset(train_images, model(train_images).argmax(1))
    parameters = parameter_count(model)
    print(f"{args.arch} ({parameters:,} parameters), {args.n} images, {device}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}:", flush=True)
    grood_fit_s, grood = once(lambda: DETECTORS["grood"].fit(model, training, device, args.n))
    directions = torch.linalg.qr(torch.randn(parameters, args.components, device=device)).Q
    synthetic = LowDimFit(torch.zeros(parameters, device=device), torch.ones(parameters, device=device), directions,
                          torch.nn.functional.normalize(torch.randn(5000, args.components, device=device)), 5000)
    by_jvp, by_gradients = (LowDim(synthetic, projection=projection) for projection in ("jvp", "gradients"))
    rows = {"forward": lambda: model(x),
            "nac_ue (engine, 1 row)": lambda: gradient_scores(model, x, [DETECTORS["nac_ue"]]),
            "grood pass": lambda: gradient_scores(model, x, [grood]),
            "lowdim: per-sample gradients (a fit pass)": lambda: per_sample_gradients(model, x),
            f"lowdim pass, jvp ({args.components} directions)": lambda: gradient_scores(model, x, [by_jvp]),
            f"lowdim pass, gradients ({args.components} dirs)": lambda: gradient_scores(model, x, [by_gradients])}
    for name, run in rows.items():
        print(f"  {name:45s} {1e3 * best_time(run, args.repeats, device):9.0f} ms", flush=True)
    print(f"  {'grood fit, ' + str(args.train) + ' images + 100 noise':45s} {1e3 * grood_fit_s:9.0f} ms", flush=True)
    for subspace, passes in (("principal", 13), ("class_means", 2)):
        fit_s, _ = once(lambda s=subspace: LowDim(subspace=s).fit(model, training, device, args.n))
        print(f"  {f'lowdim fit, {subspace}, {args.train} images, {passes} passes':45s} {1e3 * fit_s:9.0f} ms",
              flush=True)


if __name__ == "__main__":
    main()
