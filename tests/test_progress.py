"""Progress output: plain lines, no carriage returns or escape codes, when the stream is not a terminal."""

from __future__ import annotations

import io
import re

from ignite.engine import Engine

from monai_sdfsmis.data import make_phantom_dataset
from monai_sdfsmis.progress import PlainProgress, attach_progress, progress_bar

_CONTROL = re.compile(r"\r|\x1b\[")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_nested_bars_in_a_log_are_plain_lines():
    log = io.StringIO()  # isatty() is False, like a file or a pipe
    for _ in progress_bar(range(3), desc="outer", file=log):
        with progress_bar(total=20, desc="inner", file=log) as inner:
            for _ in range(20):
                inner.update(1)
                inner.set_postfix(loss=0.25)
    text = log.getvalue()
    assert not _CONTROL.search(text), repr(text[:200])
    lines = text.splitlines()
    # inner, per run: a start line, one per 10% before the end (2/20 ... 18/20), the final line.
    assert sum(line.startswith("inner: ") for line in lines) == 3 * (1 + 9 + 1)
    assert sum(line.startswith("inner: done, 20/20 it (100%)") for line in lines) == 3
    assert [line.split(",")[0] for line in lines if line.startswith("outer: ")] == [
        "outer: started (3 it)", "outer: 1/3 it (33%)", "outer: 2/3 it (67%)", "outer: done"
    ]
    assert "loss=0.25" in lines[-2]  # the inner bar's last line carries its postfix


def test_a_terminal_gets_a_tqdm_bar_and_disable_prints_nothing():
    from tqdm import tqdm

    bar = progress_bar(total=5, desc="x", file=_Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = io.StringIO()
    for _ in progress_bar(range(5), desc="x", file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""


def test_unknown_total_prints_by_time():
    log = io.StringIO()
    bar = PlainProgress(desc="stream", file=log, interval=0.0)
    bar.update(2)
    bar.close()
    assert log.getvalue().splitlines()[1].startswith("stream: 2 it, ")


def test_an_ignite_trainer_reports_plain_lines(tmp_path):
    log = io.StringIO()
    engine = Engine(lambda e, batch: {"loss": float(batch)})
    attach_progress(engine, "train", output_transform=lambda out: {"loss": out["loss"]}, file=log)
    engine.run(list(range(10)), max_epochs=2)
    text = log.getvalue()
    assert not _CONTROL.search(text)
    assert "train epoch 1: done, 10/10 it (100%)" in text and "train epoch 2: done, 10/10 it (100%)" in text
    assert "loss=9" in text


def test_package_progress_writes_no_control_codes_to_a_redirected_stderr(tmp_path, capfd):
    """A real call site (phantom generation) with stderr captured as a file, as in a batch job's log."""
    make_phantom_dataset(tmp_path / "ph", n_volumes=2, seed=0, progress=True)
    err = capfd.readouterr().err
    assert "phantoms: done, 2/2 vol (100%)" in err
    assert not _CONTROL.search(err), repr(err[:200])
