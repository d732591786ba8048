"""Track per-sample gradient norms of a cross-entropy classifier on an in-distribution or OOD test set.

``--score`` is the detector (``utils/detectors/``): ``min``/``max``/``pred`` keep, of the K cross-entropy
gradients (one per label), the smallest or largest in L2 norm over all tracked weights, or the predicted
label's; ``gradnorm`` the L1 norms of the gradient of Σ_k −log softmax(f(x)/T)_k (Huang et al. 2021);
``exgrad`` the per-class gradient norms expected under the model's prediction (Igoe et al. 2022); ``odin``
the max softmax at temperature ``--odin-temperature`` of the image moved by ``--epsilon`` against the input
gradient (Liang et al. 2018; its own backward pass to the input); ``all`` every one of them, the weight
gradients from one forward and one backward pass. Each detector's per-layer norms go to
``gradients/<in-dataset>/<name>/<score>/<dataset>.pkl``. The in-distribution test set is tracked first if
its file is missing. ``--layers last`` tracks the last (Linear) layer alone, from the penultimate features with
no backward pass, into ``<score>-last/``.

    python track_gradient.py --name=resnet --dataset=LSUN --score=min --gpu=0
    python track_gradient.py --name=resnet --dataset=all --score=all
    python track_gradient.py --name=resnet --dataset=all --score=gradnorm --layers=last
    for i in 0 1 2 3; do python track_gradient.py --name=resnet --dataset=LSUN --shard=$i/4 --gpu=$i & done; wait
"""
from utils import cli, tracking
from utils.runtime import run_script


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    tracking.add_arguments(parser, with_score=True)
    args = parser.parse_args(argv)
    tracking.main(args)


if __name__ == "__main__":
    run_script(main)
