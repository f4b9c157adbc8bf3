from __future__ import annotations

import pytest
import torch

# The test models are tiny and op-overhead bound: a second OpenMP thread gains nothing, and when other
# processes share the 2 cores of the CI machine two threads per process run several times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one thread: an entry point run in this process (the bundle's ``initialize``, ``main``)
    sets the count it is told to, and numerics that depend on the thread count must not depend on test order."""
    torch.set_num_threads(1)
    yield
