"""Atomic file writing shared by every module that writes results: a reader never sees a half-written file."""

from __future__ import annotations

__all__ = ["atomic_path", "atomic_write"]

import os
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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(target, 0o666 & ~umask)


def atomic_write(path: str | PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably; returns the path written."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)
