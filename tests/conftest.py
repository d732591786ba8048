"""Under pytest-xdist (the fast loop's ``-n 2``) each worker computes on one thread: two workers of two threads
each on two cores would take turns at every parallel region."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
