"""Evaluation protocol: folds, support/query volumes, support slices and query chunks (RPT's protocol)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monai_sdfsmis.data import (
    CHAOS_ORGANS,
    SABS_ORGANS,
    VolumeRecord,
    VolumeStore,
    chunk_bounds,
    find_alpnet_volumes,
    fold_split,
    k_shot_supports,
    organ_slices,
    protocol_cases,
    rpt_folds,
    support_and_queries,
    support_slice_indices,
)
from monai_sdfsmis.data.protocol import organ_id_list
from tests.utils import chaos_dir, requires_chaos


def _records(n: int) -> list[VolumeRecord]:
    return [VolumeRecord(id=f"v{i}", image=Path(f"image_{i}.nii.gz")) for i in range(n)]


def test_rpt_folds_chaos_and_sabs():
    assert rpt_folds(20) == [
        [0, 1, 2, 3, 4],
        [4, 5, 6, 7, 8],
        [8, 9, 10, 11, 12],
        [12, 13, 14, 15, 16],
        [0, 16, 17, 18, 19],
    ]
    assert rpt_folds(30) == [
        [0, 1, 2, 3, 4, 5, 6],
        [6, 7, 8, 9, 10, 11, 12],
        [12, 13, 14, 15, 16, 17, 18],
        [18, 19, 20, 21, 22, 23, 24],
        [0, 24, 25, 26, 27, 28, 29],
    ]
    # FAMNet's CT folds: the 5-volume MRI folds applied to the 30 CT volumes (FAMNet's get_folds)
    assert rpt_folds(30, scheme="famnet") == rpt_folds(20)


def test_rpt_folds_errors():
    with pytest.raises(ValueError, match="20 .* or 30 .* got 25"):
        rpt_folds(25)
    with pytest.raises(ValueError, match="at least 20"):
        rpt_folds(12, scheme="famnet")
    with pytest.raises(ValueError, match="Unknown fold scheme"):
        rpt_folds(20, scheme="adnet")


def test_fold_split_and_support_position():
    records = _records(20)
    train, test = fold_split(records, 4)
    assert [r.id for r in test] == ["v0", "v16", "v17", "v18", "v19"]
    assert [r.id for r in train] == [f"v{i}" for i in range(1, 16)]
    support, queries = support_and_queries(test)
    assert support.id == "v17" and [q.id for q in queries] == ["v0", "v16", "v18", "v19"]
    train, test = fold_split(_records(30), 1)
    assert len(train) == 23 and [r.id for r in test] == [f"v{i}" for i in range(6, 13)]
    assert support_and_queries(test)[0].id == "v8"
    assert support_and_queries(test, support_position=0)[0].id == "v6"
    # explicit folds for a dataset of another size
    train, test = fold_split(_records(6), 1, folds=[[0, 1, 2], [3, 4, 5]])
    assert [r.id for r in test] == ["v3", "v4", "v5"] and [r.id for r in train] == ["v0", "v1", "v2"]


def test_fold_split_errors():
    with pytest.raises(ValueError, match="Fold 5 does not exist"):
        fold_split(_records(20), 5)
    with pytest.raises(ValueError, match="RPT folds are defined"):
        fold_split(_records(6), 0)
    with pytest.raises(ValueError, match="outside the 6 volumes"):
        fold_split(_records(6), 0, folds=[[0, 6]])
    with pytest.raises(ValueError, match="outside a fold of 2 volumes"):
        support_and_queries(_records(2), support_position=2)
    with pytest.raises(ValueError, match="at least 2 volumes"):
        support_and_queries(_records(1), support_position=0)


def test_support_slice_indices_and_chunks_by_hand():
    # p = 1/6, 1/2, 5/6 of C, truncated
    assert support_slice_indices(24) == [4, 12, 20]
    assert support_slice_indices(15) == [2, 7, 12]  # 2.5, 7.5, 12.5
    assert support_slice_indices(14) == [2, 7, 11]  # 2.33, 7, 11.67
    assert support_slice_indices(6) == [1, 3, 5]
    assert support_slice_indices(1) == [0, 0, 0]
    assert support_slice_indices(10, n_chunks=1) == [5]
    assert support_slice_indices(8, n_chunks=2) == [2, 6]  # p = 1/4, 3/4
    assert chunk_bounds(24) == [(0, 8), (8, 16), (16, 24)]
    assert chunk_bounds(14) == [(0, 4), (4, 9), (9, 14)]  # 4.67 and 9.33 truncated
    assert chunk_bounds(2) == [(0, 0), (0, 1), (1, 2)]
    with pytest.raises(ValueError, match="at least one slice"):
        support_slice_indices(0)
    with pytest.raises(ValueError, match="n_chunks"):
        chunk_bounds(5, n_chunks=0)


def test_organ_slices_synthetic_and_missing_organ():
    label = np.zeros((4, 4, 6), np.int16)
    label[1, 1, [1, 2, 4]] = 3
    label[0, 0, 5] = 1
    np.testing.assert_array_equal(organ_slices(label, 3), [1, 2, 4])
    np.testing.assert_array_equal(organ_slices(label[None], 1), [5])
    with pytest.raises(ValueError, match="Organ label 2 does not occur.*case_9"):
        organ_slices(label, 2, source="case_9")


@requires_chaos
def test_protocol_indices_on_real_volumes():
    """Hand computation on CHAOS volumes 1 (liver) and 3 (support of fold 0: left kidney, spleen)."""
    records = find_alpnet_volumes(chaos_dir(), require_labels=True)
    store = VolumeStore([records[0], records[2]])
    # volume 1, liver (id 1): slices 12..35 -> C = 24; supports int(24/6)=4, int(24/2)=12, int(24*5/6)=20
    liver = organ_slices(store.label("1"), 1)
    np.testing.assert_array_equal(liver, np.arange(12, 36))
    assert [int(liver[i]) for i in support_slice_indices(len(liver))] == [16, 24, 32]
    # as a query: linspace(0, 24, 4) = 0, 8, 16, 24 -> slices 12-19, 20-27, 28-35
    assert [(int(liver[a]), int(liver[b - 1])) for a, b in chunk_bounds(len(liver))] == [(12, 19), (20, 27), (28, 35)]
    # volume 3, left kidney (id 3): slices 3..15 and 17..18 (slice 16 has none) -> C = 15, positions 2, 7, 12
    lk = organ_slices(store.label("3"), 3)
    np.testing.assert_array_equal(lk, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18])
    assert [int(lk[i]) for i in support_slice_indices(len(lk))] == [5, 10, 15]
    # volume 3, spleen (id 4): slices 12..25 -> C = 14, positions 2, 7, 11; chunks 0-4, 4-9, 9-14
    spleen = organ_slices(store.label("3"), 4)
    np.testing.assert_array_equal(spleen, np.arange(12, 26))
    assert [int(spleen[i]) for i in support_slice_indices(len(spleen))] == [14, 19, 23]
    assert [[int(s) for s in spleen[a:b]] for a, b in chunk_bounds(len(spleen))] == [
        [12, 13, 14, 15],
        [16, 17, 18, 19, 20],
        [21, 22, 23, 24, 25],
    ]


@requires_chaos
def test_protocol_cases_chaos():
    records = find_alpnet_volumes(chaos_dir(), require_labels=True)
    cases = protocol_cases(records)
    assert len(cases) == 5 * 4 * 4  # folds x organs x query volumes
    first = cases[:4]
    assert {c.support.id for c in first} == {"3"}  # fold 0 = volumes 1, 2, 3, 5, 8; position 2
    assert [c.query.id for c in first] == ["1", "2", "5", "8"]
    assert {(c.fold, c.organ_id, c.organ_name) for c in first} == {(0, 1, "liver")}
    fold4 = protocol_cases(records, fold_ids=[4], organ_ids=[4])
    assert [(c.support.id, c.query.id, c.organ_name) for c in fold4] == [
        ("37", "1", "spleen"),
        ("37", "36", "spleen"),
        ("37", "38", "spleen"),
        ("37", "39", "spleen"),
    ]
    assert all(c.support.id != c.query.id for c in cases)


def test_protocol_cases_sabs_names_and_explicit_folds():
    cases = protocol_cases(_records(30), fold_ids=[0], organ_ids=(1, 2, 3, 6), organ_names=SABS_ORGANS)
    assert len(cases) == 4 * 6
    assert [c.organ_name for c in cases[::6]] == ["spleen", "right_kidney", "left_kidney", "liver"]
    assert {c.support.id for c in cases} == {"v2"}
    small = protocol_cases(_records(6), folds=[[0, 1, 2], [3, 4, 5]], organ_ids=(7,), organ_names=CHAOS_ORGANS)
    assert [(c.fold, c.support.id, c.query.id, c.organ_name) for c in small] == [
        (0, "v2", "v0", "label_7"),
        (0, "v2", "v1", "label_7"),
        (1, "v5", "v3", "label_7"),
        (1, "v5", "v4", "label_7"),
    ]
    with pytest.raises(ValueError, match="organ_ids must be a non-empty list"):
        protocol_cases(_records(20), organ_ids=())
    # a name or a fraction is not silently iterated or truncated into another organ
    with pytest.raises(ValueError, match="organ_ids: 'liver' is not a label id"):
        protocol_cases(_records(20), organ_ids="liver")
    with pytest.raises(ValueError, match=r"organ_ids: 1.5 is not a label id"):
        protocol_cases(_records(20), organ_ids=[1.5])
    with pytest.raises(ValueError, match=r"organ_ids: True is not a label id"):
        protocol_cases(_records(20), organ_ids=[True])


@requires_chaos
def test_k_shot_supports_follow_the_fold_from_the_support_and_skip_the_query():
    records = find_alpnet_volumes(chaos_dir(), require_labels=True)
    # fold 0 = volumes 1, 2, 3, 5, 8 (RPT); the 1-shot support is 3 (position 2): then 5, 8, 1, 2, wrapping around
    cases = protocol_cases(records, fold_ids=[0], organ_ids=[2], shots=3)
    assert [(c.query.id, c.support.id, [r.id for r in c.extra_supports]) for c in cases] == [
        ("1", "3", ["5", "8"]),
        ("2", "3", ["5", "8"]),
        ("5", "3", ["8", "1"]),
        ("8", "3", ["5", "1"]),
    ]
    one_shot = protocol_cases(records, fold_ids=[0], organ_ids=[2])
    assert [c.query.id for c in one_shot] == [c.query.id for c in cases] and all(not c.extra_supports for c in one_shot)
    _, test = fold_split(records, 0)
    assert [r.id for r in k_shot_supports(test, test[0], 4)] == ["3", "5", "8", "2"]
    for shots in (0, 5):
        with pytest.raises(ValueError, match="shots must be 1 to 4 for a test fold of 5 volumes"):
            k_shot_supports(test, test[0], shots)


@pytest.mark.parametrize("value, names, expected", [
    (2, None, [2]), (2.0, None, [2]), ("3", None, [3]), ([4, "1"], None, [4, 1]),
    ("spleen", {"spleen": 4}, [4]), ([" liver ", 3], {"liver": 1}, [1, 3]),
])
def test_organ_id_list_is_the_one_parser_of_ids_numbers_and_names(value, names, expected):
    assert organ_id_list(value, key="organ_id", names=names) == expected


@pytest.mark.parametrize("value, names, unique, message", [
    ("liver", None, False, r"organ_id: 'liver' is not a label id"),
    ("pancreas", {"liver": 1}, False, r"'pancreas' is neither a label id nor one of the labels \['liver'\]"),
    ("nan", None, False, "is not a label id"),
    ("inf", None, False, "is not a label id"),
    ([1, "1"], None, True, "lists an organ twice"),
    ([], None, False, "non-empty list"),
    (-2, None, False, "is not a label id"),
])
def test_organ_id_list_refuses_with_one_line(value, names, unique, message):
    with pytest.raises(ValueError, match=message):
        organ_id_list(value, key="organ_id", names=names, unique=unique)
    assert organ_id_list([1, 1], key="organ_id") == [1, 1]  # duplicates only matter where asked (unique)
