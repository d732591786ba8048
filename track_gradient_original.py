"""Track per-sample gradient norms of a one-sigmoid-per-class (BCE) classifier against the confounding label.

For every sample, the gradient of ``BCEWithLogitsLoss(f(x), 1)`` (all classes on, mean over classes);
its per-layer L2 norms go to ``gradients/<in-dataset>/<name>/original/<dataset>.pkl`` (``class`` is -1:
no single label is chosen). The in-distribution test set is tracked first if its file is missing.

    python track_gradient_original.py --name=resnet_bce --dataset=LSUN --gpu=0
"""
from utils import cli, tracking
from utils.runtime import run_script


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    tracking.add_arguments(parser, with_score=False)
    tracking.main(parser.parse_args(argv))


if __name__ == "__main__":
    run_script(main)
