"""Train a classifier with energy-bounded outlier exposure (Liu et al., "Energy-based Out-of-distribution
Detection", NeurIPS 2020), as energy_ood's ``train.py --score energy``:

    loss = CE(f(x_in), y) + λ · ( mean(relu(E(x_in) − m_in)²) + mean(relu(m_out − E(x_out))²) ),
    E(x) = −T · logsumexp(f(x) / T),

where every step draws an in-distribution batch and a batch of auxiliary outliers (sampled at random from
--aux-dataset) and passes them through the network together, so BatchNorm normalises with both.

From scratch (default): ResNet-20, 100 epochs, lr 0.1. With --pretrained CKPT it fine-tunes that
checkpoint as in the paper: 10 epochs, lr 0.001. Either way SGD with Nesterov momentum 0.9, weight decay
5e-4 and the learning rate cosine-annealed per step to 1e-6.

    python train_energy.py --name=resnet --gpu=0
    torchrun --nproc_per_node=4 train_energy.py --name=resnet     # DistributedDataParallel; batches are global
"""
import argparse
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from utils import training
from utils.data import AUX_DATASETS, get_dataset
from utils.energy import energy_regularizer, energy_score
from utils.runtime import run_script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_arguments(parser)
    parser.add_argument("--epochs", type=int, help="(default: 100, or 10 with --pretrained)")
    parser.add_argument("--lr", type=float, help="initial learning rate (default: 0.1, or 0.001 with --pretrained)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="(default: %(default)s)")
    parser.add_argument("--pretrained", metavar="CKPT",
                        help="fine-tune this checkpoint file written by these scripts (e.g. a cross-entropy "
                             "model trained with --lamb=0: checkpoints/CIFAR-10/<name>/last.pt) instead of "
                             "training from scratch")
    parser.add_argument("--aux-dataset", default="tinyimages", choices=AUX_DATASETS,
                        help="auxiliary outliers (default: %(default)s)")
    parser.add_argument("--oe-batch-size", type=int, default=256,
                        help="outlier batch size, global like --batch-size (default: %(default)s)")
    parser.add_argument("--m_in", type=float, default=-25.0,
                        help="in-distribution energy margin (default: %(default)s)")
    parser.add_argument("--m_out", type=float, default=-7.0, help="outlier energy margin (default: %(default)s)")
    parser.add_argument("--lamb", type=float, default=0.1, help="weight λ of the energy loss (default: %(default)s)")
    parser.add_argument("--T", type=float, default=1.0, help="energy temperature (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 10 if args.pretrained else 100
    if args.lr is None:
        args.lr = 0.001 if args.pretrained else 0.1
    return args


Batch = tuple[torch.Tensor, torch.Tensor]


def energy_loss(model: nn.Module, batch_in: Batch, batch_out: Batch, *, lamb: float, m_in: float, m_out: float,
                T: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on the in-distribution batch plus ``lamb`` times the energy regulariser; one forward
    pass over both batches. Returns the loss, the in-distribution logits and both batches' energies."""
    (x_in, y), (x_out, _) = batch_in, batch_out
    logits = model(torch.cat((x_in, x_out))).float()
    logits_in, logits_out = logits[:len(x_in)], logits[len(x_in):]
    energy_in, energy_out = energy_score(logits_in, T), energy_score(logits_out, T)
    loss = F.cross_entropy(logits_in, y) + lamb * energy_regularizer(energy_in, energy_out, m_in, m_out)
    return loss, logits_in, {"energy_in": energy_in, "energy_out": energy_out}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with training.start(args, loss="energy") as run:
        train_set, test_set = run.datasets()
        aux_set = get_dataset(args.aux_dataset, args.data_root, train=True)
        model = run.model(pretrained=args.pretrained)

        in_loader = run.loader(train_set, args.batch_size)
        out_loader = run.outlier_loader(aux_set, args.oe_batch_size, steps=len(in_loader))
        optimizer = training.sgd(model, args.lr, args.weight_decay)
        scheduler = training.cosine_schedule(optimizer, args.epochs * len(in_loader))
        loss_fn = partial(energy_loss, lamb=args.lamb, m_in=args.m_in, m_out=args.m_out, T=args.T)

        run.fit(model, optimizer, scheduler, [in_loader, out_loader], loss_fn, test_set)


if __name__ == "__main__":
    run_script(main)
