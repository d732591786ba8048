"""Track per-sample gradient norms of a cross-entropy classifier on an in-distribution or OOD test set.

For every sample and every label k, the gradient of the cross-entropy loss with label k; ``--score``
keeps the one with the smallest (``min``) or largest (``max``) L2 norm over all tracked weights, or the
predicted label's (``pred``), and saves its per-layer norms to
``gradients/<in-dataset>/<name>/<score>/<dataset>.pkl``. The in-distribution test set is tracked first if
its file is missing.

    python track_gradient.py --name=resnet --dataset=LSUN --score=min --gpu=0
    python track_gradient.py --name=resnet --dataset=all --score=max
    for i in 0 1 2 3; do python track_gradient.py --name=resnet --dataset=LSUN --shard=$i/4 --gpu=$i & done; wait
"""
import argparse

from utils import tracking
from utils.runtime import run_script


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tracking.add_arguments(parser, with_score=True)
    args = parser.parse_args(argv)
    tracking.main(args, args.score)


if __name__ == "__main__":
    run_script(main)
