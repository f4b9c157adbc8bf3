"""The few-shot evaluation protocol of RPT/ADNet (RPT's folds, support = position 2 of the fold, 3 chunks).

For fold ``k`` a model is trained on every volume that is not in fold ``k`` (:func:`fold_split`) and
tested on the volumes of fold ``k``: the volume at position ``support_position`` (2) of the fold is
the support, the others are queries (:func:`support_and_queries`). For each test organ, the support
volume gives 3 support slices (:func:`support_slice_indices` over the slices that contain the organ),
and the organ-containing slices of each query volume are split into 3 contiguous chunks
(:func:`chunk_bounds`); chunk ``j`` is segmented with support slice ``j``. Dice is computed per query
volume over its organ slices.

Cross-domain (CD-FSMIS, as in FAMNet's scripts) needs nothing more: it is two dataset roots. For fold
``k`` train on ``fold_split(source_records, k)[0]`` (the source domain's volumes outside its fold
``k``) and evaluate ``protocol_cases(target_records, fold_ids=[k], organ_ids=<target ids>)`` on the
target root (the target domain's RPT folds, the default; ``rpt_folds(30, scheme="famnet")`` gives
FAMNet's 5-volume CT folds as the option).
"""

from __future__ import annotations

__all__ = [
    "organ_id_list",
    "CHAOS_ORGANS",
    "SABS_ORGANS",
    "ProtocolCase",
    "rpt_folds",
    "fold_split",
    "support_and_queries",
    "k_shot_supports",
    "organ_slices",
    "support_slice_indices",
    "chunk_bounds",
    "protocol_cases",
]

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monai_sdfsmis.data.layouts import VolumeRecord

#: Label ids of the four test organs in the CHAOS T2-SPIR (Abd-MRI) label maps (RPT's ``dataset_specifics.py``).
CHAOS_ORGANS: dict[int, str] = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
#: Label ids of the four test organs in the Synapse/BTCV (Abd-CT, "SABS") label maps (Synapse ids kept as-is).
SABS_ORGANS: dict[int, str] = {6: "liver", 2: "right_kidney", 3: "left_kidney", 1: "spleen"}


def organ_id_list(
    organ_ids: Any, key: str = "organ_ids", names: Mapping[str, int] | None = None, unique: bool = False
) -> list[int]:
    """``organ_ids`` as a list of positive integer label ids; anything else is one ``ValueError`` naming ``key``.

    The one parser of organ ids: configs, the command line, the bundle and MONAI Label requests all come here.

    Parameters
    ----------
    organ_ids
        An id, or a list of ids. An id is a positive integer (``2``, ``2.0``, or the text ``"2"`` of a request), or,
        with ``names``, a label name (``"liver"``).
    key
        The setting's name, for the error message.
    names
        Label name -> id (MONAI Label's ``labels``); ``None``: no names are accepted.
    unique
        Refuse a list that names an organ twice.

    Notes
    -----
    A string (``"liver"``) or a float that is not a whole number (``1.5``) would otherwise be iterated or truncated
    into some other organ, silently.
    """
    values: Any = [organ_ids] if isinstance(organ_ids, (numbers.Number, str)) else organ_ids
    try:
        values = list(values)
    except TypeError:
        values = []
    if not values:
        raise ValueError(f"{key} must be a non-empty list of positive integer label ids, got {organ_ids!r}")
    ids = [_organ_id(value, key, names) for value in values]
    if unique and len(set(ids)) != len(ids):
        raise ValueError(f"{key} lists an organ twice: {values}")
    return ids


def _organ_id(value: Any, key: str, names: Mapping[str, int] | None) -> int:
    if isinstance(value, str):
        text = value.strip()
        if names is not None and text in names:
            return int(names[text])
        try:
            value = float(text)
        except ValueError:
            if names is not None:
                raise ValueError(f"{key}: {text!r} is neither a label id nor one of the labels {sorted(names)}") from None
    if (
        isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
        or int(value) != value or value < 1
    ):
        raise ValueError(f"{key}: {value!r} is not a label id (a positive integer; 0 is the background)")
    return int(value)


def _five_folds(size: int, n_volumes: int) -> list[list[int]]:
    # Each fold k is the inclusive range {k*(size-1) .. (k+1)*(size-1)}, so neighbouring folds share a volume,
    # and the last one wraps around to volume 0 (ALPNet heritage: one extra volume per fold, as support).
    step = size - 1
    folds = [list(range(k * step, k * step + size)) for k in range(4)]
    folds.append(sorted({0, *range(4 * step, n_volumes)}))
    return folds


def rpt_folds(n_volumes: int, scheme: str = "rpt") -> list[list[int]]:
    """The five overlapping test folds of RPT/ADNet, as indices into the numerically sorted volume list.

    Parameters
    ----------
    n_volumes
        Number of volumes: 20 (CHAOS T2-SPIR) or 30 (Synapse/BTCV) for ``scheme="rpt"``.
    scheme
        ``"rpt"``: CHAOS ``{0..4},{4..8},{8..12},{12..16},{16..19}+{0}`` and SABS
        ``{0..6},{6..12},{12..18},{18..24},{24..29}+{0}`` (RPT's ``get_folds``).
        ``"famnet"``: FAMNet's 5-volume folds (the CHAOS ones) for any dataset of at least 20
        volumes, the option for the MRI->CT direction (the paper does not say which CT folds it used).

    Returns
    -------
    list[list[int]]
        Five sorted folds (fold 4 of CHAOS is ``[0, 16, 17, 18, 19]``).

    Raises
    ------
    ValueError
        Unknown scheme, or a dataset size the scheme does not define (pass explicit ``folds`` to
        :func:`fold_split` / :func:`protocol_cases` for other datasets).
    """
    if scheme == "rpt":
        if n_volumes == 20:
            return _five_folds(5, 20)
        if n_volumes == 30:
            return _five_folds(7, 30)
        raise ValueError(
            f"RPT folds are defined for 20 (CHAOS T2-SPIR) or 30 (Synapse/BTCV) volumes, got {n_volumes}; "
            "pass an explicit list of folds instead."
        )
    if scheme == "famnet":
        if n_volumes < 20:
            raise ValueError(f"FAMNet folds need at least 20 volumes, got {n_volumes}; pass an explicit list of folds.")
        return _five_folds(5, 20)
    raise ValueError(f"Unknown fold scheme {scheme!r}; expected 'rpt' or 'famnet'.")


def _check_folds(folds: Sequence[Sequence[int]], n_volumes: int) -> list[list[int]]:
    checked = []
    for k, fold in enumerate(folds):
        members = sorted(int(i) for i in fold)
        if not members:  # no test volume: every volume trains (a user's unlabelled scans)
            checked.append(members)
            continue
        if len(set(members)) != len(members):
            raise ValueError(f"Fold {k} lists a volume twice: {members}.")
        if members[0] < 0 or members[-1] >= n_volumes:
            raise ValueError(f"Fold {k} = {members} indexes outside the {n_volumes} volumes of the dataset.")
        checked.append(members)
    if not checked:
        raise ValueError("No folds given.")
    return checked


def fold_split(
    records: Sequence[VolumeRecord], fold: int, folds: Sequence[Sequence[int]] | None = None
) -> tuple[list[VolumeRecord], list[VolumeRecord]]:
    """Split a dataset into the training volumes and the test volumes of one fold.

    Parameters
    ----------
    records
        All volumes of the dataset, in fold order (numeric order for the ALPNet layout).
    fold
        Fold index (0..4 for the RPT folds).
    folds
        Explicit folds (indices into ``records``); default :func:`rpt_folds` ``(len(records))``.

    Returns
    -------
    (train_records, test_records)
        ``train``: every volume not in the fold (in dataset order); ``test``: the fold's volumes in
        sorted index order.
    """
    all_folds = _check_folds(folds if folds is not None else rpt_folds(len(records)), len(records))
    if not 0 <= fold < len(all_folds):
        raise ValueError(f"Fold {fold} does not exist; there are {len(all_folds)} folds (0..{len(all_folds) - 1}).")
    test_idx = all_folds[fold]
    test_set = set(test_idx)
    train = [r for i, r in enumerate(records) if i not in test_set]
    test = [records[i] for i in test_idx]
    return train, test


def support_and_queries(
    test_records: Sequence[VolumeRecord], support_position: int = 2
) -> tuple[VolumeRecord, list[VolumeRecord]]:
    """The support volume (position ``support_position`` of the fold, RPT scripts use 2) and the query volumes.

    Returns
    -------
    (support, queries)
        ``queries`` are the fold's other volumes in fold order.
    """
    if len(test_records) < 2:
        raise ValueError(f"A test fold needs at least 2 volumes (one support, one query), got {len(test_records)}.")
    if not -len(test_records) <= support_position < len(test_records):
        raise ValueError(f"support_position {support_position} is outside a fold of {len(test_records)} volumes.")
    position = support_position % len(test_records)
    queries = [r for i, r in enumerate(test_records) if i != position]
    return test_records[position], queries


def organ_slices(label: np.ndarray, organ_id: int, source: str | None = None) -> np.ndarray:
    """Indices of the slices (last axis) that contain at least one voxel of ``organ_id``.

    Parameters
    ----------
    label
        Label map ``[H, W, D]`` (or ``[1, H, W, D]``).
    organ_id
        Label value of the organ.
    source
        Name of the volume/file, used in the error message.

    Returns
    -------
    np.ndarray
        Sorted int64 slice indices.

    Raises
    ------
    ValueError
        The organ is absent from the volume.
    """
    arr = np.asarray(label)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"Label map must be [H, W, D] or [1, H, W, D], got shape {tuple(arr.shape)}.")
    present = np.flatnonzero((arr == organ_id).any(axis=(0, 1)))
    if present.size == 0:
        where = f" of '{source}'" if source else ""
        raise ValueError(f"Organ label {organ_id} does not occur in the label map{where}.")
    return present.astype(np.int64)


def support_slice_indices(n_organ_slices: int, n_chunks: int = 3) -> list[int]:
    """Positions (within the organ's slices) of the support slices: the middle of each of ``n_chunks`` parts.

    ``int(p * C)`` for ``p = 1/(2n) + k * (1 - 1/n) / (n - 1)``, ``k = 0..n-1`` (``p = 0.5`` for ``n = 1``),
    i.e. ``p = 1/6, 1/2, 5/6`` for 3 chunks (RPT ``get_support_index``, computed in the same float order).

    Parameters
    ----------
    n_organ_slices
        ``C``, the number of support-volume slices containing the organ.
    n_chunks
        Number of support slices (= query chunks).

    Returns
    -------
    list[int]
        Indices into the organ slice list (index it with :func:`organ_slices` to get volume slice numbers).
    """
    if n_organ_slices < 1:
        raise ValueError(f"The support organ must span at least one slice, got {n_organ_slices}.")
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be at least 1, got {n_chunks}.")
    if n_chunks == 1:
        fractions = [0.5]
    else:
        half_part = 1 / (n_chunks * 2)
        part_interval = (1.0 - 1.0 / n_chunks) / (n_chunks - 1)
        fractions = [half_part + part_interval * k for k in range(n_chunks)]
    return [int(v) for v in (np.array(fractions) * n_organ_slices).astype(int)]


def chunk_bounds(n_slices: int, n_chunks: int = 3) -> list[tuple[int, int]]:
    """Split ``n_slices`` query organ slices into ``n_chunks`` contiguous ``[start, end)`` chunks.

    Bounds are ``np.linspace(0, n_slices, n_chunks + 1).astype(int)`` as in RPT; a chunk can be empty
    when ``n_slices < n_chunks``.
    """
    if n_slices < 0:
        raise ValueError(f"n_slices must be non-negative, got {n_slices}.")
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be at least 1, got {n_chunks}.")
    edges = np.linspace(0, n_slices, n_chunks + 1).astype(int)
    return [(int(edges[j]), int(edges[j + 1])) for j in range(n_chunks)]


@dataclass(frozen=True)
class ProtocolCase:
    """One evaluation unit: segment ``organ_id`` in the ``query`` volume with slices of the ``support`` volume (and,
    k-shot, of the ``extra_supports``)."""

    fold: int
    organ_id: int
    organ_name: str
    support: VolumeRecord
    query: VolumeRecord
    extra_supports: tuple[VolumeRecord, ...] = ()


def k_shot_supports(
    test_records: Sequence[VolumeRecord], query: VolumeRecord, shots: int, support_position: int = 2
) -> list[VolumeRecord]:
    """The ``shots`` support volumes of ``query`` in its test fold: the fold's support (position ``support_position``),
    then the fold's volumes after it in fold order, wrapping around, never ``query`` itself.

    With RPT's CHAOS folds (4 volumes) ``shots`` can be 1 to 3; for 3 every other volume of the fold is a support.
    """
    position = support_position % len(test_records)
    if int(shots) < 1 or int(shots) > len(test_records) - 1:
        raise ValueError(
            f"shots must be 1 to {len(test_records) - 1} for a test fold of {len(test_records)} volumes (the query is "
            f"never its own support), got {shots}."
        )
    order = [test_records[(position + i) % len(test_records)] for i in range(len(test_records))]
    return [r for r in order if r.id != query.id][: int(shots)]


def protocol_cases(
    records: Sequence[VolumeRecord],
    folds: Sequence[Sequence[int]] | None = None,
    fold_ids: Sequence[int] | None = None,
    organ_ids: Sequence[int] = (1, 2, 3, 4),
    organ_names: Mapping[int, str] = CHAOS_ORGANS,
    support_position: int = 2,
    shots: int = 1,
) -> list[ProtocolCase]:
    """Every (fold, organ, query volume) case of the protocol on one dataset root.

    Parameters
    ----------
    records
        The test dataset's volumes in fold order (for cross-domain: the target root's volumes).
    folds
        Explicit folds; default :func:`rpt_folds` ``(len(records))``.
    fold_ids
        Which folds to list (default all).
    organ_ids
        Label ids of the test organs (CHAOS ``1, 2, 3, 4``; SABS ``1, 2, 3, 6``).
    organ_names
        Id -> name (:data:`CHAOS_ORGANS`, :data:`SABS_ORGANS`); ids missing from it are named ``label_<id>``.
    support_position
        Position of the support volume inside each fold (RPT scripts: 2).
    shots
        Support volumes per query (:func:`k_shot_supports`); the queries stay those of the 1-shot protocol, so the
        k-shot rows compare case by case with the 1-shot ones.

    Returns
    -------
    list[ProtocolCase]
        Ordered by fold, then organ (in ``organ_ids`` order), then query volume (fold order).
    """
    all_folds = _check_folds(folds if folds is not None else rpt_folds(len(records)), len(records))
    chosen = list(range(len(all_folds))) if fold_ids is None else [int(k) for k in fold_ids]
    organ_ids = organ_id_list(organ_ids)
    cases = []
    for fold in chosen:
        _, test = fold_split(records, fold, all_folds)
        support, queries = support_and_queries(test, support_position)
        for organ_id in organ_ids:
            name = organ_names.get(int(organ_id), f"label_{int(organ_id)}")
            for query in queries:
                extra = tuple(k_shot_supports(test, query, shots, support_position)[1:])
                cases.append(ProtocolCase(fold=fold, organ_id=int(organ_id), organ_name=name, support=support,
                                          query=query, extra_supports=extra))
    return cases
