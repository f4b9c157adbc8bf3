"""Where the volumes of a dataset live on disk: the ALPNet/RPT folder layout and MONAI datalist JSON files.

Both readers return a list of :class:`VolumeRecord` whose order matters: the few-shot folds
(:func:`monai_sdfsmis.data.protocol.rpt_folds`) index that list, so the ALPNet folder is sorted
numerically by the volume number ``N`` of ``image_N.nii.gz`` (``image_2`` before ``image_10``,
the order RPT's five-fold split indexes), and a datalist keeps the order of its JSON entries.
"""

from __future__ import annotations

__all__ = ["VolumeRecord", "find_alpnet_volumes", "load_datalist", "read_datalist", "NIFTI_SUFFIXES"]

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

#: File endings accepted for the ALPNet layout, tried in this order.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


@dataclass(frozen=True)
class VolumeRecord:
    """One volume of a dataset: its image and, when available, its label map and supervoxel map.

    Attributes
    ----------
    id
        Name of the volume, unique within a dataset (the number ``N`` for the ALPNet layout).
    image
        Image file (NIfTI, NRRD, or anything ``monai_sdfsmis.transforms.io.load_volume`` reads).
    label
        Ground-truth label map on the same voxel grid as the image, or ``None``.
    supervoxel
        Supervoxel map (pseudo-labels, 0 = background) on the same voxel grid as the image, or ``None``.
    """

    id: str
    image: Path
    label: Path | None = None
    supervoxel: Path | None = None


def _strip_nifti_suffix(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _find_numbered(folder: Path, prefix: str, number: int) -> Path | None:
    """``folder/<prefix><number><suffix>`` for the first existing NIfTI suffix, else ``None``."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{prefix}{number}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _supervoxel_files(sv_dir: Path) -> dict[int, Path]:
    """Map volume number -> supervoxel file for every ``super*_N.nii[.gz]`` in ``sv_dir``.

    ALPNet/ADNet/RPT name them ``superpix-MIDDLE_N.nii.gz``; their loaders glob ``super*`` and
    take the number after the last underscore, which is what this does too.
    """
    found: dict[int, Path] = {}
    for path in sorted(sv_dir.iterdir()):
        stem = _strip_nifti_suffix(path.name)
        if stem is None or not path.name.startswith("super") or not path.is_file():
            continue
        match = re.search(r"_(\d+)$", stem)
        if match is None:
            continue
        number = int(match.group(1))
        if number in found:
            raise ValueError(
                f"Two supervoxel files for volume {number} in '{sv_dir}': '{found[number].name}' and '{path.name}'."
            )
        found[number] = path
    return found


def _image_files(root: Path) -> dict[int, Path]:
    """Map volume number -> image file for every ``image_N.nii[.gz]`` in ``root``; raise if there is none.

    A non-numeric ``N`` is refused rather than skipped: the folds index volumes by their number, so a
    silently dropped image would shift every fold.
    """
    numbers: dict[int, Path] = {}
    for path in sorted(root.iterdir()):
        if not path.name.startswith("image_") or not path.is_file():
            continue
        stem = _strip_nifti_suffix(path.name)
        if stem is None:
            continue
        tail = stem[len("image_") :]
        if not tail.isdigit():
            raise ValueError(
                f"Image file '{path}' does not follow the ALPNet naming image_N.nii.gz with an integer N; "
                "rename it or list the volumes in a datalist JSON (load_datalist)."
            )
        number = int(tail)
        if number in numbers:
            raise ValueError(f"Two image files for volume {number} in '{root}': '{numbers[number].name}' and '{path.name}'.")
        numbers[number] = path
    if not numbers:
        raise ValueError(f"No image_N.nii.gz files found in dataset folder '{root}'.")
    return numbers


def find_alpnet_volumes(
    dataset_dir: str | PathLike,
    supervoxel_dir: str | PathLike | None = "supervoxels_5000",
    require_labels: bool = False,
    require_supervoxels: bool = False,
) -> list[VolumeRecord]:
    """List the volumes of a dataset folder in the ALPNet/ADNet/RPT layout, sorted numerically.

    Layout::

        dataset_dir/
            image_1.nii.gz   label_1.nii.gz
            image_2.nii.gz   label_2.nii.gz
            ...
            supervoxels_5000/superpix-MIDDLE_1.nii.gz ...

    Parameters
    ----------
    dataset_dir
        Folder holding ``image_N.nii.gz`` (or ``.nii``) files.
    supervoxel_dir
        Supervoxel folder, relative to ``dataset_dir`` unless absolute; ``None`` to ignore supervoxels.
        When the folder exists, every image must have its ``super*_N`` file.
    require_labels
        Raise if an image has no ``label_N`` file (otherwise its ``label`` is ``None``).
    require_supervoxels
        Raise if the supervoxel folder does not exist (otherwise ``supervoxel`` is ``None`` for all).

    Returns
    -------
    list[VolumeRecord]
        One record per ``image_N``, ``id = str(N)``, sorted by ``N`` as an integer: the order the
        five-fold split (RPT's ``get_folds``) indexes.

    Raises
    ------
    FileNotFoundError
        ``dataset_dir`` or a required label/supervoxel file/folder does not exist.
    ValueError
        No ``image_N`` file in the folder, or an ``image_*`` file whose ``*`` is not a number.
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder '{root}' does not exist (expected image_N.nii.gz files there).")

    numbers = _image_files(root)

    sv_files: dict[int, Path] | None = None
    sv_root: Path | None = None
    if supervoxel_dir is not None:
        sv_root = Path(supervoxel_dir).expanduser()
        if not sv_root.is_absolute():
            sv_root = root / sv_root
        if sv_root.is_dir():
            sv_files = _supervoxel_files(sv_root)
        elif require_supervoxels:
            raise FileNotFoundError(
                f"Supervoxel folder '{sv_root}' does not exist; compute the supervoxels first "
                "(monai_sdfsmis.data.supervoxels.write_supervoxels)."
            )

    records = []
    for number in sorted(numbers):
        label = _find_numbered(root, "label_", number)
        if label is None and require_labels:
            raise FileNotFoundError(f"Image '{numbers[number]}' has no label file '{root / f'label_{number}.nii.gz'}'.")
        supervoxel = None
        if sv_files is not None:
            supervoxel = sv_files.get(number)
            if supervoxel is None:
                raise FileNotFoundError(
                    f"Supervoxel file '{sv_root / f'superpix-MIDDLE_{number}.nii.gz'}' for image '{numbers[number]}' "
                    "is missing."
                )
        records.append(VolumeRecord(id=str(number), image=numbers[number], label=label, supervoxel=supervoxel))
    return records


def read_datalist(
    json_path: str | PathLike, keys: str | Sequence[str] = "training", base_dir: str | PathLike | None = None
) -> list[dict[str, Any]]:
    """The entries of a MONAI (Decathlon-style) datalist JSON file, read by MONAI's ``load_decathlon_datalist``.

    MONAI's reader, extended here in the one place the project reads datalists (training, evaluation and
    inference all come through this function): a bare path as an entry stands for ``{"image": path}``, the file
    may be a plain JSON list of entries, ``keys`` may name several alternative top-level keys (the first present
    is read), and every malformed file or entry is one line naming the file, the entry and the field. Relative
    paths are joined to ``base_dir`` by MONAI's rule (``image`` and ``label`` always, other fields where the
    joined file exists); whether the files exist is for the caller to check.

    Parameters
    ----------
    json_path
        The JSON file.
    keys
        Top-level key(s) holding the list (``"training"``; for queries ``("testing", "test", ...)``).
    base_dir
        Folder relative paths are resolved against; default: the JSON file's folder.

    Returns
    -------
    list[dict]
        One dict per entry, in the file's order, with ``image`` and the entry's other fields.

    Raises
    ------
    FileNotFoundError
        The JSON file does not exist.
    ValueError
        Invalid JSON, none of ``keys``, an empty list, an entry without ``image``, or a field that is not a path.
    """
    from monai.data import load_decathlon_datalist

    path = Path(json_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Datalist file '{path}' does not exist.")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Datalist file '{path}' is not valid JSON: {err}") from err
    keys = [keys] if isinstance(keys, str) else list(keys)
    if isinstance(content, dict):
        key = next((k for k in keys if k in content), None)
        if key is None:
            raise ValueError(f"Datalist file '{path}' has no key {' or '.join(map(repr, keys))} (keys: {sorted(content)}).")
        entries = content[key]
    elif isinstance(content, list):
        key, entries = None, content
    else:
        raise ValueError(f"Datalist file '{path}' must hold a list, or an object with a {keys[0]!r} list.")
    if not isinstance(entries, list):
        raise ValueError(f"Datalist file '{path}': '{key}' must be a list of entries.")
    if not entries:
        raise ValueError(f"Datalist file '{path}': {repr(key) if key else 'the list'} is empty.")
    monai_native = key is not None and not any(isinstance(entry, str) for entry in entries)
    items = [{"image": entry} if isinstance(entry, str) else entry for entry in entries]
    for index, entry in enumerate(items):
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"Datalist '{path}' entry {index} must be an object with an 'image' path, got {entry!r}.")
        for field, value in entry.items():
            if field != "id" and (not isinstance(value, str) or not value):
                raise ValueError(f"Datalist '{path}' entry {index}: '{field}' must be a file path, got {value!r}.")
    base = Path(base_dir).expanduser() if base_dir is not None else path.parent
    if monai_native:
        return load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base)

    # The extensions MONAI's reader does not take (a plain list, bare paths): the same joining rule by hand.
    def resolve(field: str, value: Any) -> Any:
        if field == "id":
            return value
        joined = os.path.normpath(base / Path(value).expanduser())
        return joined if field in ("image", "label") or os.path.exists(joined) else value

    return [{field: resolve(field, value) for field, value in entry.items()} for entry in items]


def _existing(value: str, json_path: Path, index: int, field: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Datalist '{json_path}' entry {index}: {field} file '{path}' does not exist.")
    return path


def load_datalist(
    json_path: str | PathLike,
    key: str = "training",
    base_dir: str | PathLike | None = None,
    require_labels: bool = False,
    require_supervoxels: bool = False,
) -> list[VolumeRecord]:
    """Read volumes from a MONAI (Decathlon-style) datalist JSON file.

    Format::

        {"training": [{"image": "imgs/a.nii.gz", "label": "labs/a.nii.gz", "supervoxel": "sv/a.nii.gz"}, ...]}

    ``label``, ``supervoxel`` and ``id`` are optional per entry; without ``id`` the image file name
    (without ``.nii.gz``) is the id. A bare string entry is an image path.

    Parameters
    ----------
    json_path
        The JSON file.
    key
        Top-level key holding the list (``"training"``, ``"validation"``, ``"test"``, ...).
    base_dir
        Folder relative paths are resolved against; default: the JSON file's folder.
    require_labels, require_supervoxels
        Raise if an entry lacks a ``label`` / ``supervoxel``.

    Returns
    -------
    list[VolumeRecord]
        In the order of the JSON list (the order the folds index).

    Raises
    ------
    FileNotFoundError
        The JSON file or a file it names does not exist.
    ValueError
        Invalid JSON, missing key, malformed entry, or duplicate ids.
    """
    path = Path(json_path).expanduser()
    records: list[VolumeRecord] = []
    seen: set[str] = set()
    for index, entry in enumerate(read_datalist(path, key, base_dir)):
        image = _existing(entry["image"], path, index, "image")
        label = _existing(entry["label"], path, index, "label") if "label" in entry else None
        supervoxel = _existing(entry["supervoxel"], path, index, "supervoxel") if "supervoxel" in entry else None
        if label is None and require_labels:
            raise ValueError(f"Datalist '{path}' entry {index} ('{image}') has no 'label'.")
        if supervoxel is None and require_supervoxels:
            raise ValueError(f"Datalist '{path}' entry {index} ('{image}') has no 'supervoxel'.")
        volume_id = str(entry.get("id", _strip_nifti_suffix(image.name) or image.stem))
        if volume_id in seen:
            raise ValueError(f"Datalist '{path}' entry {index}: duplicate volume id '{volume_id}'; give entries an 'id'.")
        seen.add(volume_id)
        records.append(VolumeRecord(id=volume_id, image=image, label=label, supervoxel=supervoxel))
    return records
