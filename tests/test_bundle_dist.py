"""Multi-process training of the bundle: ``torchrun`` with 2 CPU processes (gloo) and ``multi_gpu_train.json``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.utils import REPO_ROOT, chaos_dir, requires_chaos

BUNDLE = REPO_ROOT / "bundles" / "sd_fsmis"


@requires_chaos
@pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform == "win32", reason="needs torchrun")
def test_torchrun_two_cpu_processes_train_validate_and_checkpoint(tmp_path):
    settings = {
        "iterations": 4,  # episodes in total: 2 per process
        "val_interval": 2,
        "ckpt_interval": 2,
        "folds": [[0, 1, 2]],
        "organ_ids": [2],
        "spatial_size": 128,
    }
    overrides = [item for key, value in settings.items() for item in (f"--{key}", json.dumps(value))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small machine
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # the module behind the torchrun script
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/train.json','configs/quickstart.json','configs/multi_gpu_train.json']",
        "--dataset_dir",
        str(chaos_dir()),
        "--output_dir",
        str(tmp_path),
        "--device",
        "$torch.device('cpu')",
        *overrides,
    ]
    proc = subprocess.run(command, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(log[-10000:])
    assert proc.returncode == 0

    # Each process ran 2 of the 4 episodes, and both took part in the distributed validation.
    assert log.count("Iter: 2/2 -- train_loss") == 2
    assert log.count("val_mean_dice") >= 2
    assert "Iter: 3/" not in log
    models = tmp_path / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == ["checkpoint_iteration=2.pt", "model.pt"]
    # Only rank 0 writes: one TensorBoard file per engine, not one per process.
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2

    from monai_sdfsmis.networks.sdfsmis import SDFSMIS

    trained = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in trained), "DDP prefix leaked into the checkpoint"
    net = SDFSMIS.tiny(seed=0)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(trained, strict=True)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "the weights did not change during distributed training"
