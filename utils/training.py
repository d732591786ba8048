"""What ``train_energy.py`` and ``train_original.py`` share: the arguments, data loaders, model, the steps of
an epoch (``Run.batches``, ``Run.autocast``, ``Run.step``, ``Run.end_epoch``), evaluation and the epoch's
means. Each script writes its own epoch loop with its loss, in the open; the optimizer and its schedules
are in ``utils.optim``, the run's folder, checkpoints and exact resumption (``Run.resume``) in
``utils.run_folder``.

A run writes ``<checkpoint-root>/<in-dataset>/<name>/`` (layout in ``utils.checkpoints``): ``epoch_<N>.pt``
every epoch, ``last.pt`` with the optimizer, scheduler, AMP-scaler and RNG states of every process,
``meta.json``, and ``log.csv`` with one row per epoch (``epoch``, ``lr`` at the epoch's start, the
epoch's loss settings such as ``lamb``, mean ``loss``, ``train_acc`` and ``test_acc`` in %, the loss's own
statistics such as ``ce`` and ``energy_in``, and ``seconds``). The log is kept inside ``last.pt`` too, so
after ``--resume`` it holds exactly the epochs that the weights have seen.

Several processes (``torchrun --nproc_per_node=N``) train with DistributedDataParallel. Batch sizes are
**global**: each process takes ``batch_size / N`` of every batch, so a run's hyperparameters mean the same
thing on any number of processes. Which images each step sees is a function of ``(seed, epoch)`` alone:
the N processes' shares of a batch are together exactly the images one process would draw with the same
arguments (their random augmentations differ).
"""
import argparse
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

import models
from utils import cli, distributed, run_folder
from utils.checkpoints import build_model, checkpoint_dir, load_checkpoint, unwrap
from utils.data import NORMALIZATION, NUM_CLASSES, get_dataset
from utils.data.transforms import META_KEY as TRANSFORM_KEY
from utils.data.transforms import InputTransform
from utils.errors import UserError
from utils.run_folder import RunFolder, TrainState
from utils.runtime import get_device, loader_workers, progress, seed_everything

DEFAULT_ARCH = "resnet20"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both training scripts take (each script adds ``--epochs``, ``--lr``, ``--weight-decay``
    and its loss's options)."""
    parser.add_argument("--name", required=True,
                        help="run name: checkpoints go to <checkpoint-root>/<in-dataset>/<name>/")
    parser.add_argument("--model-arch", choices=models.ARCHS,
                        help=f"the architecture (default: {DEFAULT_ARCH}, or the --pretrained file's)")
    cli.add_in_dataset(parser)
    parser.add_argument("--batch-size", type=int, default=128,
                        help="in-distribution batch size, global: split evenly over torchrun's processes")
    cli.add_roots(parser, "data", "checkpoint")
    cli.add_device(parser, gpu_help=". Under torchrun each process uses cuda:LOCAL_RANK")
    parser.add_argument("--seed", type=int, default=1, help="seeds the weights, the data order and augmentation")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="smoke runs: use only the first N training and the first N test images")
    parser.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16",
                        help="mixed precision on CUDA (autocast; fp16 adds loss scaling); the CPU always "
                             "trains in float32")
    parser.add_argument("--sync-bn", action="store_true",
                        help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA "
                             "only); by default each process normalises with its own share of the batch")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run from its last.pt, exactly as if it had not stopped; the other "
                            "arguments must be the run's own (only --gpu, --workers, --data-root, "
                            "--checkpoint-root and --amp may change)")
    group.add_argument("--overwrite", action="store_true",
                       help="delete the run's earlier checkpoints and logs and start over")


class Run(RunFolder):
    """One training run in this process (``RunFolder``: its arguments, place in the job, device and checkpoint
    folder), with the steps of an epoch."""

    @property
    def amp_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or self.args.amp == "off":
            return None
        return torch.bfloat16 if self.args.amp == "bf16" else torch.float16

    @property
    def workers(self) -> int:
        return loader_workers(self.args.workers, self.device)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.device.type == "cuda" else torch.preserve_format

    def datasets(self) -> tuple[Dataset, Dataset]:
        """The in-distribution training set (augmented) and test set, each cut to ``--limit``."""
        args = self.args
        train_set = get_dataset(args.in_dataset, args.data_root, train=True)
        test_set = get_dataset(args.in_dataset, args.data_root, train=False)
        if args.limit:
            train_set = Subset(train_set, range(min(args.limit, len(train_set))))
            test_set = Subset(test_set, range(min(args.limit, len(test_set))))
        return train_set, test_set

    def model(self, pretrained: str | None = None) -> nn.Module:
        """The model to train on this run's device: a fresh ``--model-arch`` for ``--in-dataset``, the
        checkpoint file ``pretrained``, or the run's own architecture when resuming; wrapped in
        DistributedDataParallel under torchrun."""
        args = self.args
        spec, net = model_spec(args, self.checkpoint, pretrained)
        self.meta = {"name": args.name, "arch": spec["arch"], "in_dataset": args.in_dataset,
                     "num_classes": spec["num_classes"], "mean": list(spec["mean"]), "std": list(spec["std"]),
                     "arch_kwargs": dict(spec.get("arch_kwargs", {})), "loss": self.loss, "args": dict(vars(args)),
                     TRANSFORM_KEY: InputTransform.from_meta(spec).to_meta()}  # a pretrained model's, or CIFAR's
        net = net.to(self.device, memory_format=self.memory_format)
        if not self.dist.enabled:
            return net
        if args.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # DDP copies rank 0's weights to every process, so all start from the same model.
        return DistributedDataParallel(net, device_ids=[self.device] if self.device.type == "cuda" else None)

    def loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """Shuffled batches of ``dataset``, this process's share (``batch_size`` is global)."""
        # DistributedSampler for one process too: a permutation seeded by (seed, epoch) alone.
        sampler = DistributedSampler(dataset, self.dist.world_size, self.dist.rank, seed=self.args.seed)
        return DataLoader(dataset, batch_size // self.dist.world_size, sampler=sampler,
                          num_workers=self.workers, pin_memory=self.device.type == "cuda")

    def outlier_loader(self, dataset: Dataset, batch_size: int, steps: int) -> DataLoader:
        """``steps`` batches per epoch of auxiliary images sampled at random (``RandomStreamSampler``), this
        process's share (``batch_size`` is global)."""
        local = batch_size // self.dist.world_size
        sampler = distributed.RandomStreamSampler(len(dataset), steps * local, self.args.seed, self.dist.rank,
                                      self.dist.world_size)
        return DataLoader(dataset, local, sampler=sampler, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda")

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR) -> TrainState:
        """Where training starts: epoch 0 with an empty log, or, with ``--resume``, ``last.pt`` loaded into the
        model, optimizer, scheduler, AMP scaler and random states. The scaler does loss scaling for fp16 AMP."""
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        epoch, history = run_folder.restore(self, model, optimizer, scheduler, scaler) if self.checkpoint else (0, [])
        return TrainState(epoch, history, scaler)

    def announce(self, state: TrainState, train_set: Dataset, test_set: Dataset, description: str) -> bool:
        """Say what is trained; False when every epoch is already done (nothing to train)."""
        if state.epoch >= self.args.epochs:
            self.print(f"{self.directory} has already trained all {self.args.epochs} epochs; nothing to do.")
            return False
        self.print(f"{self.args.name}: {self.meta['arch']} on {self.args.in_dataset} ({len(train_set)} training, "
                   f"{len(test_set)} test images), {description}, epochs {state.epoch + 1}-{self.args.epochs}, "
                   f"{self.dist.world_size} process(es) on {self.device.type}; checkpoints in {self.directory}")
        return True

    def test_loader(self, test_set: Dataset) -> DataLoader:
        """This process's share of the test images, for ``end_epoch``'s accuracy."""
        return DataLoader(Subset(test_set, range(self.dist.rank, len(test_set), self.dist.world_size)),
                          self.args.batch_size, num_workers=self.workers)

    def batches(self, loaders: Sequence[DataLoader], epoch: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """One epoch: a batch from every loader at each step, on the device, with a progress bar."""
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        self._bar = progress(zip(*loaders), total=len(loaders[0]), desc=f"epoch {epoch + 1}/{self.args.epochs}",
                             disable=not self.is_main, leave=False, dynamic_ncols=True)
        for batches in self._bar:
            yield [self.to_device(batch) for batch in batches]
        self._bar.close()

    def autocast(self) -> torch.autocast:
        """Mixed precision on CUDA (``--amp``); float32 on the CPU."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
             state: TrainState) -> None:
        """One optimizer step on ``loss`` (scaled for fp16), then one scheduler step."""
        optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(optimizer)
        state.scaler.update()
        scheduler.step()
        if state.steps % 20 == 0 and self.is_main:
            self._bar.set_postfix(loss=f"{loss.item():.4f}")
        state.steps += 1

    def end_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                  state: TrainState, row: dict, test_loader: DataLoader) -> None:
        """Complete the epoch's log ``row`` with the test accuracy and the seconds since ``row["started"]``,
        print it, and save the checkpoint with everything ``--resume`` needs."""
        started = row.pop("started")
        row["test_acc"] = test_accuracy(self, model, test_loader)
        row["seconds"] = time.time() - started
        state.history.append(row)
        state.epoch = row["epoch"]
        self.print(f"epoch {row['epoch']}/{self.args.epochs}  " + "  ".join(
            f"{key} {value:.4g}" for key, value in row.items() if key != "epoch"))
        run_folder.save_epoch(self, model, optimizer, scheduler, state)

    def to_device(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return (images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                labels.to(self.device, non_blocking=True))

@torch.no_grad()
def test_accuracy(run: Run, model: nn.Module, loader: DataLoader) -> float:
    """Accuracy (%) on the test images, each process scoring its share."""
    net = unwrap(model).eval()
    accuracy = EpochMeans(run.device)
    for batch in loader:
        images, labels = run.to_device(batch)
        with run.autocast():
            logits = net(images)
        accuracy.add("test_acc", 100 * (logits.argmax(1) == labels).sum(), len(labels))
    return accuracy.reduce()["test_acc"]


def model_spec(args: argparse.Namespace, checkpoint: dict | None, pretrained: str | None
               ) -> tuple[dict, nn.Module]:
    """What a run trains, as (spec, model): the run's own architecture when resuming (``resume`` loads the
    weights), the checkpoint file ``pretrained`` with its weights, or a fresh ``--model-arch`` with the
    in-dataset's normalisation."""
    if checkpoint:
        return checkpoint["meta"], build_model(checkpoint["meta"])
    if pretrained:
        saved = load_checkpoint(pretrained)
        spec = saved["meta"]
        if spec["in_dataset"] != args.in_dataset or args.model_arch not in (None, spec["arch"]):
            raise UserError(f"--pretrained {pretrained} is a {spec['arch']} trained on {spec['in_dataset']}; "
                            f"pass --in-dataset={spec['in_dataset']} --model-arch={spec['arch']} to fine-tune it.")
        net = build_model(spec)
        net.load_state_dict(saved["state_dict"])
        return spec, net
    mean, std = NORMALIZATION[args.in_dataset]
    spec = {"arch": args.model_arch or DEFAULT_ARCH, "num_classes": NUM_CLASSES[args.in_dataset],
            "mean": list(mean), "std": list(std), "arch_kwargs": {}}
    return spec, build_model(spec)


@contextmanager
def start(args: argparse.Namespace, loss: str) -> Iterator[Run]:
    """Set up a run: join torchrun's process group if there is one, pick the device, check the checkpoint
    folder (refusing to overwrite a trained model unless ``--resume`` or ``--overwrite``) and seed."""
    context = distributed.launched_context()
    device = get_device(args.gpu)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    run_folder.check_arguments(args, context, device)
    with distributed.process_group(context, device):
        directory = checkpoint_dir(args.in_dataset, args.name, args.checkpoint_root)
        checkpoint = run_folder.prepare_directory(directory, args, loss, context)
        seed_everything(args.seed + context.rank)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield Run(args, loss, context, device, directory, checkpoint)


class EpochMeans:
    """Running sums of per-sample statistics, kept on the device (no synchronisation per step)."""

    def __init__(self, device: torch.device):
        self.device, self.totals, self.counts = device, {}, {}

    def add(self, key: str, total: torch.Tensor, count: int) -> None:
        self.totals[key] = self.totals.get(key, 0) + total.to(torch.float64)
        self.counts[key] = self.counts.get(key, 0) + count

    def add_step(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                 statistics: dict[str, torch.Tensor]) -> None:
        """A training step's loss, accuracy and per-sample ``statistics`` (e.g. energies)."""
        self.add("loss", loss.detach() * len(labels), len(labels))
        self.add("train_acc", 100 * (logits.argmax(1) == labels).sum(), len(labels))
        for key, values in statistics.items():
            self.add(key, values.detach().float().sum(), values.numel())

    def reduce(self) -> dict[str, float]:
        """The mean of every statistic over all processes."""
        keys = list(self.totals)
        counts = torch.tensor([float(self.counts[key]) for key in keys], dtype=torch.float64, device=self.device)
        totals = torch.stack([self.totals[key] for key in keys])
        totals, counts = distributed.all_reduce_sum(torch.stack([totals, counts])).tolist()
        return {key: total / count for key, total, count in zip(keys, totals, counts)}
