"""Train a classifier with one sigmoid per class: ``BCEWithLogitsLoss`` against one-hot targets, the
"original" model whose gradients track_gradient_original.py measures.

Defaults: ResNet-20, 100 epochs, SGD with Nesterov momentum 0.9, weight decay 1e-4, lr 0.1 times 0.1 at
epochs 50, 75 and 90. The milestones are those fractions of the run (50%, 75%, 90% of --epochs, rounded
down), so a shorter run keeps the same shape.

    python train_original.py --name=resnet_bce --gpu=0
    torchrun --nproc_per_node=4 train_original.py --name=resnet_bce   # DistributedDataParallel; batches are global
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from utils import cli, optim, training
from utils.runtime import run_script

MILESTONES = (0.5, 0.75, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    training.add_arguments(parser)
    parser.add_argument("--epochs", type=int, default=100, help="epochs to train")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="initial learning rate, ×0.1 after 50%%, 75%% and 90%% of the epochs")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    return parser.parse_args(argv)


def bce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Binary cross-entropy of every class's sigmoid against the one-hot label, averaged over classes and
    samples. Returns the loss, the logits and no extra statistics."""
    x, y = batch
    logits = model(x).float()
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(y, logits.shape[1]).float()), logits, {}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with training.start(args, loss="bce") as run:
        train_set, test_set = run.datasets()
        model = run.model()

        loader = run.loader(train_set, args.batch_size)
        optimizer = optim.sgd(model, args.lr, args.weight_decay)
        milestones = [int(fraction * args.epochs) for fraction in MILESTONES]
        scheduler = optim.step_schedule(optimizer, milestones, steps_per_epoch=len(loader))

        state, test_loader = run.resume(model, optimizer, scheduler), run.test_loader(test_set)
        if not run.announce(state, train_set, test_set, "BCE loss (one sigmoid per class)"):
            return
        for epoch in range(state.epoch, args.epochs):
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "started": time.time()}
            model.train()
            means = training.EpochMeans(run.device)
            for (x, y), in run.batches([loader], epoch):
                with run.autocast():
                    loss, logits, statistics = bce_loss(model, (x, y))
                run.step(loss, optimizer, scheduler, state)
                means.add_step(loss, logits, y, statistics)
            run.end_epoch(model, optimizer, scheduler, state, {**row, **means.reduce()}, test_loader)


if __name__ == "__main__":
    run_script(main)
