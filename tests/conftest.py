from __future__ import annotations

import torch

# The CI machine has 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(2)
