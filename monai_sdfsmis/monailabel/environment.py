"""A separate, cached Python environment that runs a MONAI Label 0.8.5 server on this project.

``pip install monailabel==0.8.5`` cannot resolve next to this project: its ``pydicom-seg`` pins
``jsonschema<4`` (the project and MONAI's bundle tools need ``>=4``), and it pulls ``sam2`` with a
CUDA build of torch of several GB. The server itself needs neither: ``pydicom-seg`` works with
jsonschema 4 and ``sam2`` is only imported by the SAM2 sample app. So the environment is a venv that
sees this interpreter's packages (torch, MONAI, this project; from a venv, a conda env or the system Python) and adds
``monailabel`` without its declared dependencies plus exactly the packages its server imports.
``pydicom`` is pinned below 3 inside the venv only: MONAI Label 0.8.5 imports
``pydicom._storage_sopclass_uids``, which pydicom 3 removed; the project works with either.

Command line (builds it once, then prints the environment's folder; ``<folder>/bin/python -m
monailabel.main start_server ...`` starts a server)::

    python -m monai_sdfsmis.monailabel.environment [--path DIR]
"""

from __future__ import annotations

__all__ = ["MONAILABEL_VERSION", "SERVER_REQUIREMENTS", "default_env_dir", "ensure_monailabel_env", "env_executable"]

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

MONAILABEL_VERSION = "0.8.5"

#: What the MONAI Label 0.8.5 server imports beyond this project's own dependencies, in versions tested here.
SERVER_REQUIREMENTS: tuple[str, ...] = (
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "python-multipart==0.0.34",
    "dicomweb-client[gcp]==0.60.1",
    "pydicom>=2.4.4,<3",
    "SimpleITK==2.5.7",
    "watchdog==7.1.0",
    "timeloop==1.0.2",
    "schedule==1.2.2",
    "PyJWT==2.15.1",
    "cachetools==8.0.2",
    "shapely==2.2.0",
    "requests-toolbelt==1.0.0",
    "passlib==1.7.4",
    "bcrypt==5.0.0",
    "expiring-dict==1.1.2",
    "expiringdict==1.2.2",
    "psutil==7.2.2",
    "girder-client==5.0.21",
    "pydantic-settings==2.14.1",
    # dcmqi's itkimage2segimage: how MONAI Label writes the DICOM-SEG of output=dicom_seg (a DICOMweb datastore)
    "dcmqi==1.5.7",
)
#: Installed with ``--no-deps``: their declared pins are the conflict (``jsonschema<4``, ``sam2`` + CUDA torch).
NO_DEPS_REQUIREMENTS: tuple[str, ...] = (f"monailabel=={MONAILABEL_VERSION}", "pydicom-seg==0.4.1")

_MARKER = "sdfsmis-env.json"
_IMPORT_CHECK = (
    "import monailabel.interfaces.app, monailabel.tasks.infer.basic_infer, monailabel.interfaces.tasks.train, "
    "monailabel.datastore.local, pydicom_seg, monai_sdfsmis; print(monailabel.__version__)"
)


def default_env_dir() -> Path:
    """``$SDFSMIS_MONAILABEL_ENV``, else ``~/.cache/monai-sdfsmis/monailabel-<version>-py<XY>-<interpreter hash>``.

    Keyed by the interpreter's environment (``sys.prefix``): two venvs, or a venv and the system Python, each get
    their own, so that they do not evict each other.
    """
    env = os.environ.get("SDFSMIS_MONAILABEL_ENV")
    if env:
        return Path(env).expanduser()
    prefix = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:8]
    tag = f"monailabel-{MONAILABEL_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-{prefix}"
    return Path.home() / ".cache" / "monai-sdfsmis" / tag


def _parent_site_dirs() -> list[str]:
    """This interpreter's own site-packages folders (a venv's, a conda env's or the system's)."""
    import site

    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user and Path(user).is_dir():
        dirs.append(user)
    return [os.path.realpath(d) for d in dirs]


def _link_parent_packages(python: Path) -> None:
    """Let the new venv see this interpreter's packages (torch, MONAI, this project), after its own.

    ``venv --system-site-packages`` links to the *base* interpreter, which for a venv or a conda env is not where
    the packages are. A ``.pth`` file in the new venv adds this interpreter's site folders with ``site.addsitedir``,
    so that their own ``.pth`` files (an editable install of this project among them) are processed too.
    """
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True, timeout=120)
    lines = [f"import site; site.addsitedir({d!r})" for d in _parent_site_dirs()]
    (Path(out.stdout.strip()) / "sdfsmis_parent_env.pth").write_text("\n".join(lines) + "\n")


def _fingerprint() -> str:
    text = json.dumps([sys.executable, list(SERVER_REQUIREMENTS), list(NO_DEPS_REQUIREMENTS)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def env_executable(env_dir: str | os.PathLike, name: str = "python") -> Path:
    """Path of an executable (``python``, ``monailabel``, ``pip``) inside the environment."""
    return Path(env_dir) / ("Scripts" if os.name == "nt" else "bin") / name


def _is_ready(env_dir: Path) -> bool:
    marker = env_dir / _MARKER
    try:
        return json.loads(marker.read_text()).get("fingerprint") == _fingerprint()
    except (OSError, ValueError):
        return False


def _run(cmd: Sequence[str], what: str, timeout: float) -> None:
    # Progress goes to stderr, so that stdout carries only the folder that main() prints.
    print(f"[monailabel env] {what}", file=sys.stderr, flush=True)
    try:
        err_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr (e.g. captured by pytest)
        err_fd = None
    try:
        subprocess.run(list(cmd), check=True, timeout=timeout, stdout=err_fd)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"building the MONAI Label environment failed at: {what} (exit {err.returncode})") from err
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"building the MONAI Label environment timed out at: {what} ({timeout:.0f} s)") from err


def ensure_monailabel_env(env_dir: str | os.PathLike | None = None, timeout: float = 1200.0) -> Path:
    """Build (once) and return the MONAI Label environment folder.

    The environment is rebuilt from scratch when its marker is missing or was written for another
    interpreter or requirement list, so a build interrupted half-way is never taken as complete.
    Concurrent callers wait on a file lock instead of building twice.

    Parameters
    ----------
    env_dir
        Where the venv lives (default :func:`default_env_dir`).
    timeout
        Seconds allowed for each ``pip`` step.

    Returns
    -------
    Path
        The venv folder; its ``bin/monailabel`` starts a server.
    """
    from filelock import FileLock

    env = Path(env_dir) if env_dir is not None else default_env_dir()
    env.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(env) + ".lock"):
        if _is_ready(env):
            return env
        if env.exists():
            shutil.rmtree(env)
        python = env_executable(env)
        _run([sys.executable, "-m", "venv", "--system-site-packages", str(env)], f"create venv {env}", timeout)
        _link_parent_packages(python)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
        _run([*pip, "--no-deps", *NO_DEPS_REQUIREMENTS], "install " + " ".join(NO_DEPS_REQUIREMENTS), timeout)
        _run([*pip, *SERVER_REQUIREMENTS], "install the packages the server imports", timeout)
        _run([str(python), "-c", _IMPORT_CHECK], "check that the server's modules import", timeout)
        (env / _MARKER).write_text(json.dumps({"fingerprint": _fingerprint(), "python": sys.executable}))
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the cached MONAI Label environment (once); print its folder.")
    parser.add_argument("--path", default=None, help=f"venv folder (default: {default_env_dir()})")
    args = parser.parse_args(argv)
    try:
        env = ensure_monailabel_env(args.path)
    except RuntimeError as err:
        print(f"error: {err}; the output above says why. Check the network access to PyPI and run "
              f"'{sys.executable} -m monai_sdfsmis.monailabel.environment' again (it starts over).", file=sys.stderr)
        return 1
    print(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
