"""One readable line for an expected error on the command line; the full traceback only when debugging.

A bad input met inside a MONAI bundle reaches the top of ``python -m monai.bundle`` wrapped several times: MONAI's
``apply_transform`` and ``Compose`` wrap it in ``RuntimeError``, the config resolver in ``Failed to instantiate
component`` / ``Failed to evaluate ConfigExpression``, and ``StatsHandler`` logs each traceback again before
re-raising. The user needs the one clear message at the bottom of that pile.

:func:`install_excepthook`, called first in a bundle's ``initialize`` (``"$monai_sdfsmis.errors.install_excepthook(
@debug)"``), installs a ``sys.excepthook`` that prints, for an *expected* error, the single line::

    sd_fsmis error: <message naming the file or key> [config 'train::dataset'; SDFSMIS_DEBUG=1 shows the traceback]

and lets Python exit with status 1; other exceptions (bugs) keep their full traceback. It also keeps the loggers from
printing the tracebacks of expected errors (``StatsHandler`` logs every exception with its traceback): their log
records keep their one-line message and lose the traceback. With the
bundle key ``debug`` true or the environment variable ``SDFSMIS_DEBUG=1`` nothing changes: full tracebacks as usual.

An error is expected when it is one this package raises on purpose: a ``ValueError`` (bad value, bad file content),
``FileNotFoundError``/``FileExistsError``/``NotADirectoryError``/``IsADirectoryError``/``PermissionError`` raised
from code in ``monai_sdfsmis``, any ``OSError`` with an errno (disk full, read-only file system), which is the
machine's state rather than a bug, and an ``OSError`` raised from code in ``monai_sdfsmis`` (a written file that does
not read back: a full disk that a writer did not report).
"""

from __future__ import annotations

__all__ = [
    "DEBUG_ENV",
    "expected_error",
    "config_key_of",
    "format_error",
    "install_excepthook",
    "debug_enabled",
]

import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

#: Environment variable that turns the full tracebacks back on (``1``, ``true``, ``yes``).
DEBUG_ENV = "SDFSMIS_DEBUG"

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_BUNDLE_DIR = os.path.join("monai", "bundle")
_PROJECT_TYPES: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
)
_MARK = "_sdfsmis_error_filter"


def debug_enabled(debug: bool | None = None) -> bool:
    """``debug`` if given and true, else whether :data:`DEBUG_ENV` is set to a true value."""
    if debug:
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and its causes, outermost first (``__cause__``, else an unsuppressed ``__context__``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _raised_in_package(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIR)


def expected_error(error: BaseException) -> BaseException | None:
    """The first expected error in ``error``'s cause chain (outermost first), or ``None`` if there is none."""
    for item in _chain(error):
        if isinstance(item, _PROJECT_TYPES) and _raised_in_package(item):
            return item
        if isinstance(item, OSError) and (item.errno is not None or _raised_in_package(item)):
            return item  # the machine's state (disk full), or a write of ours that did not read back
    return None


def config_key_of(error: BaseException) -> str | None:
    """The bundle config item being resolved when ``error`` was raised (the deepest one), or ``None``."""
    key = None
    for item in _chain(error):
        tb: TracebackType | None = item.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "_resolve_one_item" and _BUNDLE_DIR in code.co_filename:
                value = tb.tb_frame.f_locals.get("id")
                if isinstance(value, str) and value:
                    key = value
            tb = tb.tb_next
        if key is not None:
            return key
    return key


def format_error(error: BaseException) -> str | None:
    """The one line printed for ``error``, or ``None`` when it is not an expected error."""
    cause = expected_error(error)
    if cause is None:
        return None
    message = " ".join(str(cause).split()) or type(cause).__name__
    if isinstance(cause, OSError) and not str(cause):
        message = f"{type(cause).__name__}: {cause.strerror or 'error'} {cause.filename or ''}".strip()
    if isinstance(cause, FileNotFoundError) and "does not exist" not in message and "not found" not in message:
        message = f"file not found: {message}"
    where = config_key_of(error)
    context = f"config '{where}'; " if where else ""
    return f"sd_fsmis error: {message} [{context}{DEBUG_ENV}=1 shows the traceback]"


def _record_factory_without_expected_tracebacks(factory: Any) -> Any:
    """Wrap a ``logging`` record factory so that records of expected errors carry no traceback.

    ``StatsHandler`` logs every engine exception with its traceback through loggers (and handlers) that MONAI
    creates while the engine is built, after :func:`install_excepthook` ran; the record factory is the one place
    that sees all of them.
    """

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        info = record.exc_info
        if info and info[1] is not None and not debug_enabled() and expected_error(info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return record

    setattr(make_record, _MARK, True)
    return make_record


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    line = None if debug_enabled() else format_error(exc)
    if line is None:
        sys.__excepthook__(exc_type, exc, tb)
        return
    sys.stderr.flush()
    print(line, file=sys.stderr, flush=True)


def install_excepthook(debug: bool | None = None) -> bool:
    """Report expected errors in one line from now on (see the module docstring); returns whether it did.

    Parameters
    ----------
    debug
        ``True`` leaves ``sys.excepthook`` and logging alone (full tracebacks), as does :data:`DEBUG_ENV`.
    """
    if debug_enabled(debug):
        return False
    sys.excepthook = _excepthook
    factory = logging.getLogRecordFactory()
    if not getattr(factory, _MARK, False):
        logging.setLogRecordFactory(_record_factory_without_expected_tracebacks(factory))
    return True
