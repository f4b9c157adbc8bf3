"""Shared helpers for the test suite: where the real data lives, and skip markers."""

from __future__ import annotations

import os
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
