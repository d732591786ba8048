"""Import a published checkpoint (a bare state dict) as this project's checkpoint, so that every script takes
it by --name: keys renamed, DataParallel's ``module.`` and PrunedModel's ``model.`` stripped, pruning masks
multiplied in, the source's input normalisation stored in the model and its input transform (resize, crop) in the
metadata, the load strict (utils/released.py).

    python import_checkpoint.py cifar10_wrn_pretrained_epoch_99.pt --source=oe --in-dataset=CIFAR-10 --name=oe_wrn
    python track_gradient.py --name=oe_wrn --dataset=LSUN --score=min --gpu=0
    python import_checkpoint.py resnet50-0676ba61.pth --source=torchvision --in-dataset=ImageNet --name=resnet50
    python import_checkpoint.py BiT-S-R101x1-flat-finetune.pth.tar --source=bit --in-dataset=ImageNet --name=bit_r101

It writes <checkpoint-root>/<in-dataset>/<name>/last.pt, epoch_0.pt (epoch 0: nothing was trained here) and
meta.json, whose "source" records the repository, the file and its sha256. docs/released_checkpoints.md lists
where each source publishes its files and the numbers they should reproduce.
"""
import argparse
from pathlib import Path

import models
from utils import cli
from utils.checkpoints import checkpoint_dir, describe_checkpoints, save_checkpoint
from utils.data.imagenet import CLASS_ORDER_KEY
from utils.data.transforms import META_KEY
from utils.errors import UserError
from utils.released import LOSSES, SOURCES, WEIGHT_TRANSFORMS, convert
from utils.runtime import run_script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("file", metavar="FILE", help="the published checkpoint file")
    parser.add_argument("--source", required=True, choices=tuple(SOURCES),
                        help="the repository whose code saved FILE. "
                             + " ".join(f"{s.name}: {s.repository} ({', '.join(s.archs)}); {s.notes}."
                                        for s in SOURCES.values()))
    parser.add_argument("--name", required=True, help="the run name: <checkpoint-root>/<in-dataset>/<name>/")
    cli.add_in_dataset(parser)
    parser.add_argument("--model-arch", choices=models.ARCHS,
                        help="the architecture (default: the source's architecture that FILE's keys and shapes match)")
    cli.add_roots(parser, "checkpoint", "data")
    parser.add_argument("--mean", type=float, nargs=3, metavar="M",
                        help="input mean per channel, instead of the source's")
    parser.add_argument("--std", type=float, nargs=3, metavar="S",
                        help="input std per channel, instead of the source's")
    parser.add_argument("--loss", choices=LOSSES,
                        help="the loss FILE was trained with, recorded so that the tracking scripts warn on a "
                             "mismatch: ce (cross-entropy), oe (OE's fine-tuning), energy (energy_ood's energy_ft), "
                             "bce (one sigmoid per class) (default: the source's, see --source)")
    parser.add_argument("--weights", choices=tuple(WEIGHT_TRANSFORMS),
                        help="--source=torchvision: which of torchvision's ResNet-50 weights FILE holds, which sets "
                             "its input transform (default: read from the file's sha256, whose first 8 hex digits "
                             "torchvision puts in the file name; IMAGENET1K_V1 for any other file)")
    parser.add_argument("--class-list", metavar="FILE",
                        help="--source=bit: MOS's imagenet2012_val_list.txt, whose labels give the head's class order "
                             "(default: <data-root>/imagenet/imagenet2012_val_list.txt; from "
                             "https://github.com/deeplearning-wisc/gradnorm_ood, data_lists/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    directory = checkpoint_dir(args.in_dataset, args.name, args.checkpoint_root)
    if describe_checkpoints(directory):
        raise UserError(f"{directory} already holds a model ({describe_checkpoints(directory)}); import under "
                        f"another --name, or remove that folder first.")
    class_list = args.class_list or Path(args.data_root) / "imagenet" / "imagenet2012_val_list.txt"
    converted = convert(args.file, args.source, args.in_dataset, args.model_arch, args.mean, args.std, args.loss,
                        args.weights, class_list)
    meta = {"name": args.name, "arch": converted.arch, "in_dataset": args.in_dataset,
            "num_classes": converted.num_classes, "mean": list(converted.mean), "std": list(converted.std),
            "arch_kwargs": converted.arch_kwargs, "loss": converted.loss, "epoch": 0, "args": dict(vars(args)),
            META_KEY: converted.transform.to_meta(),
            "source": {"kind": args.source, "repository": SOURCES[args.source].repository, "file": args.file,
                       "sha256": converted.sha256, "masks_applied": converted.masks_applied}}
    if converted.weights:
        meta["source"]["weights"] = converted.weights
    if converted.class_order is not None:
        meta[CLASS_ORDER_KEY] = converted.class_order
        meta["source"]["class_list"] = str(class_list)
    save_checkpoint(directory, converted.model, meta)
    print(f"imported {args.file} ({args.source}: {converted.arch}, {converted.num_classes} classes, loss "
          f"{converted.loss}, mean {[round(m, 4) for m in converted.mean]}, std {[round(s, 4) for s in converted.std]}"
          f"{f', {converted.masks_applied} pruning masks applied' if converted.masks_applied else ''}) "
          f"as {directory / 'last.pt'}")


if __name__ == "__main__":
    run_script(main)
