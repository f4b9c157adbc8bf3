"""Small utilities shared across the package.

Atomic file writing (a reader never sees a half-written file) and the CPU thread setting of every entry point.
"""

from __future__ import annotations

__all__ = [
    "atomic_path", "atomic_write", "atomic_folder", "remove_atomic_leftovers", "available_cpus", "configure_cpu_threads",
    "resolve_device", "training_autocast",
]

import glob
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The temporary name keeps ``path``'s suffixes (``.nii.gz``, ``.safetensors``) so that writers choosing the
    format from the extension (nibabel) write the right one; ``suffix`` replaces them (checkpoints use ``.tmp``, so
    that leftovers of a killed run can be recognised). With ``path``'s own suffixes, the temporaries a killed earlier
    write of ``path`` left are removed first (:func:`remove_atomic_leftovers`). The folder is created if needed, and
    the file gets the permissions a plain ``open()`` would give it (``mkstemp`` creates it 0600).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        remove_atomic_leftovers(target)
    suffix = "".join(target.suffixes) if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.chmod(target, 0o666 & ~_umask())


def remove_atomic_leftovers(path: str | PathLike) -> None:
    """Remove the temporaries a killed :func:`atomic_path` write of ``path`` left: ``.<name>.<random><suffixes>``.

    Only temporaries of this very file are touched, so another run writing other files into the folder is safe.
    """
    target = Path(path)
    suffixes = "".join(target.suffixes)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]+{re.escape(suffixes)}")
    folder = target.parent
    if not folder.is_dir():
        return
    for leftover in folder.iterdir():
        if pattern.fullmatch(leftover.name) and leftover.is_file():
            leftover.unlink(missing_ok=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably; returns the path written.

    The temporaries an earlier, killed write of ``path`` left are removed first (by :func:`atomic_path`).

    Raises
    ------
    OSError
        With the cause's ``errno`` and a message naming ``path`` (a full disk names the temporary file otherwise, or
        nothing); ``path`` is then left as it was.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as error:
        raise OSError(error.errno, f"could not write {os.fspath(path)}: {error.strerror or error}") from error
    return Path(path)


@contextmanager
def atomic_folder(path: str | PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces the folder ``path``, on failure it is removed.

    A reader sees the old folder or the new one, never a half-written one: ``rename(2)`` cannot replace a
    non-empty folder, so the old folder is moved aside first and restored if the final move fails. The new
    folder gets the permissions a plain ``mkdir`` would give it (``mkdtemp`` creates it 0700). The temporary
    folders (``.<name>.<random>.tmp``) a killed earlier write of ``path`` left are removed first.
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"Cannot write the folder '{target}': a file of that name exists.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # What a killed earlier write of this folder left (its ".old" copies are kept: one may be the only copy).
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
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


NUM_THREADS_ENV = "SDFSMIS_NUM_THREADS"
"""Environment variable that overrides the default thread count of :func:`configure_cpu_threads`."""

_MAX_DEFAULT_THREADS = 8
_interop_configured = False
_logger = logging.getLogger(__name__)


def available_cpus() -> int:
    """Number of CPUs this process may actually run on.

    ``os.cpu_count()`` counts the machine's cores, not the ones a container, ``taskset`` or a batch scheduler
    gives the process; more threads than usable cores make OpenMP threads spin against each other. This takes the
    smallest of the affinity mask and the cgroup v2 CPU quota (``/sys/fs/cgroup/cpu.max``) where they exist.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op (and, once per process, inter-op) CPU thread count and return the count used.

    Parameters
    ----------
    num_threads
        Threads to use. ``None`` reads the ``SDFSMIS_NUM_THREADS`` environment variable and, where it is unset,
        uses ``min(available_cpus() // LOCAL_WORLD_SIZE, 8)`` (``LOCAL_WORLD_SIZE`` is torchrun's count of
        processes on this machine, 1 outside torchrun): torch's own default follows the machine's core count, which on a
        shared or containerised machine oversubscribes the cores (a quick start measured 21 min instead of 38 s),
        and more than 8 threads rarely speeds up the small convolutions of one slice.

    Raises
    ------
    ValueError
        If ``num_threads`` or the environment variable is not a positive integer.
    """
    source = "argument"
    if num_threads is None:
        raw = os.environ.get(NUM_THREADS_ENV, "").strip()
        if raw:
            source = f"${NUM_THREADS_ENV}"
            try:
                num_threads = int(raw)
            except ValueError:
                raise ValueError(f"{NUM_THREADS_ENV}={raw!r} is not a positive integer.") from None
        else:
            source = "default"
            # torchrun starts LOCAL_WORLD_SIZE processes on one machine: they share its cores.
            local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            num_threads = max(1, min(available_cpus() // local_procs, _MAX_DEFAULT_THREADS))
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        where = f"{NUM_THREADS_ENV}" if source.startswith("$") else "num_threads"
        raise ValueError(f"{where} must be a positive integer, got {num_threads!r}.")

    import torch  # local: the atomic writers above are used by code that must not import torch

    torch.set_num_threads(num_threads)
    global _interop_configured
    if not _interop_configured:
        # torch allows this once, and only before any inter-op parallel work ran; later calls raise RuntimeError.
        try:
            torch.set_num_interop_threads(num_threads)
        except RuntimeError:
            _logger.debug("inter-op threads already fixed at %d; left unchanged", torch.get_num_interop_threads())
        _interop_configured = True
    _logger.info("torch CPU threads: %d (%s; %d CPUs available)", num_threads, source, available_cpus())
    return num_threads


def resolve_device(name: Any = None, key: str = "--device") -> Any:
    """A ``torch.device`` from a name (``None``: CUDA when available, else the CPU); a bad or unavailable device is
    one ``ValueError`` naming ``key``."""
    import torch

    if name is None or name == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{key} {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key} {name}: CUDA is not available here (torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{key} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def training_autocast(device: Any, amp: bool = True, amp_on_cpu: bool = False) -> Any:
    """The bf16 autocast context of a training forward pass, or a no-op context.

    ``amp`` enables it on CUDA; ``amp_on_cpu`` also on CPU, where AVX-512 BF16 / AMX cores run bf16 convolutions
    about 1.5x faster than fp32 (``benchmarks/RESULTS.md`` section 11); the loss itself is computed in fp32.
    """
    import contextlib

    import torch

    device_type = torch.device(device).type
    enabled = (amp and device_type == "cuda") or (amp_on_cpu and device_type == "cpu")
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
