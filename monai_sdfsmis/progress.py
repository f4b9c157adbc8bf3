"""Progress output that reads well in a terminal and in a log file.

In a terminal, :func:`progress_bar` is a tqdm bar. When the stream is not a terminal (a log file, a pipe, a batch
job, CI), a redrawn bar would write carriage returns and escape codes for every update, and nested bars garble
each other; there it prints plain lines instead: one when it starts, one per ``every_percent`` of the total (or
per ``interval`` seconds when the total is unknown) and one when it ends.
"""

from __future__ import annotations

__all__ = ["PlainProgress", "progress_bar", "attach_progress"]

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """The part of tqdm's interface this package uses, writing whole lines (no ``\\r``, no escape codes).

    Parameters
    ----------
    iterable
        Items to iterate over (optional, as in tqdm).
    total
        Number of steps; taken from ``len(iterable)`` when possible.
    desc
        Prefix of every line.
    file
        Stream to write to (``sys.stderr`` by default, looked up when a line is written).
    disable
        Write nothing.
    every_percent
        With a known total: one line each time this share of the total is passed.
    interval
        With an unknown total: at most one line per this many seconds.
    unit
        Name of a step in the lines.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str | None = None,
        file: IO[str] | None = None,
        disable: bool = False,
        every_percent: float = 10.0,
        interval: float = 30.0,
        unit: str = "it",
        **_: Any,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.file = iterable, total, desc or "", file
        self.disable, self.every, self.interval, self.unit = bool(disable), float(every_percent), float(interval), unit
        self.n, self.postfix, self.closed = 0, "", False
        self._start = self._last = time.monotonic()
        self._next_percent = self.every
        self._write(f"started ({total} {unit})" if total else "started")

    def _write(self, message: str) -> None:
        if self.disable:
            return
        stream = self.file if self.file is not None else sys.stderr
        prefix = f"{self.desc}: " if self.desc else ""
        suffix = f", {self.postfix}" if self.postfix else ""
        stream.write(f"{prefix}{message}{suffix}\n")
        stream.flush()

    def _position(self) -> str:
        elapsed = time.monotonic() - self._start
        if self.total:
            return f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%), {elapsed:.1f} s"
        return f"{self.n} {self.unit}, {elapsed:.1f} s"

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps; print a line when a reporting point is passed."""
        self.n += int(n)
        now = time.monotonic()
        if self.total:
            percent = 100.0 * self.n / self.total
            if percent >= self._next_percent and self.n < self.total:
                self._write(self._position())
                while self._next_percent <= percent:
                    self._next_percent += self.every
        elif now - self._last >= self.interval:
            self._write(self._position())
            self._last = now

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values appended to the next lines, e.g. ``loss=0.12``."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Print the final line (once)."""
        if not self.closed:
            self.closed = True
            self._write(f"done, {self._position()}")

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("PlainProgress was created without an iterable.")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str | None = None,
    disable: bool = False,
    file: IO[str] | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm bar when ``file`` (default ``sys.stderr``) is a terminal, else a :class:`PlainProgress`.

    Parameters
    ----------
    iterable, total, desc, disable
        As in tqdm.
    file
        The stream written to.
    kwargs
        Further tqdm arguments (``unit``, ``leave``, ...); :class:`PlainProgress` uses ``unit`` and ignores the rest.
    """
    stream = file if file is not None else sys.stderr
    if not disable and _is_terminal(stream):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: plain lines then
            pass
        else:
            return tqdm(iterable, total=total, desc=desc, file=stream, **kwargs)
    return PlainProgress(iterable, total=total, desc=desc, file=file, disable=disable, **kwargs)


_EPOCH = object()


def attach_progress(
    engine: Any,
    desc: str,
    output_transform: Callable[[Any], dict] | None = None,
    file: IO[str] | None = None,
    total: int | None | object = _EPOCH,
) -> None:
    """Show an ignite engine's iterations with :func:`progress_bar`, one bar per epoch.

    Parameters
    ----------
    engine
        An ignite engine (e.g. MONAI's ``SupervisedTrainer``).
    desc
        Bar name.
    output_transform
        Maps ``engine.state.output`` to the values shown beside the bar (e.g. ``{"loss": ...}``).
    file
        Stream written to (default ``sys.stderr``).
    total
        Iterations the bar counts to: default the epoch length; ``None`` for a run stopped by a time budget (a
        count and a rate, and in a log one line per 30 s).
    """
    from ignite.engine import Events

    bars: dict[str, Any] = {}

    def start(e: Any) -> None:
        count = e.state.epoch_length if total is _EPOCH else total
        bars["bar"] = progress_bar(total=count, desc=f"{desc} epoch {e.state.epoch}", file=file)

    def step(e: Any) -> None:
        bar = bars.get("bar")
        if bar is None:
            return
        if output_transform is not None:
            bar.set_postfix({k: float(v) for k, v in output_transform(e.state.output).items()}, refresh=False)
        bar.update(1)

    def close(e: Any) -> None:
        bar = bars.pop("bar", None)
        if bar is not None:
            bar.close()

    engine.add_event_handler(Events.EPOCH_STARTED, start)
    engine.add_event_handler(Events.ITERATION_COMPLETED, step)
    # A budget that stops training mid-epoch ends with COMPLETED but no EPOCH_COMPLETED.
    engine.add_event_handler(Events.EPOCH_COMPLETED, close)
    engine.add_event_handler(Events.COMPLETED, close)
