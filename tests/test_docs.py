"""The user documentation: measured figures only, no citations of files that are not shipped, commands that can be
pasted one after the other."""

from __future__ import annotations

import re

import pytest

from tests.test_tutorials import parse_blocks
from tests.utils import REPO_ROOT

README = REPO_ROOT / "README.md"
MODEL_CARD = REPO_ROOT / "bundles" / "sd_fsmis" / "docs" / "README.md"
RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"
USER_DOCS = [README, MODEL_CARD, REPO_ROOT / "CONTRIBUTING.md", *sorted((REPO_ROOT / "tutorials").glob("*.md"))]
_DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` (a line ``# X`` or ``## X``) up to the next heading of the same level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    nxt = re.search(rf"^{re.escape(level)} ", text[start + len(heading):], flags=re.M)
    return text[start:start + len(heading) + (nxt.start() if nxt else len(text))]


def _prose_and_tables(text: str) -> str:
    # Figures live in the prose and tables; the commands' own numbers (--seg_lr 2e-4, --ae_iters 240) are settings.
    return re.sub(r"```.*?```", "", text, flags=re.S)


@pytest.mark.parametrize(
    "path, heading", [(MODEL_CARD, "# Performance"), (MODEL_CARD, "# System Configuration"), (README, "## Results")]
)
def test_every_figure_is_one_measured_in_results(path, heading):
    results = RESULTS.read_text()
    figures = set(_DECIMAL.findall(_prose_and_tables(_section(path.read_text(), heading))))
    assert figures, f"{path.name} {heading}: no figure found (did the heading change?)"
    unmeasured = sorted(f for f in figures if f not in results)
    assert not unmeasured, f"{path.relative_to(REPO_ROOT)} {heading}: {unmeasured} are not in benchmarks/RESULTS.md"


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_citation_of_files_that_are_not_shipped(path):
    text = path.read_text()
    for name in ("METHOD.md", "DECISIONS.md", "PERFORMANCE.md", "STYLE.md"):
        assert name not in text, f"{path.relative_to(REPO_ROOT)} cites {name}, which is not shipped"


def test_readme_commands_can_be_pasted_one_after_the_other():
    """A bare ``cd`` in one README command would break the next one, which runs from the repository root."""
    for block in parse_blocks(README.read_text(), "README.md"):
        if block.tag != "bash":
            continue
        for line in block.text.splitlines():
            assert not re.match(r"\s*cd\s", line), f"README.md:{block.line}: '{line.strip()}' leaves the terminal elsewhere"


def test_the_quick_start_time_is_stated_once():
    mentions = re.findall(r"QUICKSTART_TIME|quick start (?:takes|took|runs in) [^.]*\d", README.read_text())
    assert len(mentions) <= 1, mentions
    for path in USER_DOCS[1:]:
        assert "QUICKSTART_TIME" not in path.read_text(), f"{path.name}: the quick-start time belongs in README.md only"
