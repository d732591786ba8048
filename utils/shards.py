"""Tracking across processes (``--shard i/n``): which samples each part holds, and merging the parts.
``--shard i/n`` tracks the i-th of n contiguous parts of each data set into ``<dataset>.shard<i>of<n>.pkl``;
the process that writes the last missing part merges them into ``<dataset>.pkl`` and removes the parts.
Parts are cut at batch boundaries, so every sample is computed in the same batch as in a single run and
the merged file equals a single-process run's. A failed part is rerun alone with the same command.
"""
import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError
from utils.gradients import GradientFileError, concatenate_records, load_gradients, save_gradients


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 0/4, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {text!r}")
    return index, count


@dataclass(frozen=True)
class Part:
    """Samples [start, stop) of the first ``num_samples`` of a data set: all of them, or shard ``index``
    of ``count`` (cut at multiples of ``images_per_batch``)."""
    num_samples: int
    images_per_batch: int
    start: int
    stop: int
    index: int = 0
    count: int = 1

    @classmethod
    def of(cls, num_samples: int, images_per_batch: int, shard: tuple[int, int] | None) -> "Part":
        index, count = shard or (0, 1)
        batches = math.ceil(num_samples / images_per_batch)
        start, stop = (min(b * batches // count * images_per_batch, num_samples) for b in (index, index + 1))
        return cls(num_samples, images_per_batch, start, stop, index, count)

    def siblings(self) -> list["Part"]:
        return [Part.of(self.num_samples, self.images_per_batch, (i, self.count)) for i in range(self.count)]

    def path(self, final: Path) -> Path:
        """Where this part's record goes: the final file itself for an unsharded run."""
        return final if self.count == 1 else final.with_name(f"{final.stem}.shard{self.index}of{self.count}.pkl")

    def describe(self) -> dict:
        return {"index": self.index, "count": self.count, "start": self.start, "stop": self.stop,
                "of": self.num_samples, "images_per_batch": self.images_per_batch}


def merge(part: Part, final: Path) -> bool:
    """Concatenate the shard files of ``part``'s siblings into ``final`` in sample order and remove them.

    Returns False, leaving everything in place, while a shard is missing (or another process has merged).
    """
    parts = [p for p in part.siblings() if p.stop > p.start]
    if not all(p.path(final).is_file() for p in parts):
        return False
    try:
        records = [load_gradients(p.path(final)) for p in parts]
    except GradientFileError:  # removed by a process merging at the same moment
        return False
    for p, record in zip(parts, records):
        if record.get("shard") != p.describe() or record["model"] != records[0]["model"]:
            raise UserError(f"{p.path(final)} is not part {p.index} of the same run ({p.describe()}, "
                            f"model {records[0]['model']}); remove it and rerun that shard.")
    save_gradients(concatenate_records(records), final)
    for p in parts:
        p.path(final).unlink(missing_ok=True)
    return True
