"""Atomic file writing shared by every module that writes results: a reader never sees a half-written file."""

from __future__ import annotations

__all__ = ["atomic_path", "atomic_write", "atomic_folder"]

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path


@contextmanager
def atomic_path(path: str | PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The temporary name keeps ``path``'s suffixes (``.nii.gz``, ``.safetensors``) so that writers choosing the
    format from the extension (nibabel) write the right one. The folder is created if needed, and the file gets
    the permissions a plain ``open()`` would give it (``mkstemp`` creates it 0600).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix="".join(target.suffixes))
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.chmod(target, 0o666 & ~_umask())


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably; returns the path written."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


@contextmanager
def atomic_folder(path: str | PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces the folder ``path``, on failure it is removed.

    A reader sees the old folder or the new one, never a half-written one: ``rename(2)`` cannot replace a
    non-empty folder, so the old folder is moved aside first and restored if the final move fails. The new
    folder gets the permissions a plain ``mkdir`` would give it (``mkdtemp`` creates it 0700).
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"Cannot write the folder '{target}': a file of that name exists.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    aside: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, aside / "folder")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and (aside / "folder").exists() and not target.exists():
            os.replace(aside / "folder", target)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
