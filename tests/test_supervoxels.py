"""Tests of the 3-D Felzenszwalb supervoxels against synthetic volumes and the published CHAOS supervoxels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest

from monai_sdfsmis.data import supervoxels as sv
from monai_sdfsmis.data.supervoxels import compute_supervoxels, felzenszwalb_3d, foreground_mask, write_supervoxels
from tests.utils import chaos_dir, requires_chaos


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings of the same voxels, from their contingency table."""
    _, ia = np.unique(a.ravel(), return_inverse=True)
    _, ib = np.unique(b.ravel(), return_inverse=True)
    n_b = ib.max() + 1
    table = np.bincount(ia * n_b + ib, minlength=(ia.max() + 1) * n_b).reshape(-1, n_b).astype(np.float64)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    both, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([float(ia.size)]))
    top = (rows + cols) / 2
    return 1.0 if top == expected else (both - expected) / (top - expected)


def consecutive(labels: np.ndarray) -> np.ndarray:
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Compile (or load from numba's cache) the kernels once, on a tiny volume, so timings exclude it."""
    start = time.perf_counter()
    felzenszwalb_3d(np.random.default_rng(0).random((6, 7, 5)), (1.0, 1.0, 2.0), min_size=10)
    return time.perf_counter() - start


def test_adjusted_rand_index_helper():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a + 7) == pytest.approx(1.0)
    assert adjusted_rand_index(a, np.array([0, 1, 0, 1, 0, 1])) < 0.0
    # by hand: contingency [[2, 1, 0], [0, 1, 2]] gives (2 - 1.2) / (4.5 - 1.2)
    assert adjusted_rand_index(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 2, 2])) == pytest.approx(0.2424, 1e-3)


# ----------------------------------------------------------------------------------------------------- synthetic


def test_two_constant_blocks_become_two_segments():
    vol = np.zeros((20, 16, 8))
    vol[10:] = 100.0
    labels = felzenszwalb_3d(vol, (1.0, 1.0, 3.0), min_size=10)
    assert labels.dtype == np.int32 and labels.shape == vol.shape
    assert set(np.unique(labels)) == {0, 1}
    assert (labels[:10] == 0).all() and (labels[10:] == 1).all()


def test_supervoxels_import_and_run_where_numba_can_write_no_cache(tmp_path):
    """A read-only install and a read-only HOME: every numba cache folder refuses writes. Root ignores file modes,
    so the refusal is made where numba probes a folder; importing the package and running its kernels must work."""
    script = textwrap.dedent(
        """
        import numba.core.caching as caching
        def read_only(self):
            raise OSError(30, "Read-only file system", self.get_cache_path())
        caching._CacheLocator.ensure_cache_path = read_only
        import numpy as np
        from monai_sdfsmis.data import supervoxels
        import monai_sdfsmis.engines.inference  # what infer imports
        parent = np.array([1, 2, 2, 0], dtype=np.int64)  # 3 -> 0 -> 1 -> 2
        # one kernel compiled uncached (all of them take minutes on a busy CPU); the path is the same for each
        print(supervoxels._find(parent, 3), parent.tolist())
        """
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "2 [2, 2, 2, 2]"  # the root, every node compressed onto it


def test_compute_supervoxels_removes_background_and_numbers_consecutively():
    vol = np.zeros((24, 24, 6))
    vol[2:12, 2:22] = 100.0
    vol[12:22, 2:22] = 200.0
    out = compute_supervoxels(vol, (1.0, 1.0, 2.0), min_size=50)
    assert out.dtype == np.int32
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out[vol == 0] == 0).all()
    assert len(np.unique(out[vol == 100])) == 1 and len(np.unique(out[vol == 200])) == 1
    assert out[5, 5, 0] != out[15, 5, 0]


def test_min_size_is_respected_in_raw_segmentation():
    vol = np.random.default_rng(1).integers(0, 200, size=(30, 26, 12)).astype(np.float64)
    for min_size in (1, 150, 800):
        labels = felzenszwalb_3d(vol, (1.0, 1.0, 2.5), min_size=min_size)
        sizes = np.bincount(labels.ravel())
        assert (sizes > 0).all(), "labels must be consecutive"
        assert sizes.min() >= min_size
    assert len(np.unique(felzenszwalb_3d(vol, (1.0, 1.0, 2.5), min_size=1))) > 1000  # noise over-segments


def test_anisotropy_changes_which_neighbours_merge():
    # two slices, each split into a left/right half; a step of 1 along z and of 10 in-plane. With isotropic voxels the
    # cheap z edges merge the halves across slices; with thick slices (z weight s**2 = 400) the in-plane edges win.
    vol = np.zeros((10, 10, 2))
    vol[:, :, 1] += 1.0
    vol[5:] += 10.0
    iso = felzenszwalb_3d(vol, (1.0, 1.0, 1.0), min_size=100)
    thick = felzenszwalb_3d(vol, (1.0, 1.0, 20.0), min_size=100)
    assert len(np.unique(iso)) == 2 and len(np.unique(thick)) == 2
    assert (iso[:5] == iso[0, 0, 0]).all() and (iso[5:] != iso[0, 0, 0]).all()  # split in-plane
    assert (thick[..., 0] == thick[0, 0, 0]).all() and (thick[..., 1] != thick[0, 0, 0]).all()  # split along z


def test_direction_weights_follow_the_reference_formulas():
    s = 7.7 / 1.25
    w = sv._direction_weights(s)
    offsets = sv._OFFSETS
    assert len(offsets) == 13
    # half of the 26-neighbourhood: no direction appears together with its opposite
    as_set = {tuple(o) for o in offsets}
    assert len(as_set) == 13 and not any(tuple(-np.array(o)) in as_set for o in offsets)
    n_plane = (offsets[:, 1] != 0).astype(int) + (offsets[:, 2] != 0).astype(int)
    in_plane = offsets[:, 0] == 0
    np.testing.assert_allclose(w[in_plane], 1.0)
    np.testing.assert_allclose(w[~in_plane & (n_plane == 0)], s**2)
    np.testing.assert_allclose(w[~in_plane & (n_plane == 1)], (1 + s**2) / 2)
    np.testing.assert_allclose(w[~in_plane & (n_plane == 2)], (2 + s**2) / 3)


def test_foreground_mask_keeps_largest_component_and_fills_holes():
    vol = np.zeros((40, 40, 3))
    vol[5:30, 5:30, 0] = 200.0
    vol[12:18, 12:18, 0] = 0.0  # hole
    vol[34:38, 34:38, 0] = 200.0  # smaller island
    vol[2:4, 2:4, 1] = 5.0  # below threshold
    mask = foreground_mask(vol, threshold=10)
    assert mask.dtype == bool and mask.shape == vol.shape
    assert mask[5:30, 5:30, 0].all() and mask[:, :, 0].sum() == 25 * 25
    assert not mask[:, :, 1:].any()


def test_introsort_matches_numpy_classic_argsort_including_heapsort_fallback(tmp_path):
    """The tie order must be NumPy's classic introsort: NumPy (SIMD sorts switched off) sorts in a subprocess."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    script = textwrap.dedent(
        """
        import sys
        import numpy as np

        def killer(n):
            # McIlroy's adversary against median-of-three quicksort, played against NumPy's own argsort
            gas, val, state = n, [n] * n, {"solid": 0, "cand": 0}

            class Key:
                def __init__(self, i):
                    self.i = i

                def __lt__(self, other):
                    x, y = self.i, other.i
                    if val[x] == gas and val[y] == gas:
                        val[x if x == state["cand"] else y] = state["solid"]
                        state["solid"] += 1
                    if val[x] == gas:
                        state["cand"] = x
                    elif val[y] == gas:
                        state["cand"] = y
                    return val[x] < val[y]

            objs = np.empty(n, dtype=object)
            objs[:] = [Key(i) for i in range(n)]
            np.argsort(objs)
            return np.array(val, dtype=np.float64)

        rng = np.random.default_rng(0)
        k = killer(1200)
        cases = [rng.integers(0, 30, 200_000).astype(float), rng.random(50_000), np.zeros(1000), np.arange(40.0)[::-1],
                 k, np.floor(k / 2), np.tile(k, 2)]
        out = {}
        for i, v in enumerate(cases):
            out[f"v{i}"], out[f"p{i}"] = v, np.argsort(v)
        np.savez(sys.argv[1], **out)
        """
    )
    disabled = " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=disabled)
    target = tmp_path / "numpy_classic.npz"
    res = subprocess.run([sys.executable, "-c", script, str(target)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    data = np.load(target)
    fallbacks = 0
    for i in range(len(data.files) // 2):
        v = data[f"v{i}"]
        keys, payload = v.copy(), np.arange(v.size, dtype=np.int32)
        fallbacks += sv._introsort_pairs(keys, payload)
        np.testing.assert_array_equal(payload, data[f"p{i}"], err_msg=f"case {i}: permutation differs from NumPy")
        np.testing.assert_array_equal(keys, np.sort(v))
    assert fallbacks > 0, "the adversarial inputs did not reach the heapsort fallback"


@pytest.mark.parametrize(
    "volume, spacing, message",
    [
        (np.zeros((4, 4)), (1, 1, 1), "3-D"),
        (np.zeros((4, 4, 4, 2)), (1, 1, 1), "3-D"),
        (np.full((4, 4, 4), np.nan), (1, 1, 1), "NaN"),
        (np.zeros((4, 4, 4), dtype=bool), (1, 1, 1), "real numbers"),
        (np.arange(64.0).reshape(4, 4, 4), (1, 0, 1), "spacing"),
        (np.arange(64.0).reshape(4, 4, 4), (1, 1), "spacing"),
    ],
)
def test_bad_inputs_raise_clear_errors(volume, spacing, message):
    with pytest.raises(ValueError, match=message):
        compute_supervoxels(volume, spacing)


def test_bad_parameters_and_constant_volume():
    vol = np.arange(64.0).reshape(4, 4, 4)
    with pytest.raises(ValueError, match="min_size"):
        felzenszwalb_3d(vol, (1, 1, 1), min_size=0)
    with pytest.raises(ValueError, match="scale"):
        felzenszwalb_3d(vol, (1, 1, 1), scale=-1.0)
    with pytest.raises(ValueError, match="constant"):
        compute_supervoxels(np.full((8, 8, 4), 3.0), (1, 1, 1))


# ----------------------------------------------------------------------------------------------------- files


def _save(path, data, zooms=(1.25, 1.25, 7.7)):
    nii = nib.Nifti1Image(np.asarray(data), np.diag([-zooms[0], zooms[1], zooms[2], 1.0]))
    nii.header.set_zooms(zooms[: np.asarray(data).ndim])
    nib.save(nii, str(path))
    return path


def test_write_supervoxels_files_and_overwrite(tmp_path):
    vol = np.zeros((24, 24, 6), dtype=np.int16)
    vol[2:12, 2:22] = 100
    vol[12:22, 2:22] = 200
    src = tmp_path / "src"
    src.mkdir()
    a = _save(src / "image_7.nii.gz", vol)
    b = _save(src / "case_b.nii.gz", vol[::-1])
    out = tmp_path / "out"
    out.mkdir()
    # what a SIGKILL during an earlier write of image 7's output leaves; another file's temporary is not ours
    (out / ".superpix-MIDDLE_7.nii.gz.k1x2y3z4.nii.gz").write_bytes(b"half a file")
    (out / ".other.nii.gz.abc123.nii.gz").write_bytes(b"someone else's")
    paths = write_supervoxels([a, b], out, min_size=50, progress=False)
    assert [p.name for p in paths] == ["superpix-MIDDLE_7.nii.gz", "superpix-MIDDLE_case_b.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == sorted([".other.nii.gz.abc123.nii.gz", *(p.name for p in paths)])
    nii = nib.load(str(paths[0]))
    assert nii.get_data_dtype() == np.int16
    np.testing.assert_allclose(nii.affine, nib.load(str(a)).affine)
    np.testing.assert_array_equal(np.asarray(nii.dataobj), compute_supervoxels(vol, (1.25, 1.25, 7.7), min_size=50))

    stamp = paths[0].stat().st_mtime_ns
    os.utime(paths[0], ns=(stamp - 10**9, stamp - 10**9))
    write_supervoxels([a], out, min_size=50, progress=False)
    assert paths[0].stat().st_mtime_ns == stamp - 10**9  # kept
    write_supervoxels([a], out, min_size=50, progress=False, overwrite=True)
    assert paths[0].stat().st_mtime_ns != stamp - 10**9  # rewritten


def test_write_supervoxels_errors_name_the_file(tmp_path):
    missing = tmp_path / "image_1.nii.gz"
    with pytest.raises(FileNotFoundError, match="image_1.nii.gz"):
        write_supervoxels([missing], tmp_path / "out", progress=False)
    garbage = tmp_path / "image_2.nii.gz"
    garbage.write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match="image_2.nii.gz"):
        write_supervoxels([garbage], tmp_path / "out", progress=False)
    four_d = _save(tmp_path / "image_3.nii.gz", np.zeros((5, 5, 5, 2), dtype=np.int16), zooms=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="image_3.nii.gz.*3-D"):
        write_supervoxels([four_d], tmp_path / "out", progress=False)
    flat = _save(tmp_path / "image_4.nii.gz", np.full((6, 6, 3), 5, dtype=np.int16))
    with pytest.raises(ValueError, match="image_4.nii.gz.*constant"):
        write_supervoxels([flat], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="same output"):
        write_supervoxels([flat, tmp_path / "other" / "image_4.nii.gz"], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="no image files"):
        write_supervoxels([], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def chaos_case_1(compiled):
    path = chaos_dir() / "image_1.nii.gz"
    nii = nib.load(str(path))
    image = np.asarray(nii.dataobj, dtype=np.float64)
    spacing = sv.header_spacing(nii)
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    ours = compute_supervoxels(image, spacing)
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    reference = np.asarray(nib.load(str(chaos_dir() / "supervoxels_5000" / "superpix-MIDDLE_1.nii.gz")).dataobj)
    return {"image": image, "spacing": spacing, "ours": ours, "ref": reference.astype(np.int64), "cpu": cpu,
            "wall": wall}


@requires_chaos
def test_chaos_header_spacing():
    assert sv.header_spacing(nib.load(str(chaos_dir() / "image_1.nii.gz"))) == (1.25, 1.25, 7.7)


@requires_chaos
def test_chaos_runtime(chaos_case_1):
    # Measured on the 2-core CI machine: about 3.5 s of CPU for this 256x256x37 volume (4-13 s wall clock while other
    # jobs share the cores). CPU time is asserted because wall time depends on the neighbours.
    assert chaos_case_1["cpu"] < 10.0, f"{chaos_case_1['cpu']:.1f} s CPU ({chaos_case_1['wall']:.1f} s wall)"


@requires_chaos
def test_chaos_matches_published_supervoxels(chaos_case_1):
    # Measured over all 20 CHAOS volumes (benchmarks/bench_supervoxels.py): identical supervoxels up to the numbering
    # (count equal, ARI 1.0, foreground Dice 1.0). So we hold the implementation to exactness, and report the figures.
    ours, ref = chaos_case_1["ours"], chaos_case_1["ref"]
    fg_ours, fg_ref = ours > 0, ref > 0
    dice = 2 * (fg_ours & fg_ref).sum() / (fg_ours.sum() + fg_ref.sum())
    assert dice == 1.0
    assert ours.max() == len(np.unique(ref)) - 1 == 22
    assert adjusted_rand_index(ours[fg_ref], ref[fg_ref]) == pytest.approx(1.0)
    np.testing.assert_array_equal(consecutive(ours), consecutive(ref))
    # our ids are the reference ids made consecutive, in the same order
    assert (np.unique(ours) == np.arange(23)).all()


@requires_chaos
def test_chaos_raw_segmentation_respects_min_size(chaos_case_1):
    img255 = sv._rescale_to_255(chaos_case_1["image"])
    raw = felzenszwalb_3d(img255, chaos_case_1["spacing"], min_size=5000)
    assert np.bincount(raw.ravel()).min() >= 5000
    fg = foreground_mask(img255)
    np.testing.assert_array_equal(fg, chaos_case_1["ref"] > 0)
    assert len(np.unique(raw[fg])) == chaos_case_1["ours"].max()
