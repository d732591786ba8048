"""How much each section of ``bench/cuda_check.py`` measures, shared by the sections in
``bench/cuda_measure.py`` and ``bench/cuda_runs.py`` (a module below all three, so imports run one way)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """How much each section measures: ``FULL`` for the figures, ``QUICK`` for a smoke run."""
    archs: tuple[str, ...]
    exact_images: int              # compared against the float64 loop
    loop_images: int               # timed through the loop
    timed_images: int              # timed through the engine and the ceiling
    batch_sizes: tuple[int, ...]   # rows back-propagated at once; the first is tracking's default --batch-size
    vmap_images: int
    vmap_batches: tuple[int, ...]  # images per vmap call
    step_batch: tuple[int, int]    # in-distribution and outlier images per training step
    steps: int                     # timed training steps
    limit: int                     # digits images the training runs use (--limit)
    tracked: int                   # images each tracking run tracks (--limit)


FULL = Sizes(archs=("resnet20", "wrn40_2"), exact_images=32, loop_images=16, timed_images=2048,
             batch_sizes=(256, 1024, 4096), vmap_images=512, vmap_batches=(16, 64, 256), step_batch=(128, 256),
             steps=20, limit=1297, tracked=256)
QUICK = Sizes(archs=("resnet20",), exact_images=4, loop_images=2, timed_images=8, batch_sizes=(256,),
              vmap_images=4, vmap_batches=(4,), step_batch=(16, 32), steps=2, limit=32, tracked=16)
