"""Multi-process training with DistributedDataParallel, launched by ``torchrun --nproc_per_node=N``.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; ``process_group`` joins the group they
describe (NCCL on CUDA, gloo on the CPU) and leaves it at the end. A plain ``python script.py`` run, or
a one-process ``torchrun``, creates no process group and runs exactly as a single-process script.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


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
