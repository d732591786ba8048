"""What the activation-gradient detectors cost. GAIA-A: the engine's one batched pass (two rows: Σ_k log softmax
and the sum of the pooled features) against the official code's forward and two ``backward()`` calls on the same
batch. NAC-UE: the engine's one pass against the official ``assess_ood`` (one ``torch.autograd.grad`` of the KL
loss per layer, the graph retained between them). Beside them a plain forward pass, GradNorm (one row, L1 of every
weight) and GAIA-Z (one row). Best of ``--repeats``.

    OMP_NUM_THREADS=1 python bench/activation_cost.py --arch resnet20 --n 32
    python bench/activation_cost.py --arch wrn40_2 --n 128 --device cuda
"""
import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from utils.activation_rules import FEATURES  # noqa: E402
from utils.detectors import DETECTORS, gradient_scores, nac_layers  # noqa: E402
from utils.runtime import keep_freed_memory  # noqa: E402


def best_time(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def official_gaia_a(model: torch.nn.Module, x: torch.Tensor) -> None:
    """cal_grad_value's two backward passes of a batch (the scores themselves are not needed for the timing)."""
    features = {}
    handle = model.fc.register_forward_pre_hook(lambda module, args: features.update(h=args[0]))
    y = model(x)
    handle.remove()
    torch.log_softmax(y, -1).sum().backward(retain_graph=True)
    features["h"].sum().backward()


def official_nac(model: torch.nn.Module, x: torch.Tensor) -> None:
    """assess_ood's gradients: the layer outputs kept in the graph, one ``kl_grad`` per layer (states omitted)."""
    names, kept, modules = nac_layers(model), {}, dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: kept.__setitem__(name, out))
               for name in names if name != FEATURES]
    handles.append(model.fc.register_forward_pre_hook(lambda m, args: kept.__setitem__(FEATURES, args[0])))
    outputs = model(x)
    for handle in handles:
        handle.remove()
    loss = torch.sum(-torch.log_softmax(outputs, -1) / outputs.shape[-1], dim=-1).sum()
    for i, name in enumerate(names):
        torch.autograd.grad(loss, kept[name], retain_graph=i < len(names) - 1)


def main() -> None:
    keep_freed_memory()  # as the scripts do (utils.runtime.run_script)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20", choices=models.ARCHS)
    parser.add_argument("--n", type=int, default=32, help="images in the batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.get_model(args.arch, 10).to(device).eval()
    x = torch.rand(args.n, 3, 32, 32, device=device)
    rows = {"forward": lambda: model(x)}
    rows.update({name: (lambda name=name: gradient_scores(model, x, [DETECTORS[name]]))
                 for name in ("gradnorm", "gaia_z", "gaia_a", "nac_ue")})
    rows["official gaia_a (forward + 2 backward)"] = lambda: official_gaia_a(model, x)
    rows["official nac_ue (forward + 1 grad a layer)"] = lambda: official_nac(model, x)
    print(f"{args.arch}, {args.n} images, {device}, best of {args.repeats}:")
    for name, run in rows.items():
        print(f"  {name:40s} {1e3 * best_time(run, args.repeats, device):8.0f} ms")


if __name__ == "__main__":
    main()
