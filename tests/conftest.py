from __future__ import annotations

import torch

# The test models are tiny and op-overhead bound: a second OpenMP thread gains nothing, and when other
# processes share the 2 cores of the CI machine two threads per process run several times slower.
torch.set_num_threads(1)
