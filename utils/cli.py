"""The command-line options several scripts share, defined once, and the help format every script uses."""
import argparse
from pathlib import Path

from utils.checkpoints import CHECKPOINT_ROOT
from utils.data import BENCHMARKS, DEFAULT_BENCHMARK, check_in_dataset
from utils.gradients import GRADIENT_ROOT
from utils.runtime import default_workers

DEFAULT_IN_DATASET = "CIFAR-10"
ROOTS = {"data": "datasets", "checkpoint": CHECKPOINT_ROOT, "gradient": GRADIENT_ROOT, "results": "results"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and each option's default after its help (none shown for options
    without a default, or flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.help is None:
            return action.help
        return super()._get_help_string(action)


def parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_in_dataset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in-dataset", default=DEFAULT_IN_DATASET, type=check_in_dataset,
                        help="the in-distribution data set the model is trained on: CIFAR-10, CIFAR-100, digits, "
                             "a digits open-set split, digits- and its known classes (e.g. digits-012345), or "
                             "ImageNet (imported models only: import_checkpoint.py)")


def add_benchmark(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", choices=BENCHMARKS, default=DEFAULT_BENCHMARK,
                        help="default: this project's sets (datasets/README.md); openood: OpenOOD v1.5's image lists "
                             "under --data-root (benchmark_imglist/, images_classic/, images_largescale/; "
                             "docs/openood.md), its set names and groups; its gradients and results are stored "
                             "apart, under <root>/openood/")


def on_benchmark(args: argparse.Namespace, *names: str) -> argparse.Namespace:
    """``args`` with each ``--<name>-root`` moved to ``benchmark_root``: where ``--benchmark``'s files live."""
    return argparse.Namespace(**{**vars(args), **{f"{name}_root": benchmark_root(getattr(args, f"{name}_root"),
                                                                                   args.benchmark) for name in names}})


def benchmark_root(root: str, benchmark: str) -> str:
    """A gradients or results root for ``benchmark``: the root itself by default, its ``openood/`` folder for
    OpenOOD's lists, so that a set tracked from OpenOOD's list never mixes with this project's set of the same
    name (CIFAR-100 from torchvision's files and from ``test_cifar100.txt`` are different sets)."""
    return root if benchmark == DEFAULT_BENCHMARK else str(Path(root) / benchmark)


def add_roots(parser: argparse.ArgumentParser, *names: str) -> None:
    """``--<name>-root`` for each of ``names`` (``data``, ``checkpoint``, ``gradient``, ``results``)."""
    for name in names:
        parser.add_argument(f"--{name}-root", default=ROOTS[name], help=f"where the {name} files are")


def add_device(parser: argparse.ArgumentParser, gpu_help: str = "") -> None:
    """``--gpu`` and ``--workers``."""
    parser.add_argument("--gpu", default="0",
                        help="CUDA device; the CPU, with a warning, when CUDA is absent; -1 for the CPU" + gpu_help)
    parser.add_argument("--workers", type=int,
                        help=f"data-loading processes per loader (default: {default_workers()} on CUDA, 0 on the "
                             "CPU, where workers would compete with the computation for the same cores)")
