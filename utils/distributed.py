"""Multi-process training with DistributedDataParallel, launched by ``torchrun --nproc_per_node=N``.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; ``process_group`` joins the group they
describe (NCCL on CUDA, gloo on the CPU) and leaves it at the end. A plain ``python script.py`` run, or
a one-process ``torchrun``, creates no process group and runs exactly as a single-process script.
"""
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Context:
    """This process's place in the job."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and logs and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_context() -> Context:
    """The context ``torchrun``'s environment variables describe (a single process without them)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Context()
    return Context(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)


@contextmanager
def process_group(context: Context, device: torch.device) -> Iterator[None]:
    """Join the process group for ``context`` on ``device`` (NCCL for CUDA, gloo for the CPU) for the
    duration of the block; nothing when ``context`` is a single process."""
    if not context.enabled:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over all processes (``values`` itself when single-process)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every process (``[obj]`` when single-process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class RandomStreamSampler(Sampler[int]):
    """Indices drawn uniformly with replacement from ``range(size)``, a fresh stream every epoch.

    Per epoch it draws ``world_size * num_samples`` indices from a generator seeded with ``(seed, epoch)``;
    process ``rank`` takes every ``world_size``-th of them, starting at ``rank``. The processes' streams are
    disjoint parts of one global stream, so ``world_size`` processes with batch ``b`` draw exactly the
    batches of one process with batch ``world_size · b``. Drawing with replacement costs nothing up front,
    even for the 79M images of 80M Tiny Images.
    """

    def __init__(self, size: int, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.num_samples, self.seed = size, num_samples, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = np.random.default_rng([self.seed, self.epoch])
        stream = generator.integers(self.size, size=self.num_samples * self.world_size)
        return iter(stream[self.rank::self.world_size].tolist())
