"""Synthetic abdominal phantoms in the ALPNet/RPT folder layout, for tests, tutorials and smoke runs.

In the spirit of MONAI's ``create_test_image_3d``, but with the four test organs of the few-shot
benchmarks at plausible places, so that the whole pipeline (supervoxels, episodes, Setting 2,
protocol) runs on them exactly as on CHAOS:

* a body (elliptic cylinder) with a bright spine behind the organs;
* liver (1) and spleen (4) high in the abdomen on the patient's right and left; right (2) and left
  (3) kidneys lower and posterior; each an ellipsoid of its own intensity, jittered per volume in
  size and position;
* a smooth multiplicative bias field and Rician-like noise;
* arrays in RAS order (``x`` to the patient's left, ``y`` anterior, ``z`` superior) with the affine
  ``diag(spacing)``, image stored as int16 MR-like values, labels as uint8;
* supervoxels computed with the real :func:`~monai_sdfsmis.data.supervoxels.compute_supervoxels`
  (a small ``min_size`` because the phantoms are small).
"""

from __future__ import annotations

__all__ = ["make_phantom_dataset", "phantom_volume", "PHANTOM_ORGANS"]

import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_sdfsmis.data.layouts import VolumeRecord, find_alpnet_volumes
from monai_sdfsmis.data.supervoxels import compute_supervoxels
from monai_sdfsmis.progress import progress_bar
from monai_sdfsmis.utils import atomic_path, atomic_write

#: Label ids written by the phantom generator (the CHAOS convention).
PHANTOM_ORGANS: dict[int, str] = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}

_PARAMS_FILE = "phantom.json"
_SV_DIR = "supervoxels_5000"

# label id: (centre as fraction of the field of view, semi-axes as fraction of it, mean intensity).
# Fractions are of (H, W, D); x grows to the patient's left, y anteriorly, z superiorly (RAS).
_ORGANS: dict[int, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    1: ((0.34, 0.54, 0.66), (0.19, 0.17, 0.28), 520.0),  # liver: right, high, large
    4: ((0.70, 0.42, 0.64), (0.08, 0.10, 0.18), 760.0),  # spleen: left, posterior, high
    2: ((0.37, 0.33, 0.40), (0.065, 0.075, 0.17), 920.0),  # right kidney: posterior, lower
    3: ((0.63, 0.33, 0.42), (0.065, 0.075, 0.17), 990.0),  # left kidney
}
_BODY_INTENSITY = 300.0
_SPINE_INTENSITY = 640.0


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    return sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, semi)) <= 1.0


def phantom_volume(
    shape: Sequence[int] = (96, 96, 24), seed: int | np.random.SeedSequence = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal volume.

    Parameters
    ----------
    shape
        ``(H, W, D)``; ``D`` is the slice axis.
    seed
        Seed of this volume's jitter, bias field and noise.

    Returns
    -------
    (image, label)
        ``image``: int16 ``[H, W, D]``, 0 outside the body, roughly 250..1100 inside;
        ``label``: uint8 ``[H, W, D]`` with 0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"Phantom shape must be 3 sizes of at least 8 voxels, got {tuple(shape)}.")
    rng = np.random.default_rng(seed)
    h, w, d = (int(s) for s in shape)
    # Normalised coordinates in [0, 1] along each axis (voxel centres).
    grid = np.meshgrid(*[(np.arange(n) + 0.5) / n for n in (h, w, d)], indexing="ij", sparse=True)

    image = np.zeros((h, w, d), dtype=np.float32)
    label = np.zeros((h, w, d), dtype=np.uint8)

    body_c = 0.5 + rng.uniform(-0.02, 0.02, size=2)
    body_s = np.array([0.44, 0.36]) * rng.uniform(0.93, 1.03, size=2)
    body = ((grid[0] - body_c[0]) / body_s[0]) ** 2 + ((grid[1] - body_c[1]) / body_s[1]) ** 2 <= 1.0
    body = np.broadcast_to(body, (h, w, d))
    image[body] = _BODY_INTENSITY

    spine_c = (body_c[0], body_c[1] - 0.72 * body_s[1])
    spine = ((grid[0] - spine_c[0]) / 0.06) ** 2 + ((grid[1] - spine_c[1]) / 0.05) ** 2 <= 1.0
    image[np.broadcast_to(spine, (h, w, d)) & body] = _SPINE_INTENSITY

    for organ_id, (centre, semi, intensity) in _ORGANS.items():
        c = np.asarray(centre) + rng.uniform(-0.03, 0.03, size=3)
        s = np.asarray(semi) * rng.uniform(0.85, 1.15, size=3)
        mask = _ellipsoid(grid, c, s) & body
        label[mask] = organ_id
        # A mild linear intensity gradient inside each organ so that organs are not perfectly flat.
        depth = np.broadcast_to(grid[2], (h, w, d))[mask]
        image[mask] = intensity * (1.0 + 0.05 * (depth - c[2]) / s[2])

    # Smooth multiplicative bias field: random low-order polynomial in the normalised coordinates.
    coeffs = rng.uniform(-0.12, 0.12, size=5)
    x, y, z = (g - 0.5 for g in grid)
    bias = 1.0 + coeffs[0] * x + coeffs[1] * y + coeffs[2] * z + coeffs[3] * x * y + coeffs[4] * (x**2 + y**2)
    image *= bias.astype(np.float32)

    # Rician-like noise: magnitude of a complex signal with Gaussian noise in both channels.
    sigma = 18.0
    real = image + rng.normal(0.0, sigma, size=image.shape)
    imag = rng.normal(0.0, sigma, size=image.shape)
    noisy = np.sqrt(real**2 + imag**2)
    return np.clip(np.rint(noisy), 0, np.iinfo(np.int16).max).astype(np.int16), label


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _must_rewrite(out: Path, params_file: Path, params: dict[str, object]) -> bool:
    """Whether the phantom files in ``out`` must all be (re)written for ``params``.

    ``True`` when ``params_file`` is missing or records other (or unreadable) parameters; a folder holding
    ``image_N`` files but no ``params_file`` is someone else's dataset and is refused rather than overwritten.
    """
    if params_file.exists():
        try:
            previous = json.loads(params_file.read_text())
        except json.JSONDecodeError:
            previous = None
        return previous != params
    if any(out.glob("image_*.nii*")):
        raise ValueError(f"Folder '{out}' already holds image_N files that make_phantom_dataset did not write.")
    return True


def _remove_numbered_beyond(out: Path, sv_dir: Path, n_volumes: int) -> None:
    """Delete the phantom image, label and supervoxel files of ``out`` whose volume number exceeds ``n_volumes``."""
    for path in [*out.glob("image_*.nii.gz"), *out.glob("label_*.nii.gz"), *sv_dir.glob("superpix-MIDDLE_*.nii.gz")]:
        tail = path.name[: -len(".nii.gz")].rsplit("_", 1)[-1]
        if tail.isdigit() and int(tail) > n_volumes:
            path.unlink()


def make_phantom_dataset(
    out_dir: str | PathLike,
    n_volumes: int = 6,
    shape: Sequence[int] = (96, 96, 24),
    spacing: Sequence[float] = (2.5, 2.5, 7.7),
    seed: int = 0,
    min_size: int = 300,
    progress: bool = False,
) -> list[VolumeRecord]:
    """Write ``n_volumes`` synthetic abdominal volumes in the ALPNet layout and return their records.

    Writes ``image_N.nii.gz``, ``label_N.nii.gz`` (N = 1..n_volumes) and
    ``supervoxels_5000/superpix-MIDDLE_N.nii.gz`` (the folder name the loaders expect, even though
    ``min_size`` here is smaller than 5000), plus ``phantom.json`` with the parameters. Each file is
    written atomically. Calling again with the same parameters only writes the files that are
    missing; with different parameters the phantom files are rewritten.

    Parameters
    ----------
    out_dir
        Target folder (created). It must be empty of other datasets.
    n_volumes
        Number of volumes.
    shape
        ``(H, W, D)`` of each volume.
    spacing
        Voxel size in mm (CHAOS-like anisotropy by default).
    seed
        Base seed; volume ``N`` uses ``(seed, N)``.
    min_size
        Supervoxel ``min_size`` in voxels (the reference 5000 is too large for small phantoms).
    progress
        Show a progress bar.

    Returns
    -------
    list[VolumeRecord]
        The volumes, in numeric order, with labels and supervoxels.
    """
    if int(n_volumes) < 1:
        raise ValueError(f"n_volumes must be at least 1, got {n_volumes}.")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive sizes in mm, got {tuple(spacing)}.")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    sv_dir = out / _SV_DIR
    sv_dir.mkdir(exist_ok=True)
    params = {
        "n_volumes": int(n_volumes),
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "seed": int(seed),
        "min_size": int(min_size),
    }
    params_file = out / _PARAMS_FILE
    rewrite = _must_rewrite(out, params_file, params)

    affine = np.diag([*params["spacing"], 1.0])
    for number in progress_bar(range(1, params["n_volumes"] + 1), desc="phantoms", unit="vol", disable=not progress):
        paths = (out / f"image_{number}.nii.gz", out / f"label_{number}.nii.gz", sv_dir / f"superpix-MIDDLE_{number}.nii.gz")
        if not rewrite and all(p.exists() for p in paths):
            continue
        image, label = phantom_volume(params["shape"], seed=np.random.SeedSequence([params["seed"], number]))
        if rewrite or not paths[0].exists():
            _write_nifti(image, affine, paths[0])
        if rewrite or not paths[1].exists():
            _write_nifti(label, affine, paths[1])
        if rewrite or not paths[2].exists():
            sv = compute_supervoxels(image.astype(np.float32), params["spacing"], min_size=params["min_size"])
            _write_nifti(np.asarray(sv).astype(np.int32), affine, paths[2])

    if rewrite:
        # Phantom files of an earlier, larger run would otherwise join the dataset.
        _remove_numbered_beyond(out, sv_dir, params["n_volumes"])
        atomic_write(params_file, json.dumps(params, indent=2))
    return find_alpnet_volumes(out, supervoxel_dir=_SV_DIR, require_labels=True, require_supervoxels=True)
