"""Shared helpers for the test suite: where the real data lives, and skip markers."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$SDFSMIS_DATA_DIR`` if set, else ``../shared/data`` beside the repository."""
    env = os.environ.get("SDFSMIS_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def chaos_dir() -> Path:
    return shared_data_dir() / "chaos_t2spir"


def totalseg_dir() -> Path:
    return shared_data_dir() / "totalseg_examples"


requires_chaos = pytest.mark.skipif(
    not (chaos_dir() / "image_1.nii.gz").exists(), reason="CHAOS T2-SPIR copy not found (set SDFSMIS_DATA_DIR)"
)
requires_totalseg = pytest.mark.skipif(
    not (totalseg_dir() / "ct_dicom").exists(), reason="TotalSegmentator examples not found (set SDFSMIS_DATA_DIR)"
)


def link_chaos_subset(destination: Path, volumes: tuple[int, ...] = (1, 2, 3, 5)) -> Path:
    """An ALPNet-layout folder of symbolic links to a few CHAOS volumes (the data stays where it is)."""
    (destination / "supervoxels_5000").mkdir(parents=True)
    for n in volumes:
        os.symlink(chaos_dir() / f"image_{n}.nii.gz", destination / f"image_{n}.nii.gz")
        os.symlink(chaos_dir() / f"label_{n}.nii.gz", destination / f"label_{n}.nii.gz")
        os.symlink(chaos_dir() / "supervoxels_5000" / f"superpix-MIDDLE_{n}.nii.gz",
                   destination / "supervoxels_5000" / f"superpix-MIDDLE_{n}.nii.gz")
    return destination


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path, what: str, seconds: float) -> None:
    """Poll ``url`` until it answers 200; fail with the tail of ``log`` if ``proc`` exits or ``seconds`` pass."""
    import requests

    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not up after {seconds:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` by its PID (also when a test failed), then kill it if it does not exit in 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
