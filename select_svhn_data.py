"""Write the SVHN OOD test subset: at most 1,000 images per digit of SVHN's test split, in file order.

    python select_svhn_data.py [--data-root datasets] [--per-class 1000]

reads ``<data root>/ood_datasets/svhn/test_32x32.mat`` (from http://ufldl.stanford.edu/housenumbers/)
and writes ``selected_test_32x32.mat`` beside it with the same ``X``/``y`` layout, as ATOM's
``select_svhn_data.py`` does (label 10 is the digit 0 and stays 10).
"""
from pathlib import Path

import numpy as np
import scipy.io

from utils import cli
from utils.data.common import not_found
from utils.data.svhn import SELECTED_FILE, SVHN_URL, TEST_FILE, read_mat, select_per_class
from utils.io import atomic_write
from utils.runtime import run_script


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    cli.add_roots(parser, "data")
    parser.add_argument("--per-class", type=int, default=1000, help="images kept per digit")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be positive")

    source, target = Path(args.data_root) / TEST_FILE, Path(args.data_root) / SELECTED_FILE
    if not source.is_file():
        raise not_found("SVHN", source, "It is SVHN's test split in the 32x32 format (test_32x32.mat).",
                        f"Download it from {SVHN_URL} into {source.parent}/.")
    images, labels = read_mat(source, f"Download it again from {SVHN_URL} into {source.parent}/.")
    keep = select_per_class(labels, args.per_class)
    atomic_write(target, lambda file: scipy.io.savemat(file, {"X": images[..., keep], "y": labels[keep]}))

    kept = labels[keep].ravel()
    for label in sorted(np.unique(labels), key=lambda label: label % 10):
        print(f"digit {label % 10} (label {label}): {np.count_nonzero(kept == label)} of "
              f"{np.count_nonzero(labels == label)}")
    print(f"wrote {target}: {len(keep)} of {labels.shape[0]} images")


if __name__ == "__main__":
    run_script(main)
