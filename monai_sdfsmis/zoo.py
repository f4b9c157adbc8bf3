"""The model-zoo door: package the bundle as the MONAI model zoo ships one, and fetch its large files with clear errors.

A zoo bundle is ``{name}_v{version}.zip`` holding one top-level ``{name}/`` folder (``configs/``, ``docs/``,
``LICENSE``, ``large_files.yml``, optional ``scripts/``), which ``python -m monai.bundle download --name {name} --url
...`` extracts. Weights are not inside it: ``large_files.yml`` lists each one with its ``path`` in the bundle, ``url``,
``hash_val`` and ``hash_type``, and ``python -m monai.bundle download_large_files --bundle_path {name}`` fetches them
(MONAI's ``monai/bundle/scripts.py``). :func:`download_large_files` here does the same through MONAI's
``download_url`` but names the file, the URL and the problem in one line where MONAI's message does not (a truncated
transfer is reported as ``retrieval incomplete`` without either).

This module imports neither torch nor MONAI at import time, so that ``python -m monai_sdfsmis package`` starts fast.
"""

from __future__ import annotations

__all__ = [
    "BUNDLE_CONTENTS",
    "HASH_TYPES",
    "MAX_FILE_BYTES",
    "bundle_version",
    "hash_file",
    "large_file_entries",
    "read_large_files",
    "package_bundle",
    "download_large_files",
]

import hashlib
import json
import re
import urllib.parse
import warnings
import zipfile
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

from monai_sdfsmis.utils import atomic_path

#: Top-level entries of the bundle folder that go into the zip; everything else (``models/``, ``eval/``, a user's
#: ``data/``) stays out. ``models/`` is what ``large_files.yml`` fetches.
BUNDLE_CONTENTS: tuple[str, ...] = ("configs", "docs", "scripts", "LICENSE", "large_files.yml")
#: The hash types MONAI's ``check_hash`` accepts.
HASH_TYPES: tuple[str, ...] = ("md5", "sha1", "sha256", "sha512")
#: The model zoo refuses files over 25 MB in a bundle: such files belong in ``large_files.yml``.
MAX_FILE_BYTES = 25 * 1024 * 1024

_LARGE_FILES = "large_files.yml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
# A zip entry's time: fixed, so that the same bundle always gives the same bytes (and the same published hash).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# Training folders also hold resumable states (model + optimizer + trainer); a release ships the weights only.
_NOT_WEIGHTS = re.compile(r"^(checkpoint_.*|.*\.tmp|\..*)$")


def bundle_version(bundle_dir: str | PathLike) -> str:
    """The ``version`` of ``{bundle_dir}/configs/metadata.json``, checked as the model zoo's CI checks it.

    Raises
    ------
    FileNotFoundError
        If the metadata file is missing.
    ValueError
        If it is not JSON, has no ``X.Y.Z`` version, or the version has no ``changelog`` entry.
    """
    meta_file = Path(bundle_dir) / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"bundle metadata not found: {meta_file}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file}: not valid JSON (line {err.lineno}: {err.msg}).") from None
    version = meta.get("version") if isinstance(meta, dict) else None
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ValueError(f"{meta_file}: 'version' must be a string 'X.Y.Z', got {version!r}.")
    changelog = meta.get("changelog")
    if not isinstance(changelog, dict) or version not in changelog:
        raise ValueError(f"{meta_file}: version {version} has no entry in 'changelog' (the model zoo requires one).")
    return version


def hash_file(path: str | PathLike, hash_type: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks, with one of :data:`HASH_TYPES` (MONAI's ``check_hash``)."""
    if hash_type not in HASH_TYPES:
        raise ValueError(f"hash_type must be one of {', '.join(HASH_TYPES)}, got {hash_type!r}.")
    digest = hashlib.new(hash_type, usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def large_file_entries(
    weights_dir: str | PathLike, base_url: str, prefix: str = "models", hash_type: str = "sha256"
) -> list[dict[str, str]]:
    """``large_files.yml`` entries for every weight file of a trained model folder.

    Parameters
    ----------
    weights_dir
        The folder training wrote (``models/``: ``model.pt``, and for the no-prior model ``autoencoder/``).
        Resumable states (``checkpoint_*``), temporary and hidden files are left out.
    base_url
        Where the folder's files will be hosted: ``{base_url}/{path in weights_dir}`` is each file's URL.
    prefix
        The folder inside the bundle that the files are fetched into.
    hash_type
        One of :data:`HASH_TYPES`.

    Returns
    -------
    list of dict
        ``{"path", "url", "hash_val", "hash_type"}`` per file, sorted by path.
    """
    root = Path(weights_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"weights folder not found: {root}")
    if not (root / "model.pt").is_file():
        raise FileNotFoundError(f"weights folder {root} has no model.pt (the bundle loads models/model.pt)")
    scheme = urllib.parse.urlparse(base_url).scheme
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"base_url must start with http://, https:// or file://, got {base_url!r}.")
    hash_file(root / "model.pt", hash_type)  # rejects an unknown hash type before any work
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(_NOT_WEIGHTS.match(part) for part in rel.parts):
            continue
        entries.append({
            "path": f"{prefix}/{rel.as_posix()}",
            "url": f"{base_url.rstrip('/')}/{urllib.parse.quote(rel.as_posix())}",
            "hash_val": hash_file(path, hash_type),
            "hash_type": hash_type,
        })
    return entries


def read_large_files(path: str | PathLike) -> list[dict[str, Any]]:
    """The ``large_files`` list of a ``large_files.yml``, each item checked for ``path`` and ``url``.

    Raises
    ------
    ValueError
        On unreadable YAML, a missing ``large_files`` list, an item without ``path``/``url``, an absolute path or
        ``..`` in a path, or an unknown ``hash_type``.
    """
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]}).") from None
    items = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a 'large_files' list of {{path, url, hash_val, hash_type}} items.")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("path") or not item.get("url"):
            raise ValueError(f"{path}: large_files item {i} needs a 'path' and a 'url', got {item!r}.")
        parts = Path(str(item["path"])).parts
        if Path(str(item["path"])).is_absolute() or ".." in parts:
            raise ValueError(f"{path}: large_files item {i} path {item['path']!r} must stay inside the bundle.")
        if item.get("hash_type") and str(item["hash_type"]).lower() not in HASH_TYPES:
            raise ValueError(f"{path}: large_files item {i} hash_type {item['hash_type']!r} is not one of {HASH_TYPES}.")
    return items


def _large_files_yaml(entries: Sequence[dict[str, str]], name: str, version: str) -> str:
    header = (
        f"# Large files of the {name} bundle, version {version}: fetch them into the bundle with\n"
        "#   python -m monai.bundle download_large_files --bundle_path .\n"
        "# Written by python -m monai_sdfsmis package from the trained model folder.\n"
    )
    return header + yaml.safe_dump({"large_files": list(entries)}, sort_keys=False, default_flow_style=False)


def _bundle_files(bundle_dir: Path) -> tuple[list[Path], list[str]]:
    """Files to package (relative to ``bundle_dir``) and the top-level entries left out."""
    files, left_out = [], []
    for entry in sorted(bundle_dir.iterdir()):
        if entry.name not in BUNDLE_CONTENTS:
            left_out.append(entry.name + ("/" if entry.is_dir() else ""))
            continue
        candidates = sorted(entry.rglob("*")) if entry.is_dir() else [entry]
        for path in candidates:
            rel = path.relative_to(bundle_dir)
            if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                if path.suffix != ".pyc":
                    files.append(rel)
    return files, left_out


def package_bundle(
    bundle_dir: str | PathLike,
    output_dir: str | PathLike,
    *,
    weights_dir: str | PathLike | None = None,
    base_url: str | None = None,
    hash_type: str = "sha256",
    name: str | None = None,
    overwrite: bool = False,
    schema: str | PathLike | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Write ``{output_dir}/{name}_v{version}.zip`` as the MONAI model zoo ships a bundle.

    Parameters
    ----------
    bundle_dir
        The bundle folder (``bundles/sd_fsmis``). Only :data:`BUNDLE_CONTENTS` are packaged; ``models/`` and ``eval/``
        are not.
    output_dir
        Folder of the zip (created if needed).
    weights_dir, base_url
        A trained model folder and the URL it will be hosted at: the zip's ``large_files.yml`` then lists every weight
        file with its URL and hash (:func:`large_file_entries`). Without them the bundle's own ``large_files.yml``
        is packaged as it is. The bundle folder itself is never changed.
    hash_type
        Hash of the listed files, one of :data:`HASH_TYPES`.
    name
        Bundle name (default: the bundle folder's name); ``monai.bundle download --name`` must be given the same.
    overwrite
        Replace an existing zip; otherwise an existing one is an error.
    schema
        A local copy of the metadata JSON schema: when given, ``configs/metadata.json`` is validated against it
        (``monai.bundle.verify_metadata``, no download) before anything is written.
    log
        Receives progress lines (default ``print``); ``None`` for silence.

    Returns
    -------
    Path
        The zip, written atomically: an interrupted run leaves no partial zip.

    Raises
    ------
    FileNotFoundError, FileExistsError, ValueError
        With one line naming the file and the problem, before anything is written.
    """
    say = log or (lambda _: None)
    bundle = Path(bundle_dir)
    name, version = _checked_bundle(bundle, name)
    if (weights_dir is None) != (base_url is None):
        raise ValueError("give both weights_dir and base_url (the hosted weights and where they are), or neither.")
    target = Path(output_dir) / f"{name}_v{version}.zip"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite (--overwrite) to replace it.")
    if target.exists() and not target.is_file():
        raise ValueError(f"{target} exists and is not a file.")
    if schema is not None:
        _verify_metadata(bundle / "configs" / "metadata.json", Path(schema))

    files, left_out = _bundle_files(bundle)
    entries, large_files = _large_files_listing(bundle, weights_dir, base_url, hash_type, name, version)
    _check_file_sizes(bundle, files)
    _write_zip(target, bundle, files, name, large_files)
    say(f"package: {target} ({len(files) + (Path(_LARGE_FILES) not in files)} files, {name} v{version}, "
        f"sha256 {hash_file(target)})")
    if left_out:
        say(f"package: not packaged from {bundle}: {', '.join(left_out)}")
    for entry in entries:
        say(f"package: large file {entry['path']} -> {entry['url']}")
    return target


def _checked_bundle(bundle: Path, name: str | None) -> tuple[str, str]:
    """The zip's bundle name (default: the folder's) and the bundle's version, once the folder holds what the model
    zoo requires."""
    if not bundle.is_dir():
        raise FileNotFoundError(f"bundle folder not found: {bundle}")
    name = name or bundle.resolve().name
    if not _NAME.match(name):
        raise ValueError(f"bundle name {name!r} must be letters, digits, '_' or '-' (monai.bundle download uses it).")
    version = bundle_version(bundle)
    if not (bundle / "LICENSE").is_file():
        raise FileNotFoundError(f"bundle {bundle} has no LICENSE (the model zoo requires one)")
    if not (bundle / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"bundle {bundle} has no configs/inference.json")
    return name, version


def _large_files_listing(
    bundle: Path,
    weights_dir: str | PathLike | None,
    base_url: str | None,
    hash_type: str,
    name: str,
    version: str,
) -> tuple[list[dict[str, Any]], bytes]:
    """The zip's ``large_files.yml`` entries and bytes: written from ``weights_dir`` when given, else the bundle's own
    (a warning names the files it lists without a hash)."""
    if weights_dir is not None:
        written = large_file_entries(weights_dir, str(base_url), hash_type=hash_type)
        return written, _large_files_yaml(written, name, version).encode("utf-8")
    listing = bundle / _LARGE_FILES
    if not listing.is_file():
        raise FileNotFoundError(
            f"bundle {bundle} has no {_LARGE_FILES}; give weights_dir and base_url to list the weights."
        )
    entries = read_large_files(listing)
    large_files = listing.read_bytes()
    unverified = [str(e["path"]) for e in entries if not e.get("hash_val")]
    if unverified:
        warnings.warn(  # stacklevel 3: blame the code that called package_bundle, not package_bundle
            f"{listing}: no hash_val for {', '.join(unverified)}; their download cannot be verified.", stacklevel=3
        )
    return entries, large_files


def _check_file_sizes(bundle: Path, files: Sequence[Path]) -> None:
    """Refuse a file over the model zoo's limit: it belongs in ``large_files.yml``."""
    for rel in files:
        size = (bundle / rel).stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(
                f"{bundle / rel} is {size / 2**20:.1f} MiB; the model zoo allows 25 MB per file: list it in "
                f"{_LARGE_FILES} instead."
            )


def _write_zip(target: Path, bundle: Path, files: Sequence[Path], name: str, large_files: bytes) -> None:
    """Write the zip atomically: ``files`` under ``{name}/``, with ``large_files`` as its ``large_files.yml``."""
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for rel in files:
                data = large_files if rel.as_posix() == _LARGE_FILES else (bundle / rel).read_bytes()
                _add_to_zip(archive, f"{name}/{rel.as_posix()}", data)
            if Path(_LARGE_FILES) not in files:
                _add_to_zip(archive, f"{name}/{_LARGE_FILES}", large_files)


def _add_to_zip(archive: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def _verify_metadata(meta_file: Path, schema: Path) -> None:
    if not schema.is_file():
        raise FileNotFoundError(f"metadata schema not found: {schema} (give a local copy; nothing is downloaded)")
    from monai.bundle import verify_metadata

    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    except ValueError as err:
        cause = err.__cause__  # jsonschema's ValidationError: MONAI's own message spans several lines
        if cause is not None and hasattr(cause, "absolute_path"):
            where = "/".join(str(p) for p in cause.absolute_path) or "top level"
            raise ValueError(f"{meta_file}: {where}: {cause.message} (schema {schema})") from err
        raise ValueError(f"{meta_file}: {' '.join(str(err).split())}") from err


def download_large_files(bundle_path: str | PathLike, progress: bool = False) -> list[Path]:
    """Fetch the files of ``{bundle_path}/large_files.yml`` with MONAI's ``download_url``, one clear error per problem.

    MONAI downloads into a temporary folder and moves a file into the bundle only after its hash matched, so a failed
    download leaves no partial file; files already present are hash-checked and kept.

    Returns
    -------
    list of Path
        The files in the bundle, in the order listed.

    Raises
    ------
    ValueError
        ``{large_files.yml}: {path} from {url}: {problem}`` for a hash mismatch (expected and received digests), a
        truncated transfer (bytes received and expected), an HTTP or network error.
    """
    from urllib.error import ContentTooShortError, HTTPError, URLError

    from monai.apps.utils import HashCheckError, download_url

    bundle = Path(bundle_path)
    listing = bundle / _LARGE_FILES
    if not listing.is_file():
        raise FileNotFoundError(f"no {_LARGE_FILES} in {bundle}")
    written = []
    for item in read_large_files(listing):
        url, rel = str(item["url"]), str(item["path"])
        hash_val = str(item.get("hash_val") or "") or None
        hash_type = str(item.get("hash_type") or "sha256").lower()  # MONAI's default
        target = bundle / rel
        where = f"{listing}: {rel} from {url}"
        if not target.resolve().is_relative_to(bundle.resolve()):  # a symbolic link out of the bundle
            raise ValueError(f"{listing}: {rel} resolves outside the bundle ({target.resolve()}).")
        try:
            download_url(url=url, filepath=target, hash_val=hash_val, hash_type=hash_type, progress=progress)
        except HashCheckError:
            got = hash_file(target, hash_type) if target.is_file() else None
            if got is not None:
                raise ValueError(
                    f"{where}: the file already in the bundle has {hash_type} {got}, expected {hash_val}; "
                    "delete it to download it again."
                ) from None
            raise ValueError(
                f"{where}: {hash_type} mismatch (expected {hash_val}); the download is corrupted or the listed hash "
                "is wrong. Nothing was written."
            ) from None
        except ContentTooShortError as err:
            raise ValueError(f"{where}: transfer truncated ({_reason(err)}). Nothing was written.") from None
        except HTTPError as err:
            raise ValueError(f"{where}: HTTP {err.code} {err.reason}. Nothing was written.") from None
        except URLError as err:
            raise ValueError(f"{where}: cannot connect ({err.reason}). Nothing was written.") from None
        if not target.is_file():  # MONAI swallows permission errors of the final move
            raise ValueError(f"{where}: downloaded, but {target} could not be written.")
        written.append(target)
    return written


def _reason(err: BaseException) -> str:
    text = str(getattr(err, "reason", "") or err)
    return text.removeprefix("<urlopen error ").removesuffix(">")
