"""Optional dependencies: which feature needs which ``pip install "monai-sdfsmis[EXTRA]"``.

The core (loading NIfTI, training, inference, evaluation) needs none of these. Each extra is named in one clear error
where a feature needs it:

============  ===============  ==========================================================
extra         package          needed for
============  ===============  ==========================================================
itk           ``itk``          reading DICOM series, NRRD and other non-NIfTI formats (ITK)
supervoxels   ``numba``        computing supervoxel pseudo-labels (``supervoxels`` command)
tensorboard   ``tensorboard``  TensorBoard training logs (skipped, with a warning, without)
dicom_seg     ``highdicom``    writing masks of DICOM series as DICOM-SEG (``infer --format dicom_seg``)
============  ===============  ==========================================================
"""

from __future__ import annotations

__all__ = ["EXTRAS", "MissingExtraError", "available", "require", "numba_njit", "tensorboard_available"]

import functools
import importlib
import logging
from types import ModuleType
from typing import Any, Callable

#: Import name of the package behind each extra.
EXTRAS = {"itk": "itk", "supervoxels": "numba", "tensorboard": "tensorboard", "dicom_seg": "highdicom"}

_logger = logging.getLogger(__name__)


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra to install."""

    def __init__(self, extra: str, feature: str) -> None:
        package = EXTRAS[extra]
        super().__init__(f'{feature} needs {package}, which is not installed: pip install "monai-sdfsmis[{extra}]"')
        self.extra = extra
        self.name = package


def available(extra: str) -> bool:
    """Whether the package of ``extra`` imports."""
    try:
        importlib.import_module(EXTRAS[extra])
    except ImportError:
        return False
    return True


def require(extra: str, feature: str) -> ModuleType:
    """Import and return the package of ``extra``; :class:`MissingExtraError` naming ``feature`` when it is missing."""
    try:
        return importlib.import_module(EXTRAS[extra])
    except ImportError as err:
        raise MissingExtraError(extra, feature) from err


def numba_njit(**options: Any) -> Callable[[Callable], Callable]:
    """``numba.njit(**options)`` where numba is installed; else a decorator whose functions raise
    :class:`MissingExtraError` when called, so that importing the module still works. With ``cache=True`` and no
    writable cache folder, the function is compiled without the on-disk cache (slower first call, same result)."""
    try:
        from numba import njit
    except ImportError:

        def decorate(func: Callable) -> Callable:
            @functools.wraps(func)
            def missing(*args: Any, **kwargs: Any) -> Any:
                raise MissingExtraError("supervoxels", "computing supervoxels")

            return missing

        return decorate
    if not options.get("cache"):
        return njit(**options)

    def decorate_cached(func: Callable) -> Callable:
        try:
            return njit(**options)(func)
        except RuntimeError as err:
            # No writable cache folder (read-only install and read-only HOME, NUMBA_CACHE_DIR unset): numba refuses
            # the decoration itself, which would fail every import of the module; compile on each run instead.
            if "no locator available" not in str(err):
                raise
            return njit(**{**options, "cache": False})(func)

    return decorate_cached


@functools.lru_cache(maxsize=None)
def tensorboard_available() -> bool:
    """Whether TensorBoard logs can be written; logs one warning naming the extra when they cannot."""
    from monai.utils import optional_import

    if optional_import("torch.utils.tensorboard", name="SummaryWriter")[1]:  # what MONAI's handlers import
        return True
    _logger.warning('TensorBoard logs are off: tensorboard is not installed (pip install "monai-sdfsmis[tensorboard]")')
    return False
