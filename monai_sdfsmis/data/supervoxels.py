"""3-D Felzenszwalb supervoxels used as self-supervised pseudo-labels (ADNet/RPT's ``generate_supervoxels.py``).

The published ``supervoxels_5000`` maps of ADNet/RPT were made by a 3-D extension of scikit-image's Felzenszwalb graph
segmentation. This module re-implements that algorithm so that it reproduces those maps voxel for voxel:

* the volume is rescaled to [0, 255] by its own min/max, ``scale = 1`` (divided by 255 as in scikit-image), no
  smoothing, ``min_size = 5000`` voxels enforced by a post-pass;
* the graph has 13 edge directions (half of the 26-neighbourhood); an edge costs ``|intensity difference| * sqrt(w)``
  with ``s = spacing_z / spacing_x`` and ``w = 1`` in-plane, ``s**2`` along z, ``(1 + s**2) / 2`` for z plus one
  in-plane axis and ``(2 + s**2) / 3`` for z plus both;
* edges are visited in the order of NumPy's classic ``argsort`` (its introsort, used before NumPy switched to SIMD
  sorts on x86). Edge costs of integer-valued volumes are full of exact ties (about 10^4 distinct costs for 3*10^7
  edges on CHAOS), and the greedy merge depends on the order in which tied edges come: a stable or SIMD tie order
  gives a different, equally valid segmentation (ARI 0.75-0.82 against the published maps on volumes 1 and 2);
  this one reproduces them exactly on all 20 CHAOS T2-SPIR volumes (``benchmarks/bench_supervoxels.py``);
* the reference compares an edge with the components' internal cost stored in single precision, which decides
  near-ties, so we do the same;
* background removal: per axial slice, ``image > 10`` (on the 0..255 volume), largest 8-connected component, holes
  filled; supervoxels outside the mask become 0.

Arrays are in nibabel / MONAI order ``[H, W, D] = (x, y, z)``; slices run along the last axis. The kernels work on the
transposed ``(z, y, x)`` array the reference code saw (SimpleITK order), so the voxel and edge numbering, and thus the
visiting order of tied edges, are the reference's.
"""

from __future__ import annotations

__all__ = ["felzenszwalb_3d", "foreground_mask", "compute_supervoxels", "write_supervoxels", "ensure_supervoxels", "header_spacing"]

import os
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from monai_sdfsmis.extras import numba_njit as njit  # numba is the [supervoxels] extra
from monai_sdfsmis.progress import progress_bar
from monai_sdfsmis.utils import atomic_path

# Edge directions as (dz, dy, dx) in (z, y, x) array order, in the reference's edge order: the edge joins voxel
# ``p + offset`` ("first") and ``p`` ("second"). Negative in-plane steps cover the other half of the diagonals.
_OFFSETS = np.array(
    [
        (0, 1, 0),
        (0, 1, 1),
        (0, 0, 1),
        (0, 1, -1),
        (1, 1, 0),
        (1, 1, 1),
        (1, 0, 1),
        (1, -1, 0),
        (1, -1, -1),
        (1, 0, -1),
        (1, 1, -1),
        (1, -1, 1),
        (1, 0, 0),
    ],
    dtype=np.int64,
)
_N_DIRECTIONS = len(_OFFSETS)
_DIRECTION_BITS = 4  # payload = node << 4 | direction


def _direction_weights(spacing_ratio: float) -> np.ndarray:
    """Squared-length weights ``w`` of the 13 directions for ``s = spacing_z / spacing_x`` (float64, [13]).

    The expressions follow the reference's arithmetic literally (``(sqrt(1 + s^2) / sqrt(2))^2`` rather than the
    algebraically equal ``(1 + s^2) / 2``) because their last bits decide ties between directions.
    """
    s = float(spacing_ratio)
    w_plane, w_z = 1.0, s**2
    w_z1 = (np.sqrt(1 + s**2) / np.sqrt(2)) ** 2
    w_z2 = (np.sqrt(2 + s**2) / np.sqrt(3)) ** 2
    weights = np.empty(_N_DIRECTIONS, dtype=np.float64)
    for k, (dz, dy, dx) in enumerate(_OFFSETS):
        n_plane = int(dy != 0) + int(dx != 0)
        weights[k] = w_plane if dz == 0 else (w_z, w_z1, w_z2)[n_plane]
    return weights


@njit(cache=True)
def _build_edges(img, offsets, weights, payload_dtype_probe):
    """Edge costs ``[E]`` float64 and payloads ``[E]`` (``second_node << 4 | direction``) in the reference order."""
    n0, n1, n2 = img.shape
    n_edges = 0
    for k in range(offsets.shape[0]):
        n_edges += (n0 - abs(offsets[k, 0])) * (n1 - abs(offsets[k, 1])) * (n2 - abs(offsets[k, 2]))
    costs = np.empty(n_edges, dtype=np.float64)
    payload = np.empty(n_edges, dtype=payload_dtype_probe.dtype)
    flat = img.ravel()
    e = 0
    for k in range(offsets.shape[0]):
        o0, o1, o2 = offsets[k, 0], offsets[k, 1], offsets[k, 2]
        delta = (o0 * n1 + o1) * n2 + o2
        w = weights[k]
        # the "second" voxel runs over the box whose shift by the offset stays inside the volume
        y_lo = 1 if o1 < 0 else 0
        x_lo = 1 if o2 < 0 else 0
        for z in range(n0 - o0):
            for y in range(y_lo, n1 - (1 if o1 > 0 else 0)):
                base = (z * n1 + y) * n2
                for x in range(x_lo, n2 - (1 if o2 > 0 else 0)):
                    second = base + x
                    d = flat[second + delta] - flat[second]
                    costs[e] = np.sqrt(w * (d * d))
                    payload[e] = (second << 4) | k
                    e += 1
    return costs, payload


@njit(cache=True)
def _sift_down(keys, payload, base, i, n, key, item):
    """Heap sift of (key, item) from 1-based position ``i`` in a heap of size ``n`` stored at ``base + 1``."""
    j = i << 1
    while j <= n:
        if j < n and keys[base + j] < keys[base + j + 1]:
            j += 1
        if key < keys[base + j]:
            keys[base + i] = keys[base + j]
            payload[base + i] = payload[base + j]
            i = j
            j += j
        else:
            break
    keys[base + i] = key
    payload[base + i] = item


@njit(cache=True)
def _heapsort_pairs(keys, payload, lo, n):
    """Heapsort of ``keys[lo:lo+n]`` carrying ``payload``; introsort's fallback for degenerate partitions."""
    base = lo - 1
    start = n >> 1
    while start > 0:
        _sift_down(keys, payload, base, start, n, keys[base + start], payload[base + start])
        start -= 1
    while n > 1:
        key, item = keys[base + n], payload[base + n]
        keys[base + n] = keys[base + 1]
        payload[base + n] = payload[base + 1]
        n -= 1
        _sift_down(keys, payload, base, 1, n, key, item)


@njit(cache=True)
def _swap(keys, payload, i, j):
    keys[i], keys[j] = keys[j], keys[i]
    payload[i], payload[j] = payload[j], payload[i]


@njit(cache=True)
def _introsort_pairs(keys, payload):
    """Sort ``keys`` ascending in place, permuting ``payload`` alongside.

    The permutation equals that of NumPy's classic ``argsort(kind="quicksort")``: median-of-three Hoare partitioning
    that stops on equal keys, the larger side deferred, insertion sort below 17 elements, heapsort once the depth
    budget ``2 * floor(log2(n))`` is spent. Ties therefore come out in the order the reference saw them.
    Returns the number of heapsort fallbacks (0 unless the input defeats median-of-three pivoting).
    """
    n = keys.size
    n_heapsorts = 0
    if n < 2:
        return n_heapsorts
    stack_lo = np.empty(128, dtype=np.int64)
    stack_hi = np.empty(128, dtype=np.int64)
    stack_depth = np.empty(128, dtype=np.int64)
    top = 0
    msb = 0
    m = n
    while m > 1:
        m >>= 1
        msb += 1
    depth = 2 * msb
    lo, hi = 0, n - 1
    while True:
        if depth < 0:
            _heapsort_pairs(keys, payload, lo, hi - lo + 1)
            n_heapsorts += 1
        else:
            while hi - lo > 15:
                mid = lo + ((hi - lo) >> 1)
                if keys[mid] < keys[lo]:
                    _swap(keys, payload, mid, lo)
                if keys[hi] < keys[mid]:
                    _swap(keys, payload, hi, mid)
                if keys[mid] < keys[lo]:
                    _swap(keys, payload, mid, lo)
                pivot = keys[mid]
                i, j = lo, hi - 1
                _swap(keys, payload, mid, j)
                while True:
                    i += 1
                    while keys[i] < pivot:
                        i += 1
                    j -= 1
                    while pivot < keys[j]:
                        j -= 1
                    if i >= j:
                        break
                    _swap(keys, payload, i, j)
                _swap(keys, payload, i, hi - 1)
                depth -= 1
                if i - lo < hi - i:
                    stack_lo[top], stack_hi[top] = i + 1, hi
                    hi = i - 1
                else:
                    stack_lo[top], stack_hi[top] = lo, i - 1
                    lo = i + 1
                stack_depth[top] = depth
                top += 1
            for i in range(lo + 1, hi + 1):
                key, item = keys[i], payload[i]
                j = i
                while j > lo and key < keys[j - 1]:
                    keys[j] = keys[j - 1]
                    payload[j] = payload[j - 1]
                    j -= 1
                keys[j] = key
                payload[j] = item
        if top == 0:
            break
        top -= 1
        lo, hi, depth = stack_lo[top], stack_hi[top], stack_depth[top]
    return n_heapsorts


@njit(cache=True)
def _find(parent, node):
    root = node
    while parent[root] != root:
        root = parent[root]
    while parent[node] != root:  # path compression keeps later look-ups short
        nxt = parent[node]
        parent[node] = root
        node = nxt
    return root


@njit(cache=True)
def _merge_components(costs, payload, deltas, n_nodes, scale, min_size):
    """Greedy Felzenszwalb merge over cost-sorted edges, then the ``min_size`` post-pass.

    Returns labels ``[n_nodes]`` int32, numbered 0..K-1 in order of each component's first voxel.
    """
    parent = np.arange(n_nodes).astype(payload.dtype)
    size = np.ones(n_nodes, dtype=np.int64)
    internal = np.zeros(n_nodes, dtype=np.float64)
    for e in range(costs.size):
        item = payload[e]
        b = item >> 4
        a = b + deltas[item & 15]
        ra = _find(parent, a)
        rb = _find(parent, b)
        if ra == rb:
            continue
        # the reference keeps the thresholds in single precision, which decides near-ties
        ta = np.float32(internal[ra] + scale / size[ra])
        tb = np.float32(internal[rb] + scale / size[rb])
        if costs[e] < min(ta, tb):
            keep, gone = (ra, rb) if ra < rb else (rb, ra)
            parent[gone] = keep
            size[keep] += size[gone]
            internal[keep] = costs[e]

    n_small = 0
    for i in range(n_nodes):
        if parent[i] == i and size[i] < min_size:
            n_small += 1
    for e in range(costs.size):
        if n_small == 0:  # components only grow, so nothing more can merge
            break
        item = payload[e]
        b = item >> 4
        a = b + deltas[item & 15]
        ra = _find(parent, a)
        rb = _find(parent, b)
        if ra == rb:
            continue
        small_a, small_b = size[ra] < min_size, size[rb] < min_size
        if small_a or small_b:
            keep, gone = (ra, rb) if ra < rb else (rb, ra)
            parent[gone] = keep
            size[keep] += size[gone]
            n_small -= int(small_a) + int(small_b) - int(size[keep] < min_size)

    labels = np.empty(n_nodes, dtype=np.int32)
    count = 0
    for i in range(n_nodes):
        root = _find(parent, i)
        if root == i:  # roots are the smallest index of their component
            labels[i] = count
            count += 1
        else:
            labels[i] = labels[root]
    return labels


def _check_volume(volume: np.ndarray, name: str = "volume") -> np.ndarray:
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D array [H, W, D], got shape {arr.shape}.")
    if min(arr.shape) < 1:
        raise ValueError(f"{name} is empty (shape {arr.shape}).")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return arr


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive numbers (sx, sy, sz) in mm, got {tuple(spacing)}.")
    return values  # type: ignore[return-value]


def felzenszwalb_3d(
    volume: np.ndarray, spacing: Sequence[float], scale: float = 1.0, min_size: int = 5000
) -> np.ndarray:
    """Anisotropic 3-D Felzenszwalb graph segmentation (ADNet/RPT variant, no smoothing).

    Parameters
    ----------
    volume
        ``[H, W, D]`` real array ``(x, y, z)``; intensities are used as given (the reference passes the volume
        rescaled to [0, 255], see :func:`compute_supervoxels`).
    spacing
        voxel size ``(sx, sy, sz)``; only ``sz / sx`` matters (in-plane spacing is assumed isotropic).
    scale
        observation level ``k`` of Felzenszwalb & Huttenlocher, divided by 255 as in scikit-image.
    min_size
        minimum component size in voxels, enforced by merging along the cheapest edges afterwards.

    Returns
    -------
    np.ndarray
        ``[H, W, D]`` int32 labels ``0..K-1`` (0 is a segment like any other), numbered in order of each segment's
        first voxel in ``(z, y, x)`` raster order, as in the reference.

    Notes
    -----
    Memory: 13 edges per voxel at 12 bytes each (about 0.45 GB for 256 x 256 x 37). Time: about 3.5 s for such a
    volume on one core, mostly the sort and the union-find passes.
    """
    arr = _check_volume(volume)
    sx, _, sz = _check_spacing(spacing)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale}.")
    if int(min_size) != min_size or min_size < 1:
        raise ValueError(f"min_size must be a positive integer, got {min_size}.")

    img = np.ascontiguousarray(arr.transpose(2, 1, 0), dtype=np.float64)  # (z, y, x) as the reference saw it
    n0, n1, n2 = img.shape
    n_nodes = img.size
    # the payload packs the voxel index and the direction; 32 bits are enough for volumes below 2**27 voxels
    probe = np.zeros(1, dtype=np.int32 if n_nodes < 2**27 else np.int64)
    costs, payload = _build_edges(img, _OFFSETS, _direction_weights(sz / sx), probe)
    _introsort_pairs(costs, payload)
    deltas = ((_OFFSETS[:, 0] * n1 + _OFFSETS[:, 1]) * n2 + _OFFSETS[:, 2]).astype(probe.dtype)
    deltas = np.concatenate([deltas, np.zeros(16 - _N_DIRECTIONS, dtype=probe.dtype)])
    labels = _merge_components(costs, payload, deltas, n_nodes, float(scale) / 255.0, int(min_size))
    return np.ascontiguousarray(labels.reshape(n0, n1, n2).transpose(2, 1, 0))


def foreground_mask(volume255: np.ndarray, threshold: float = 10.0) -> np.ndarray:
    """Body mask of a [0, 255]-scaled volume, slice by slice along the last axis.

    Per slice: ``volume255 > threshold``, largest 8-connected component, holes filled (4-connected), as in the
    ADNet/RPT supervoxel script. A slice with nothing above the threshold stays empty.

    Parameters
    ----------
    volume255
        ``[H, W, D]`` array, intensities on the 0..255 scale.
    threshold
        intensity above which a voxel is foreground.

    Returns
    -------
    np.ndarray
        ``[H, W, D]`` bool mask.
    """
    arr = _check_volume(volume255, "volume255")
    mask = np.zeros(arr.shape, dtype=bool)
    eight = np.ones((3, 3), dtype=bool)
    for z in range(arr.shape[2]):
        # label the (y, x) slice the reference saw, so ties between equally large components resolve the same way
        above = arr[:, :, z].T > threshold
        if not above.any():
            continue
        components, _ = ndi.label(above, structure=eight)
        largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
        mask[:, :, z] = ndi.binary_fill_holes(components == largest).T
    return mask


def _rescale_to_255(image: np.ndarray) -> np.ndarray:
    arr = image.astype(np.float64, copy=False)
    low, high = arr.min(), arr.max()
    if high <= low:
        raise ValueError(f"volume is constant (all voxels equal {low}); it cannot be segmented into supervoxels.")
    return 255 * (arr - low) / (high - low)  # same operation order as the reference, for bit-equal costs


def compute_supervoxels(
    image: np.ndarray, spacing: Sequence[float], min_size: int = 5000, fg_threshold: float = 10.0
) -> np.ndarray:
    """Supervoxel pseudo-labels of one volume, background removed (as ADNet/RPT).

    Parameters
    ----------
    image
        ``[H, W, D]`` intensity volume ``(x, y, z)`` (any real dtype; rescaled internally to [0, 255]).
    spacing
        voxel size ``(sx, sy, sz)`` in mm.
    min_size
        minimum supervoxel size in voxels before background removal (5000 for Abd-CT/MRI, 1000 for cardiac).
    fg_threshold
        body-mask threshold on the 0..255 scale.

    Returns
    -------
    np.ndarray
        ``[H, W, D]`` int32, 0 = background, supervoxels numbered consecutively ``1..K`` in the order of the
        underlying segmentation.
    """
    arr = _check_volume(image, "image")
    img255 = _rescale_to_255(arr)
    segments = felzenszwalb_3d(img255, spacing, scale=1.0, min_size=min_size)
    fg = foreground_mask(img255, fg_threshold)
    # segment 0 becomes K (as in the reference) so that it survives, then ids are made consecutive
    segments = np.where(segments == 0, segments.max() + 1, segments)
    segments[~fg] = 0
    present = np.zeros(int(segments.max()) + 1, dtype=bool)
    present[segments.ravel()] = True
    present[0] = False
    new_ids = np.zeros(present.size, dtype=np.int32)
    new_ids[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return new_ids[segments]


_INDEX_RE = re.compile(r"^image_(\d+)$")


def _output_name(image_path: Path) -> str:
    stem = image_path.name
    for suffix in (".nii.gz", ".nii"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    match = _INDEX_RE.match(stem)
    return f"superpix-MIDDLE_{match.group(1) if match else stem}.nii.gz"


def header_spacing(img: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel size (mm) of a NIfTI header as ITK reports it: each float32 zoom as its shortest round-trip decimal."""
    # The header stores float32; ITK (used by the reference) reports it as the shortest decimal that round-trips,
    # e.g. 7.7 rather than 7.69999980926..., and that decides near-ties between z and in-plane edges.
    zooms = img.header.get_zooms()[:3]
    return tuple(float(np.format_float_positional(np.float32(z))) for z in zooms)  # type: ignore[return-value]


def _check_image_path(path: Path) -> None:
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder (a DICOM series?); supervoxels reads NIfTI files (.nii/.nii.gz) only, convert it first"
        )
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")


def _os_error(what: str, path: Path, err: OSError) -> ValueError:
    cause = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
    return ValueError(f"cannot {what} {path}: {cause}{where}")


def _load_image(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    _check_image_path(path)
    try:
        nii = nib.load(str(path))
        data = np.asarray(nii.dataobj, dtype=np.float64)
    except Exception as err:  # nibabel raises several unrelated types for corrupt files
        raise ValueError(f"cannot read {path} as NIfTI: {err}") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}.")
    return data, nii.affine, header_spacing(nii)


def _atomic_save(labels: np.ndarray, affine: np.ndarray, out_path: Path) -> None:
    """Publish ``out_path`` only once it reads back whole; a killed earlier write's temporaries are removed first."""
    from monai_sdfsmis.transforms.io import check_written_volume

    nii = nib.Nifti1Image(labels.astype(np.int16), affine)
    nii.set_data_dtype(np.int16)
    try:
        with atomic_path(out_path) as tmp:
            nib.save(nii, str(tmp))
            check_written_volume(tmp, labels.shape, name=out_path)
    except OSError as err:
        raise _os_error("write", out_path, err) from err


def write_supervoxels(
    image_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    min_size: int = 5000,
    progress: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Compute and save supervoxels for NIfTI volumes, one ``superpix-MIDDLE_{N}.nii.gz`` per image.

    ``N`` is taken from ``image_{N}.nii.gz``; other names keep their stem. Spacing comes from the header, the output
    has the image's affine and int16 labels (0 = background), and is written atomically. Existing outputs are skipped
    unless ``overwrite``.

    Parameters
    ----------
    image_paths
        NIfTI files, each a 3-D volume ``[H, W, D]``.
    out_dir
        destination folder, created if missing.
    min_size
        minimum supervoxel size in voxels.
    progress
        show a tqdm bar over volumes.
    overwrite
        recompute files that already exist.

    Returns
    -------
    list[Path]
        output paths, in the order of ``image_paths``.
    """
    if isinstance(image_paths, (str, os.PathLike)):
        raise ValueError(f"image_paths must be a list of files, got the single path {image_paths!r}.")
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("no image files given to write_supervoxels.")
    if int(min_size) != min_size or min_size < 1:
        raise ValueError(f"min_size must be a positive integer, got {min_size}.")
    out_names = [_output_name(p) for p in paths]
    duplicates = sorted({n for n in out_names if out_names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several images map to the same output file(s): {', '.join(duplicates)}")
    for p in paths:
        _check_image_path(p)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot write supervoxels to {out}: it is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _os_error("create the output folder", out, err) from err

    written = []
    with progress_bar(total=len(paths), desc="supervoxels", unit="vol", disable=not progress) as bar:
        for path, name in zip(paths, out_names):
            target = out / name
            if overwrite or not target.exists():
                data, affine, spacing = _load_image(path)
                try:
                    labels = compute_supervoxels(data, spacing, min_size=min_size)
                except ValueError as err:
                    raise ValueError(f"{path}: {err}") from err
                if labels.max() > np.iinfo(np.int16).max:
                    raise ValueError(f"{path}: {labels.max()} supervoxels do not fit int16; raise min_size.")
                _atomic_save(labels, affine, target)
            written.append(target)
            bar.update()
    return written


def ensure_supervoxels(
    dataset_dir: str | os.PathLike, supervoxel_dir: str = "supervoxels_5000", min_size: int = 5000, progress: bool = True
) -> str:
    """Compute the supervoxels of every ``image_N`` of an ALPNet-layout folder that has none yet; returns ``supervoxel_dir``.

    Training on a user's own scans then needs no separate ``supervoxels`` command. Existing files are kept (the
    published CHAOS/SABS supervoxels, or an earlier run's), so a dataset that has them all is only listed.

    Parameters
    ----------
    dataset_dir
        Folder of ``image_N.nii.gz`` (and optionally labels).
    supervoxel_dir
        Sub-folder (or absolute folder) of ``superpix-MIDDLE_N.nii.gz`` files.
    min_size
        Felzenszwalb minimum supervoxel size in voxels, for the volumes computed here.
    progress
        Progress over the volumes computed.
    """
    from monai_sdfsmis.data.layouts import find_alpnet_volumes

    folder = Path(dataset_dir).expanduser()
    images = [Path(r.image) for r in find_alpnet_volumes(folder, supervoxel_dir=None)]
    out = Path(supervoxel_dir) if Path(supervoxel_dir).is_absolute() else folder / supervoxel_dir
    missing = [p for p in images if not (out / _output_name(p)).is_file()]
    if missing:
        print(f"supervoxels: computing {len(missing)} of {len(images)} volumes into {out} (min_size {min_size})", flush=True)
        try:
            write_supervoxels(missing, out, min_size=min_size, progress=progress)
        except PermissionError as err:
            raise ValueError(
                f"{out}: cannot write supervoxels there ({err.strerror}); compute them elsewhere with "
                "python -m monai_sdfsmis supervoxels --out_dir DIR and set supervoxel_dir to DIR"
            ) from err
    return str(supervoxel_dir)
