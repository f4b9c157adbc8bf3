"""``monai_sdfsmis.utils.configure_cpu_threads``: the CPU thread setting of every entry point.

Each case runs in a fresh interpreter: torch's inter-op pool can be sized only once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.utils import REPO_ROOT

PROBE = r"""
import json, os, sys
import torch
from monai_sdfsmis.utils import configure_cpu_threads
if os.environ.get("PROBE_AFFINITY"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
if os.environ.get("PROBE_WORK_FIRST"):
    torch.ones(256, 256) @ torch.ones(256, 256)  # parallel work already ran: inter-op size is fixed
    torch.jit.wait(torch.jit.fork(torch.add, torch.ones(1), 1))
arg = json.loads(sys.argv[1])
used = configure_cpu_threads(arg)
again = configure_cpu_threads(1)  # a second call must not raise (inter-op threads are set once)
print(json.dumps({"used": used, "again": again, "final": torch.get_num_threads(),
                  "interop": torch.get_num_interop_threads()}))
"""


def _probe(argument, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("SDFSMIS_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    environment.update(env, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-c", PROBE, json.dumps(argument)], env=environment, capture_output=True,
                          text=True, timeout=120)


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_default_follows_affinity_env_var_and_torchrun_share():
    full = json.loads(_probe(None).stdout)
    assert full["used"] == min(_cpus(), 8) and full["again"] == 1 and full["final"] == 1
    assert full["interop"] == full["used"]
    pinned = json.loads(_probe(None, PROBE_AFFINITY="1").stdout)
    assert pinned["used"] == 1  # a process pinned to one core gets one thread, not os.cpu_count()
    assert json.loads(_probe(None, SDFSMIS_NUM_THREADS="3").stdout)["used"] == 3
    assert json.loads(_probe(5, SDFSMIS_NUM_THREADS="3").stdout)["used"] == 5  # an explicit value wins
    shared = json.loads(_probe(None, LOCAL_WORLD_SIZE="2").stdout)
    assert shared["used"] == max(1, min(_cpus() // 2, 8))
    late = json.loads(_probe(2, PROBE_WORK_FIRST="1").stdout)
    assert late["used"] == 2  # intra-op threads still set after parallel work; no error


@pytest.mark.parametrize(("argument", "env", "message"), [
    (None, {"SDFSMIS_NUM_THREADS": "many"}, "SDFSMIS_NUM_THREADS='many' is not a positive integer"),
    (None, {"SDFSMIS_NUM_THREADS": "0"}, "SDFSMIS_NUM_THREADS must be a positive integer, got 0"),
    (0, {}, "num_threads must be a positive integer, got 0"),
])
def test_bad_settings_name_the_setting(argument, env, message):
    proc = _probe(argument, **env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"ValueError: {message}."
