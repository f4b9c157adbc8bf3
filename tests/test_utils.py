from __future__ import annotations

import os

import pytest

from monai_sdfsmis.utils import atomic_folder, atomic_path, atomic_write


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "volume.nii.gz"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz")  # writers pick the format by suffix
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["volume.nii.gz"]


def test_written_file_gets_plain_open_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "sub" / "table.md", "x")
    finally:
        os.umask(umask)
    assert path.read_text() == "x"
    assert path.stat().st_mode & 0o777 == 0o644


def test_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash while saving")
    assert (target / "weights").read_text() == "v1"
    umask = os.umask(0o022)
    try:
        with atomic_folder(target) as tmp:
            (tmp / "weights").write_text("v2")
    finally:
        os.umask(umask)
    assert (target / "weights").read_text() == "v2"
    assert target.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700: others may read a saved model
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a file of that name"):
        with atomic_folder(tmp_path / "a_file"):
            pass


def test_training_autocast_runs_bf16_where_asked():
    import torch

    from monai_sdfsmis.utils import training_autocast

    a, b = torch.ones(4, 4), torch.ones(4, 4)
    with training_autocast("cpu", amp=True, amp_on_cpu=False):
        assert (a @ b).dtype == torch.float32  # amp alone is for CUDA: CPU stays fp32
    with training_autocast(torch.device("cpu"), amp=False, amp_on_cpu=True):
        assert (a @ b).dtype == torch.bfloat16
    with training_autocast("cuda", amp=False, amp_on_cpu=True):  # nothing for CUDA unless amp
        assert (a @ b).dtype == torch.float32
