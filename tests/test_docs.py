"""The user documentation: measured figures only, no citations of files that are not shipped, commands that can be
pasted one after the other."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from tests.test_tutorials import parse_blocks
from tests.utils import REPO_ROOT

README = REPO_ROOT / "README.md"
BUNDLE = REPO_ROOT / "bundles" / "sd_fsmis"
MODEL_CARD = BUNDLE / "docs" / "README.md"
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


def _shell_commands(path) -> list[tuple[int, list[str]]]:
    """The commands of a document's ``bash`` blocks as argument lists (continuations joined), with their lines."""
    text = path.read_text()
    commands = []
    for block in re.finditer(r"^```bash[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        first = text[: block.start()].count("\n") + 2
        pending, variables = "", {}
        for offset, line in enumerate(block.group(1).replace("\\\n", " ").splitlines()):
            pending += line + "\n"
            try:  # a quoted string may span lines (python -c "...")
                tokens = shlex.split(pending, comments=True)
            except ValueError:
                continue
            if tokens and tokens[0].startswith("("):  # a subshell: (cd X && command)
                tokens[0] = tokens[0][1:]
            if tokens and tokens[-1].endswith(")"):
                tokens[-1] = tokens[-1][:-1]
            pending, command = "", []
            for token in [*tokens, "&&"]:
                if token in ("&&", "||", ";", "|"):
                    if command and command[0] in ("do", "then", "else"):
                        command = command[1:]
                    if len(command) == 1 and re.fullmatch(r"\w+=.*", command[0]):  # W="--a 1 --b 2"
                        name, _, value = command[0].partition("=")
                        variables[name] = shlex.split(value)
                    elif len(command) > 3 and command[0] == "for" and command[2] == "in":  # for k in 0 1 ...
                        variables[command[1]] = command[3:4]
                    elif command:
                        commands.append((first + offset, command))
                    command = []
                elif token.startswith("$") and token[1:] in variables:  # an unquoted $W splits into words
                    command.extend(variables[token[1:]])
                else:
                    command.append(re.sub(r"\$\{?(\w+)\}?", lambda m: " ".join(variables.get(m[1], [m[0]])), token))
    return commands


def _check_monai_bundle_run(argv: list[str], where: str) -> None:
    """``python -m monai.bundle run [ID] --config_file F --key value ...``: the configs exist, and the run id and
    every ``--key`` are keys of the merged config (the values may be placeholders such as ``...``)."""
    from monai.bundle import ConfigParser

    args = argv[argv.index("run") + 1:]
    run_id = args.pop(0) if args and not args[0].startswith("--") else "run"
    options = dict(zip(args[::2], args[1::2]))
    assert "--config_file" in options, f"{where}: no --config_file"
    files = options.pop("--config_file")
    names = ast.literal_eval(files) if files.startswith("[") else [files]
    paths = [BUNDLE / name if (BUNDLE / name).exists() else REPO_ROOT / name for name in names]
    for config in paths:
        assert config.is_file(), f"{where}: {config} does not exist"
    parser = ConfigParser()
    parser.read_config([str(p) for p in paths])
    for key in [run_id, *(option[2:] for option in options)]:
        assert key in parser, f"{where}: '{key}' is not a key of {', '.join(names)}"


def _check_command(argv: list[str], where: str) -> bool:
    """Parse ``argv`` with the parser of the program it calls; ``False`` for commands this test does not know."""
    if argv[:3] == ["python", "-m", "monai_sdfsmis"]:
        from monai_sdfsmis.__main__ import _build_parser

        parse = _build_parser().parse_args
        arguments = argv[3:]
    elif len(argv) > 1 and argv[0] == "python" and argv[1].startswith("benchmarks/"):
        name = Path(argv[1]).stem
        spec = importlib.util.spec_from_file_location(f"doc_{name}", REPO_ROOT / argv[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parse = getattr(module, "parse_args", None) or module.parse
        arguments = argv[2:]
    elif "monai.bundle" in argv and argv[argv.index("monai.bundle") + 1:][:1] == ["run"]:
        _check_monai_bundle_run(argv, where)
        return True
    else:
        return False
    try:
        parse(arguments)
    except SystemExit as error:
        pytest.fail(f"{where}: {' '.join(argv)} is refused by its own parser (exit {error.code})")
    return True


@pytest.mark.parametrize("path", [README], ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_documented_command_is_accepted_by_the_program_it_calls(path, capsys):
    """The README's commands train for an hour or need SD-1.5 weights, so they are checked, not run: every
    ``python -m monai_sdfsmis``, ``python benchmarks/*.py`` and ``monai.bundle run`` line parses with today's
    options and config keys (a command kept from an older script fails here). The model card's commands are run
    (``tests/test_tutorials.py::test_model_card_runs``)."""
    name = path.relative_to(REPO_ROOT).as_posix()
    checked = [line for line, argv in _shell_commands(path) if _check_command(argv, f"{name}:{line}")]
    assert len(checked) >= 5, f"{name}: only {len(checked)} commands found"
