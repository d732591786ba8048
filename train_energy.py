"""Train a classifier with energy-bounded outlier exposure (Liu et al., "Energy-based Out-of-distribution
Detection", NeurIPS 2020), as energy_ood's ``train.py --score energy``:

    loss = CE(f(x_in), y) + λ · ( mean(relu(E(x_in) − m_in)²) + mean(relu(m_out − E(x_out))²) ),
    E(x) = −T · logsumexp(f(x) / T),

where every step draws an in-distribution batch and a batch of auxiliary outliers (sampled at random from
--aux-dataset) and passes them through the network together, so BatchNorm normalises with both.

From scratch (default): ResNet-20, 100 epochs, lr 0.1, and λ on a schedule: it rises linearly over the
first --energy-ramp of the epochs (default 0.5: λ·k/51 in epoch k of 1-50) and is the paper's λ from
then on; --energy-warmup (default 0) puts epochs of cross-entropy alone before the ramp. At full strength
from the first step the regulariser outweighs cross-entropy (a fresh network's E(x_in) ≈ −2.5 is 22 above
m_in) and the classes are often not learnt at all; switched on at full strength after a cross-entropy
warm-up, it throws the classifier back (README, "Energy training from scratch", has the measurements).
With --pretrained CKPT it fine-tunes that checkpoint as in the paper: 10 epochs, lr 0.001, the paper's
loss throughout. Either way SGD with Nesterov momentum 0.9, weight decay 5e-4 and the learning rate
cosine-annealed per step to 1e-6. Each epoch logs the loss and its terms, ``loss = ce + lamb ·
energy_reg`` (``lamb``: the epoch's λ), and the mean energies ``energy_in`` and ``energy_out``.

    python train_energy.py --name=resnet --gpu=0
    torchrun --nproc_per_node=4 train_energy.py --name=resnet     # DistributedDataParallel; batches are global
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from utils import cli, optim, training
from utils.data import AUX_DATASETS, get_dataset
from utils.energy import energy_regularizer, energy_score
from utils.errors import UserError
from utils.runtime import run_script

WARMUP, RAMP = 0.0, 0.5  # from scratch: the fractions of the epochs with λ = 0, and with λ rising


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    training.add_arguments(parser)
    parser.add_argument("--epochs", type=int, help="(default: 100, or 10 with --pretrained)")
    parser.add_argument("--lr", type=float, help="initial learning rate (default: 0.1, or 0.001 with --pretrained)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--pretrained", metavar="CKPT",
                        help="fine-tune this checkpoint file written by these scripts (e.g. a cross-entropy "
                             "model trained with --lamb=0: checkpoints/CIFAR-10/<name>/last.pt) instead of "
                             "training from scratch")
    parser.add_argument("--aux-dataset", default="tinyimages", choices=AUX_DATASETS,
                        help="auxiliary outliers")
    parser.add_argument("--oe-batch-size", type=int, default=256,
                        help="outlier batch size, global like --batch-size")
    parser.add_argument("--m_in", type=float, default=-25.0,
                        help="in-distribution energy margin")
    parser.add_argument("--m_out", type=float, default=-7.0, help="outlier energy margin")
    parser.add_argument("--lamb", type=float, default=0.1, help="weight λ of the energy loss")
    parser.add_argument("--T", type=float, default=1.0, help="energy temperature")
    parser.add_argument("--energy-warmup", type=float, metavar="FRACTION",
                        help=f"the first FRACTION × --epochs (rounded down) epochs train with cross-entropy alone "
                             f"(λ = 0) (default: {WARMUP} from scratch, 0 with --pretrained)")
    parser.add_argument("--energy-ramp", type=float, metavar="FRACTION",
                        help=f"then λ rises linearly over FRACTION × --epochs (rounded down) epochs before it "
                             f"reaches --lamb (default: {RAMP} from scratch, 0 with --pretrained)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 10 if args.pretrained else 100
    if args.lr is None:
        args.lr = 0.001 if args.pretrained else 0.1
    for option, default in (("energy_warmup", WARMUP), ("energy_ramp", RAMP)):
        if getattr(args, option) is None:
            setattr(args, option, 0.0 if args.pretrained else default)
        if not 0 <= getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')} is a fraction of the epochs in [0, 1), "
                            f"got {getattr(args, option)}.")
    if args.energy_warmup + args.energy_ramp >= 1:
        raise UserError(f"--energy-warmup {args.energy_warmup:g} + --energy-ramp {args.energy_ramp:g} must be "
                        f"below 1, so that the last epochs train with the full loss.")
    return args


def energy_phases(epochs: int, warmup: float, ramp: float) -> tuple[int, int]:
    """How many of ``epochs`` have λ = 0 (``warmup × epochs``) and then a rising λ (``ramp × epochs``),
    rounded down."""
    # round() first: 0.29 × 100 is 28.999999999999996
    n_warmup, n_ramp = (math.floor(round(fraction * epochs, 9)) for fraction in (warmup, ramp))
    return n_warmup, n_ramp


def energy_weight(epoch: int, epochs: int, lamb: float, warmup: float, ramp: float) -> float:
    """λ in ``epoch`` (0-based): 0 in the ``n_warmup`` epochs of the warm-up, ``lamb · k / (n_ramp + 1)`` in
    the k-th epoch of the ramp after it, and ``lamb`` from then on (``energy_phases``)."""
    n_warmup, n_ramp = energy_phases(epochs, warmup, ramp)
    return lamb * min(1.0, max(0, epoch - n_warmup + 1) / (n_ramp + 1))


Batch = tuple[torch.Tensor, torch.Tensor]


def energy_loss(model: nn.Module, batch_in: Batch, batch_out: Batch, *, lamb: float | None, m_in: float,
                m_out: float, T: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on the in-distribution batch plus ``lamb`` times the energy regulariser; one forward
    pass over both batches. ``lamb=None`` is cross-entropy alone, without a regulariser to log (``--lamb=0``).
    Returns the loss, the in-distribution logits and the statistics to log: both batches' energies and the
    loss's terms ``ce`` and ``energy_reg``, repeated per ID sample so that their epoch means are weighted
    like the loss's."""
    (x_in, y), (x_out, _) = batch_in, batch_out
    logits = model(torch.cat((x_in, x_out))).float()
    logits_in, logits_out = logits[:len(x_in)], logits[len(x_in):]
    energy_in, energy_out = energy_score(logits_in, T), energy_score(logits_out, T)
    loss = F.cross_entropy(logits_in, y)
    statistics = {"ce": loss.detach().expand(len(y)), "energy_in": energy_in, "energy_out": energy_out}
    if lamb is not None:
        regularizer = energy_regularizer(energy_in, energy_out, m_in, m_out)
        statistics["energy_reg"] = regularizer.detach().expand(len(y))
        loss = loss + lamb * regularizer
    return loss, logits_in, statistics


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with training.start(args, loss="energy") as run:
        train_set, test_set = run.datasets()
        aux_set = get_dataset(args.aux_dataset, args.data_root, train=True)
        model = run.model(pretrained=args.pretrained)

        in_loader = run.loader(train_set, args.batch_size)
        out_loader = run.outlier_loader(aux_set, args.oe_batch_size, steps=len(in_loader))
        optimizer = optim.sgd(model, args.lr, args.weight_decay)
        scheduler = optim.cosine_schedule(optimizer, args.epochs * len(in_loader))
        state, test_loader = run.resume(model, optimizer, scheduler), run.test_loader(test_set)
        if not run.announce(state, train_set, test_set, describe(args)):
            return
        for epoch in range(state.epoch, args.epochs):
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "started": time.time()}
            lamb = None  # --lamb=0: cross-entropy alone, no regulariser to log
            if args.lamb:
                row["lamb"] = lamb = energy_weight(epoch, args.epochs, args.lamb, args.energy_warmup, args.energy_ramp)
            model.train()
            means = training.EpochMeans(run.device)
            for (x_in, y), (x_out, _) in run.batches([in_loader, out_loader], epoch):
                with run.autocast():  # one forward pass over both batches: BatchNorm sees both, as in energy_ood
                    loss, logits_in, statistics = energy_loss(model, (x_in, y), (x_out, _), lamb=lamb, m_in=args.m_in,
                                                              m_out=args.m_out, T=args.T)
                run.step(loss, optimizer, scheduler, state)
                means.add_step(loss, logits_in, y, statistics)
            run.end_epoch(model, optimizer, scheduler, state, {**row, **means.reduce()}, test_loader)


def describe(args: argparse.Namespace) -> str:
    """What ``--lamb``, the margins and the λ schedule make of the loss, for the run's first line."""
    if args.lamb == 0:
        return "cross-entropy loss (--lamb=0: no energy regulariser)"
    n_warmup, n_ramp = energy_phases(args.epochs, args.energy_warmup, args.energy_ramp)
    phases = [f"cross-entropy alone in epochs 1-{n_warmup}"] if n_warmup else []
    if n_ramp:
        phases.append(f"λ rising linearly in epochs {n_warmup + 1}-{n_warmup + n_ramp}")
    return (f"cross-entropy + λ × energy regulariser (margins {args.m_in:g} / {args.m_out:g}, "
            f"λ = {args.lamb:g}{''.join(f'; {phase}' for phase in phases)})")


if __name__ == "__main__":
    run_script(main)
