"""Every ``tutorials/*.md``, and the bundle's model card, is executed, block by block, as a user would type it into
one terminal.

How a tutorial is run (:func:`run_tutorial`):

- Fenced blocks tagged ``bash`` or ``python`` run in document order, starting in one scratch working directory.
  Blocks tagged ``text``, ``console``, ``json``, ``yaml``, ``ini``, ``bash skip-test`` or ``python skip-test`` are
  shown to the reader only. Any other tag, or an untagged fence, fails the test: a block that is silently never
  run is a block nobody checks.
- As in one terminal, a ``cd`` and the shell variables of a ``bash`` block carry over to the next blocks; a
  ``python`` block runs with ``python`` in the current directory and sees the exported variables.
- Each block runs under ``bash -e -o pipefail``: the first failing command fails the tutorial.
- The environment has ``REPO`` (the repository root), ``CHAOS_DIR`` (the CHAOS T2-SPIR folder), the overrides of
  :data:`TUTORIALS` (expensive sizes written in the tutorial as ``${AE_ITERATIONS:-3000}`` or
  ``os.environ.get("AE_ITERATIONS", "3000")``), ``HF_HUB_OFFLINE=1`` and ``SDFSMIS_NUM_THREADS=1``.

The model card (``bundles/sd_fsmis/docs/README.md``, :func:`test_model_card_runs`) runs the same way, from the root
of a scratch checkout, with tiny random Stable Diffusion 1.5 and DINOv2 folders in ``SD_WEIGHTS`` and
``DINOV2_WEIGHTS`` and the toy sizes of :data:`MODEL_CARD_RUN`.

Authors of a new tutorial add it to :data:`TUTORIALS`; until then its test fails. To try a tutorial by hand::

    python -c "from tests.test_tutorials import run_tutorial; run_tutorial('tutorials/x.md', {'ITERATIONS': '3'})"
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.utils import REPO_ROOT, chaos_dir, save_tiny_pretrained_weights

TUTORIALS_DIR = REPO_ROOT / "tutorials"


@dataclass(frozen=True)
class TutorialRun:
    """How the test runs one tutorial.

    Parameters
    ----------
    env
        Environment overrides that shrink the expensive steps; each name must occur in the tutorial.
    timeout
        Seconds for the whole tutorial (all blocks together).
    needs_chaos
        Skip, with the reason, when the CHAOS T2-SPIR copy is absent.
    """

    env: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 300.0
    needs_chaos: bool = False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#: Every tutorial and how it is run; a tutorial missing here fails its test.
TUTORIALS: dict[str, TutorialRun] = {
    "quickstart.md": TutorialRun(
        env={"AE_ITERATIONS": "3", "CALIBRATION_SLICES": "8", "ITERATIONS": "3"},
        timeout=900,
    ),
    "reproduce_paper.md": TutorialRun(env={"ITERATIONS": "2"}, timeout=600, needs_chaos=True),
    "own_volume.md": TutorialRun(
        env={"SPATIAL_SIZE": "64", "AE_WIDTH": "tiny", "AE_BATCH_SIZE": "4", "AE_ITERATIONS": "3",
             "CALIBRATION_SLICES": "8", "UNET_WIDTH": "tiny", "BATCH_SIZE": "2", "ITERATIONS": "3", "MINUTES": "10"},
        timeout=900,
        needs_chaos=True,
    ),
    "supervised.md": TutorialRun(
        env={"MINUTES": "10", "SPATIAL_SIZE": "64", "AE_WIDTH": "tiny", "UNET_WIDTH": "tiny", "AE_ITERATIONS": "3",
             "BATCH_SIZE": "2", "CALIBRATION_SLICES": "8", "ITERATIONS": "3"},
        timeout=900,
        needs_chaos=True,
    ),
    # Reuses the MONAI Label environment that tests/test_monailabel_server.py builds and caches (first build: minutes).
    "monailabel.md": TutorialRun(
        env={"SPATIAL_SIZE": "64", "AE_WIDTH": "tiny", "AE_ITERATIONS": "3", "CALIBRATION_SLICES": "8",
             "UNET_WIDTH": "tiny", "ITERATIONS": "3", "BATCH_SIZE": "2", "TRAIN_ITERATIONS": "2",
             "TRAIN_BATCH_SIZE": "2", "SERVER_SECONDS": "900", "PORT": str(_free_port())},
        timeout=1200,
        needs_chaos=True,
    ),
}

MODEL_CARD = REPO_ROOT / "bundles" / "sd_fsmis" / "docs" / "README.md"

#: How the model card is run: every block, the weights in SD_WEIGHTS and DINOV2_WEIGHTS (set by the test), one fold
#: (FOLDS), two DDP processes on the CPU (NPROC_PER_NODE), 64 px and tiny widths, 2-3 iterations per stage.
MODEL_CARD_RUN = TutorialRun(
    env={"SPATIAL_SIZE": "64", "AE_WIDTH": "tiny", "UNET_WIDTH": "tiny", "AE_ITERATIONS": "3", "ITERATIONS": "2",
         "FOLDS": "0", "SLICES": "3", "NPROC_PER_NODE": "2"},
    timeout=900,
    needs_chaos=True,
)

RUN_TAGS = ("bash", "python")
SHOW_TAGS = ("text", "console", "json", "yaml", "ini", "bash skip-test", "python skip-test")
_FENCE = re.compile(r"^(?P<indent> {0,3})```(?P<tag>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its tag (``"bash"``, ``"python"``, ...), its text and the line where it starts."""

    tag: str
    text: str
    line: int


def parse_blocks(markdown: str, source: str = "<tutorial>") -> list[Block]:
    """The fenced blocks of a Markdown text, in order.

    Raises
    ------
    ValueError
        An unclosed fence, or a block tag that is neither run nor shown (names ``source`` and the line).
    """
    blocks: list[Block] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        tag, start, indent = " ".join(match["tag"].split()), i + 1, len(match["indent"])
        if tag not in RUN_TAGS + SHOW_TAGS:
            raise ValueError(
                f"{source}:{start}: code block tag {tag or '(none)'!r} is neither run ({', '.join(RUN_TAGS)}) "
                f"nor shown ({', '.join(SHOW_TAGS)})."
            )
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{source}:{start}: the code block opened here is never closed.")
        blocks.append(Block(tag, "\n".join(body) + "\n", start))
        i += 1
    return blocks


# Wraps each block: restore the previous block's directory and variables, run the block under -e, save them.
_PRELUDE = r"""
set -e -o pipefail
cd "$(cat "$__TUTORIAL_STATE/cwd")"
# Taken before the previous block's variables are restored, so that they are saved again after this block.
__tutorial_before=" $(compgen -v | tr '\n' ' ') "
if [ -f "$__TUTORIAL_STATE/vars.sh" ]; then source "$__TUTORIAL_STATE/vars.sh"; fi
__tutorial_save() {
    local rc=$? name
    pwd > "$__TUTORIAL_STATE/cwd"
    {
        export -p | grep -v -E '^declare -[a-zA-Z]*r|^declare -x (PWD|OLDPWD|SHLVL|_)='
        for name in $(compgen -v); do
            case "$__tutorial_before" in *" $name "*) ;; *) [[ $name == __tutorial_* ]] || declare -p "$name";; esac
        done
    } > "$__TUTORIAL_STATE/vars.sh.new" 2>/dev/null || true
    mv "$__TUTORIAL_STATE/vars.sh.new" "$__TUTORIAL_STATE/vars.sh"
    exit $rc
}
trap __tutorial_save EXIT
"""


def _tail(path: Path, n_lines: int = 60) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join(text.splitlines()[-n_lines:])


def run_tutorial(
    path: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    workdir: str | os.PathLike | None = None,
) -> list[Block]:
    """Run the ``bash``/``python`` blocks of a tutorial in order; fail with the block and its output on an error.

    Parameters
    ----------
    path
        The Markdown file.
    env
        Environment overrides (each name must occur in the tutorial's text, so that a renamed variable does not
        silently run the full-size default).
    timeout
        Seconds for all blocks together.
    workdir
        The scratch working directory (a new temporary folder if ``None``); block state is kept beside it.

    Returns
    -------
    list of Block
        The blocks that ran.
    """
    path = Path(path)
    text = path.read_text()
    env = dict(env or {})
    for name in env:
        if not re.search(rf"\${{{name}:-|\${name}\b|\${{{name}}}|environ\.get\(\s*[\"']{name}[\"']", text):
            raise AssertionError(f"{path.name}: the test sets {name}, but the tutorial never reads it.")
    blocks = [b for b in parse_blocks(text, str(path)) if b.tag in RUN_TAGS]
    if not blocks:
        raise AssertionError(f"{path.name}: no bash or python block to run.")

    if workdir is None:
        import tempfile

        workdir = tempfile.mkdtemp(prefix=f"tutorial_{path.stem}_")
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state = work.parent / f".{work.name}_state"
    state.mkdir(exist_ok=True)
    (state / "cwd").write_text(str(work))

    run_env = dict(os.environ)
    run_env.update(
        {
            "REPO": str(REPO_ROOT),
            "CHAOS_DIR": str(chaos_dir()),
            "HF_HUB_OFFLINE": "1",
            "MPLBACKEND": "Agg",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
            # `python` and `pip` in a tutorial are the test's interpreter.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "__TUTORIAL_STATE": str(state),
        }
    )
    run_env.setdefault("SDFSMIS_NUM_THREADS", "1")
    run_env.setdefault("OMP_NUM_THREADS", "1")
    run_env.update(env)

    deadline = time.monotonic() + timeout
    for number, block in enumerate(blocks, 1):
        script = state / f"block_{number:02d}.sh"
        if block.tag == "python":
            code = state / f"block_{number:02d}.py"
            code.write_text(block.text)
            body = f"python {shlex.quote(str(code))}\n"
        else:
            body = block.text
        script.write_text(_PRELUDE + body)
        log = state / f"block_{number:02d}.log"
        where = f"{path.name}:{block.line} (block {number} of {len(blocks)}, {block.tag})"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{where}: not started, the tutorial's {timeout:.0f} s are used up.")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["bash", str(script)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=run_env, start_new_session=True,  # its own process group, so a timeout stops its children too
            )
            try:
                rc = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(
                    f"{where}: still running when the tutorial's {timeout:.0f} s ran out.\n"
                    f"--- block ---\n{block.text}--- last output ---\n{_tail(log)}"
                ) from None
        if rc != 0:
            raise AssertionError(
                f"{where}: exited with status {rc}.\n--- block ---\n{block.text}--- last output ---\n{_tail(log)}"
            )
    return blocks


def _tutorial_names() -> list[str]:
    return sorted({p.name for p in TUTORIALS_DIR.glob("*.md")} | set(TUTORIALS))


@pytest.mark.parametrize("name", _tutorial_names())
def test_tutorial_runs(name, tmp_path):
    """The tutorial's runnable blocks all succeed, in order, at the sizes of :data:`TUTORIALS`."""
    path = TUTORIALS_DIR / name
    assert path.exists(), f"tutorials/{name} is listed in TUTORIALS but does not exist"
    assert name in TUTORIALS, (
        f"tutorials/{name} is not in TUTORIALS of tests/test_tutorials.py: add how it is run (env overrides, timeout)"
    )
    settings = TUTORIALS[name]
    if settings.needs_chaos and not (chaos_dir() / "image_1.nii.gz").exists():
        pytest.skip("CHAOS T2-SPIR copy not found (set SDFSMIS_DATA_DIR)")
    run_tutorial(path, settings.env, settings.timeout, workdir=tmp_path / "work")


def _scratch_checkout(root: Path) -> Path:
    """What the model card's commands need of a checkout, at ``root``, with the data beside it as on this project's
    machines (``../shared/data/chaos_t2spir``): the bundle, copied since its commands write into it (``models/``,
    ``eval/``, ``runs/``), and the benchmark scripts, linked."""
    bundle = root / "bundles" / "sd_fsmis"
    for name in ("configs", "docs"):
        shutil.copytree(REPO_ROOT / "bundles" / "sd_fsmis" / name, bundle / name)
    for name in ("LICENSE", "large_files.yml"):
        shutil.copy2(REPO_ROOT / "bundles" / "sd_fsmis" / name, bundle / name)
    (bundle / "models").mkdir()
    (root / "benchmarks").symlink_to(REPO_ROOT / "benchmarks", target_is_directory=True)
    data = root.parent / "shared" / "data"
    data.mkdir(parents=True)
    (data / "chaos_t2spir").symlink_to(chaos_dir(), target_is_directory=True)
    return bundle


def test_model_card_runs(tmp_path):
    """Every ``bash`` block of the model card succeeds, in order, in one terminal: the Performance commands from
    the repository root, the usage commands from the bundle's folder (the card's own ``cd``), on the real CHAOS
    volumes with tiny random SD-1.5 and DINOv2 folders; the files the card says they write are there."""
    if MODEL_CARD_RUN.needs_chaos and not (chaos_dir() / "image_1.nii.gz").exists():
        pytest.skip("CHAOS T2-SPIR copy not found (set SDFSMIS_DATA_DIR)")
    root = tmp_path / "monai-sdfsmis"
    bundle = _scratch_checkout(root)
    sd, dino = save_tiny_pretrained_weights(tmp_path / "weights")
    env = {**MODEL_CARD_RUN.env, "SD_WEIGHTS": str(sd), "DINOV2_WEIGHTS": str(dino)}
    ran = run_tutorial(MODEL_CARD, env, MODEL_CARD_RUN.timeout, workdir=root)
    assert len(ran) >= 12 and all(block.tag == "bash" for block in ran)

    import nibabel as nib
    import numpy as np

    # The paths the card names, under Performance (from the root) and Additional Usage Steps (from the bundle).
    written = [
        root / "runs/chaos_fold0/model/model.pt",
        root / "runs/chaos_fold0/results.json",
        root / "outputs/no_prior_30min/results.md",
        root / "outputs/copy_baseline/protocol_results.json",
        bundle / "eval/quickstart_no_prior/models/model.pt",
        bundle / "eval/quickstart_no_prior/evaluation/final/protocol_table.md",
        bundle / "eval/quickstart_no_prior/results.json",
        bundle / "models/fold0/model.pt",
        bundle / "models/fold0_ddp/model.pt",
        bundle / "eval/evaluation/fold_0/protocol_table.md",
        bundle / "runs/noprior_fold0/model/model_config.json",
        bundle / "runs/noprior_fold0/evaluation/final/protocol_table.md",
        bundle / "runs/noprior_fold0/evaluation/fold_0/protocol_table.md",
    ]
    missing = [str(p.relative_to(tmp_path)) for p in written if not p.is_file()]
    assert not missing, f"the model card says these are written, but they are not: {missing}"
    query = nib.load(chaos_dir() / "image_1.nii.gz")
    for folder in ("eval/inference", "eval/inference_no_prior"):
        mask = nib.load(bundle / folder / "q_seg.nii.gz")
        assert mask.shape == query.shape and np.allclose(mask.affine, query.affine, atol=1e-4), folder


# The harness itself: a harness that passes a broken tutorial would make every tutorial test worthless.


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.md"
    path.write_text(text)
    return path


def test_harness_carries_directory_and_variables_like_one_terminal(tmp_path):
    md = _write(
        tmp_path,
        "# T\n\n```bash\nmkdir sub && cd sub\nPLAIN=plain\nexport EXPORTED=${SIZE:-1000}\n```\n\n"
        "```text\nnot run: false\n```\n\n```bash skip-test\nexit 3\n```\n\n"
        "```bash\ntest \"$(basename \"$PWD\")\" = sub\necho \"$PLAIN $EXPORTED\" > seen.txt\n```\n\n"
        "```bash\ntest \"$PLAIN\" = plain  # still set two blocks later\n```\n\n"
        "```python\nimport os, pathlib\npathlib.Path('py.txt').write_text(os.environ['EXPORTED'] + os.environ['REPO'])\n```\n",
    )
    ran = run_tutorial(md, {"SIZE": "7"}, timeout=60, workdir=tmp_path / "work")
    assert [b.tag for b in ran] == ["bash", "bash", "bash", "python"]
    assert (tmp_path / "work" / "sub" / "seen.txt").read_text() == "plain 7\n"
    assert (tmp_path / "work" / "sub" / "py.txt").read_text() == "7" + str(REPO_ROOT)


@pytest.mark.parametrize(
    "text, message",
    [
        ("```bash\ntrue\nfalse\necho never\n```\n", "exited with status 1"),
        ("```bash\ntrue\n```\n```bash\nfalse | cat\n```\n", "block 2 of 2"),
        ("```python\nraise SystemExit('boom')\n```\n", "boom"),
        ("```sh\necho hidden\n```\n", "neither run"),
        ("```\necho hidden\n```\n", "(none)"),
        ("```bash\necho open\n", "never closed"),
        ("```bash\nsleep 30\n```\n", "ran out"),
        ("```bash\necho ${OTHER:-1}\n```\n", "never reads it"),
    ],
)
def test_harness_fails_a_broken_tutorial(tmp_path, text, message):
    env = {"SIZE": "1"} if "OTHER" in text else {}
    with pytest.raises((AssertionError, ValueError), match=re.escape(message)):
        run_tutorial(_write(tmp_path, text), env, timeout=3 if "sleep" in text else 60, workdir=tmp_path / "work")
