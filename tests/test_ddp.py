"""Real DDP training: ``torchrun`` with 2 CPU processes (gloo) against one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.utils import REPO_ROOT

WORKER = REPO_ROOT / "tests" / "ddp_worker.py"


def _run(command: list[str], out_dir) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([*command, str(WORKER), str(out_dir)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def test_ddp_buckets_keep_ranks_identical_and_equal_one_process_on_the_whole_batch(tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"],
         tmp_path / "ddp")
    _run([sys.executable], tmp_path / "single")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)

    # DDP's reducer ran: at least one bucketed all-reduce per step (DDP re-buckets after the first step), far
    # fewer than one per parameter (the old path all-reduced each parameter outside DDP; the hook counted none).
    steps = 3
    assert ranks[0]["reduces"] == ranks[1]["reduces"]
    assert steps <= ranks[0]["reduces"] <= steps * 4 < ranks[0]["params"]

    for key in ("grads", "weights"):
        assert ranks[0][key].keys() == ranks[1][key].keys() == single[key].keys()
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key} of {name} differ between ranks"
    # the mean of the two per-process gradients is the gradient of the mean loss over both episodes; the sums run
    # in another order, so they agree to float rounding (relative to each tensor's norm)
    for name, expected in single["grads"].items():
        error = (ranks[0]["grads"][name] - expected).norm()
        assert error <= 1e-4 * expected.norm() + 1e-12, f"gradient of {name}: {error:g} from one process"
    for name, expected in single["weights"].items():  # some start at 0 (biases): absolute below norm 1
        error = (ranks[0]["weights"][name] - expected).norm()
        assert error <= 1e-6 * max(float(expected.norm()), 1.0), f"weights of {name}: {error:g} from one process"
    assert any(g.norm() > 0 for n, g in single["grads"].items() if ".attn_sq." in n)
