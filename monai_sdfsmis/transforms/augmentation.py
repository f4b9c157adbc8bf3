"""RPT's episode augmentation on 2D slices (gamma; affine + elastic), by default on support and query independently.

The transforms take dictionaries of slices: images ``[C, H, W]`` (float) and masks ``[1, H, W]`` (``{0, 1}``).
Geometry is drawn once per call and applied identically to every key, so an image and its mask stay aligned.
As in RPT, masks are warped with the image's (bilinear) interpolation and then rounded (``np.rint``-like,
half up), which keeps binary masks binary. Augmentation is a training-time operation and is not invertible;
it does not record anything in a MetaTensor's ``applied_operations``.
"""

from __future__ import annotations

__all__ = [
    "rpt_affine_matrix",
    "rpt_elastic_displacement",
    "RandRPTAffined",
    "RandRPTAffineD",
    "RandRPTAffineDict",
    "RandRPTElasticd",
    "RandRPTElasticD",
    "RandRPTElasticDict",
    "RPTAugmentd",
    "RPTAugmentD",
    "RPTAugmentDict",
]

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandAdjustContrastd, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple, ensure_tuple_rep
from scipy.ndimage import gaussian_filter, map_coordinates

_GRID_MODES = ("bilinear", "nearest", "bicubic")
_GRID_PADDINGS = ("border", "zeros", "reflection")


def rpt_affine_matrix(
    rotate_deg: float = 0.0,
    translate_px: Sequence[float] = (0.0, 0.0),
    shear_deg: float = 0.0,
    zoom: float = 1.0,
) -> np.ndarray:
    """Forward 3x3 affine of RPT's ``RandomAffine`` in centred (row, column) pixel coordinates.

    ``M = Zoom @ Shear @ Translate @ Rotate`` maps an input position to its output position:
    rotation by ``rotate_deg`` (counter-clockwise on screen for positive angles, as ``cv2.getRotationMatrix2D``),
    translation by ``translate_px = (rows, columns)`` pixels, RPT's shear ``[[1, -sin a], [0, cos a]]`` in
    (x, y) = (column, row) order, and an isotropic zoom (> 1 enlarges). Rotation and zoom are about the image
    centre as in RPT; the shear is also taken about the centre here (RPT applies it about the top-left corner,
    which adds up to ``H/2 * sin(5 deg)`` ~ 11 px of extra horizontal shift for a 256 image).

    Returns
    -------
    np.ndarray
        ``[3, 3]`` float64 matrix acting on homogeneous ``(row, column, 1)`` offsets from the centre.
    """
    a = np.deg2rad(float(rotate_deg))
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    t_row, t_col = (float(v) for v in translate_px)
    trans = np.array([[1.0, 0.0, t_row], [0.0, 1.0, t_col], [0.0, 0.0, 1.0]])
    s = np.deg2rad(float(shear_deg))
    shear = np.array([[np.cos(s), 0.0, 0.0], [-np.sin(s), 1.0, 0.0], [0.0, 0.0, 1.0]])
    scale = np.diag([float(zoom), float(zoom), 1.0])
    return scale @ shear @ trans @ rot


def rpt_elastic_displacement(
    shape: Sequence[int], alpha: float, sigma: float, rng: np.random.RandomState
) -> np.ndarray:
    """RPT's elastic displacement field (``elastic_transform_nd``).

    Per axis, uniform noise in [-1, 1] is smoothed by a Gaussian of ``sigma`` pixels with the support of RPT's
    ``cv2.GaussianBlur`` (kernel ``int(4 sigma) | 1``, reflect-101 border) and multiplied by ``alpha`` pixels.

    Parameters
    ----------
    shape
        ``(H, W)``.
    alpha, sigma
        Magnitude and smoothness in pixels.
    rng
        Source of the noise.

    Returns
    -------
    np.ndarray
        ``[2, H, W]`` float32 displacement (rows, columns) in pixels.
    """
    h, w = (int(v) for v in shape)
    radius = (int(4 * sigma) | 1) // 2
    truncate = radius / sigma if sigma > 0 else 0.0
    fields = []
    for _ in range(2):
        noise = rng.rand(h, w) * 2.0 - 1.0
        if sigma > 0:
            noise = gaussian_filter(noise, sigma, mode="mirror", truncate=truncate)
        fields.append(noise * alpha)
    return np.stack(fields).astype(np.float32)


def _label_keys(keys: Sequence[Hashable], label_keys: KeysCollection | None) -> tuple[Hashable, ...]:
    """Keys treated as masks: those named ``*label*`` unless given explicitly."""
    if label_keys is None:
        return tuple(k for k in keys if "label" in str(k))
    return ensure_tuple(label_keys)


def _check_slices(d: Mapping[Hashable, Any], keys: Sequence[Hashable], who: str) -> tuple[int, int] | None:
    """Return the common (H, W) of the ``[C, H, W]`` slices under ``keys``; raise ``ValueError`` otherwise."""
    shapes = {key: tuple(d[key].shape) for key in keys}
    for key, shape in shapes.items():
        if len(shape) != 3:
            raise ValueError(f"{who}: key {key!r} must hold a [C, H, W] slice, got shape {shape}")
    sizes = {key: shape[1:] for key, shape in shapes.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{who}: the slices must share one in-plane size, got {sizes}")
    size = next(iter(sizes.values()), None)
    return size  # type: ignore[return-value]


def _sampling_grid(inverse: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """``grid_sample`` grid ``[1, H, W, 2]`` for an output->input matrix in centred (row, column) pixels.

    Same convention as ``monai.transforms.Affine(affine=inverse)`` (tested against it); built with
    ``torch.nn.functional.affine_grid`` because MONAI's float64 homogeneous grid is several times slower on CPU,
    which matters for an augmentation run on every training episode.
    """
    h, w = (int(v) for v in size)
    # Centred pixel offsets c map to align_corners=False normalised coordinates as 2c/n; theta is in (x, y) order.
    to_norm = np.diag([2.0 / h, 2.0 / w])
    lin = to_norm @ inverse[:2, :2] @ np.linalg.inv(to_norm)
    shift = to_norm @ inverse[:2, 2]
    theta = np.array([[lin[1, 1], lin[1, 0], shift[1]], [lin[0, 1], lin[0, 0], shift[0]]])
    return F.affine_grid(torch.as_tensor(theta, dtype=torch.float32)[None], [1, 1, h, w], align_corners=False)


def _finish(out: torch.Tensor, src: NdarrayOrTensor, is_label: bool) -> NdarrayOrTensor:
    """Round masks half up (RPT's rint) and return in the input's type; masks keep their dtype."""
    if is_label:
        out = torch.floor(out + 0.5)
        return convert_to_dst_type(out, src)[0]
    return convert_to_dst_type(out, src, dtype=torch.float32)[0]


class RandRPTAffined(RandomizableTransform, MapTransform):
    """RPT's random affine (rotation, translation, shear, isotropic zoom), one draw applied to every key.

    The matrix is :func:`rpt_affine_matrix` of ``rotate ~ U(-rotate_deg, rotate_deg)``,
    ``translate ~ U(-translate_px, translate_px)`` per axis, ``shear ~ U(-shear_deg, shear_deg)`` and
    ``zoom ~ U(*zoom)``; its inverse (output to input pixels) is applied with ``grid_sample`` in the convention of
    ``monai.transforms.Affine(affine=inverse)``.

    Parameters
    ----------
    keys
        Keys of ``[C, H, W]`` slices sharing one in-plane size (image and mask).
    prob
        Probability of applying it.
    rotate_deg, shear_deg
        Maximum absolute angles in degrees.
    translate_px
        Maximum absolute translation in pixels, one value or ``(rows, columns)``.
    zoom
        ``(low, high)`` range of the isotropic zoom factor.
    mode
        Interpolation per key (MONAI/``grid_sample`` modes). RPT warps masks bilinearly too and rounds them.
    padding_mode
        Per key: ``"border"`` (default), ``"zeros"`` or ``"reflection"``. RPT pads with 0, which for images in
        [-1, 1] is mid-grey rather than background; ``"border"`` repeats the (background) edge instead.
    label_keys
        Keys holding masks, rounded half up after warping; ``None`` means the keys whose name contains ``"label"``.
    allow_missing_keys
        Skip keys that are absent.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        rotate_deg: float = 5.0,
        translate_px: float | Sequence[float] = 5.0,
        shear_deg: float = 5.0,
        zoom: Sequence[float] = (0.9, 1.2),
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "border",
        label_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.rotate_deg = abs(float(rotate_deg))
        self.translate_px = tuple(abs(float(t)) for t in ensure_tuple_rep(translate_px, 2))
        self.shear_deg = abs(float(shear_deg))
        z_lo, z_hi = (float(z) for z in zoom)
        if not 0 < z_lo <= z_hi:
            raise ValueError(f"zoom must satisfy 0 < low <= high, got {tuple(zoom)}")
        self.zoom = (z_lo, z_hi)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        for name, values, allowed in (
            ("mode", self.mode, _GRID_MODES),
            ("padding_mode", self.padding_mode, _GRID_PADDINGS),
        ):
            if any(v not in allowed for v in values):
                raise ValueError(f"{name} must be one of {allowed} per key, got {values}")
        self.label_keys = _label_keys(self.keys, label_keys)
        self.matrix = np.eye(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        # Drawn in RPT's order: rotation, translation (x then y), shear, zoom.
        rot = self.R.uniform(-self.rotate_deg, self.rotate_deg)
        t_col = self.R.uniform(-self.translate_px[1], self.translate_px[1])
        t_row = self.R.uniform(-self.translate_px[0], self.translate_px[0])
        shear = self.R.uniform(-self.shear_deg, self.shear_deg)
        zoom = self.R.uniform(*self.zoom)
        self.matrix = rpt_affine_matrix(rot, (t_row, t_col), shear, zoom)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor], randomize: bool = True) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        size = _check_slices(d, keys, type(self).__name__)
        if randomize:
            self.randomize()
        if not self._do_transform or not keys:
            return d
        grid = _sampling_grid(np.linalg.inv(self.matrix), size)
        for key, mode, pad in self.key_iterator(d, self.mode, self.padding_mode):
            src = d[key]
            img = convert_to_tensor(src, dtype=torch.float32, track_meta=False)
            out = F.grid_sample(img[None], grid.to(img.device), mode=mode, padding_mode=pad, align_corners=False)[0]
            d[key] = _finish(out, src, key in self.label_keys)
        return d


class RandRPTElasticd(RandomizableTransform, MapTransform):
    """RPT's elastic deformation: one :func:`rpt_elastic_displacement` field applied to every key.

    Each channel is resampled at ``grid + displacement`` with ``scipy.ndimage.map_coordinates`` (order 1,
    ``reflect`` border), as RPT's ``elastic_transform_nd``; masks are rounded half up afterwards.
    With RPT's ``alpha=10, sigma=5`` the displacements are small (typically well below one pixel).

    Parameters
    ----------
    keys
        Keys of ``[C, H, W]`` slices sharing one in-plane size.
    prob
        Probability of applying it.
    alpha
        Field magnitude in pixels.
    sigma
        Gaussian smoothing of the field in pixels.
    label_keys
        Keys holding masks; ``None`` means the keys whose name contains ``"label"``.
    allow_missing_keys
        Skip keys that are absent.
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        alpha: float = 10.0,
        sigma: float = 5.0,
        label_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if alpha < 0 or sigma < 0:
            raise ValueError(f"alpha and sigma must be >= 0, got alpha={alpha}, sigma={sigma}")
        self.alpha = float(alpha)
        self.sigma = float(sigma)
        self.label_keys = _label_keys(self.keys, label_keys)
        self.displacement: np.ndarray | None = None

    def randomize(self, data: Sequence[int] | None = None) -> None:
        """Decide whether to apply and draw the field for in-plane size ``data = (H, W)``."""
        super().randomize(None)
        if self._do_transform and data is not None:
            self.displacement = rpt_elastic_displacement(data, self.alpha, self.sigma, self.R)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor], randomize: bool = True) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        size = _check_slices(d, keys, type(self).__name__)
        if randomize:
            self.randomize(size)
        if not self._do_transform or not keys:
            return d
        if self.displacement is None or self.displacement.shape[1:] != tuple(size):
            raise ValueError(f"{type(self).__name__}: no displacement field drawn for in-plane size {size}")
        grid = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
        coords = np.stack(grid).astype(np.float32) + self.displacement
        for key in keys:
            src = d[key]
            img = convert_to_tensor(src, dtype=torch.float32, track_meta=False).cpu().numpy()
            out = np.stack([map_coordinates(ch, coords, order=1, mode="reflect") for ch in img])
            d[key] = _finish(torch.from_numpy(out), src, key in self.label_keys)
        return d


class RPTAugmentd(RandomizableTransform, MapTransform):
    """Episode-level augmentation of a support/query pair of slices with RPT's gamma, affine and elastic steps.

    Gamma (MONAI's ``RandAdjustContrastd``: ``x' = ((x - min) / range) ** gamma * range + min``, RPT's curve up
    to its 1e-5 offset, gamma ~ U(gamma_range)) changes an image only and keeps its range; the geometric step
    (:class:`RandRPTAffined` followed by :class:`RandRPTElasticd`) moves an image and its mask together.

    ``mode="independent"`` (default): the support side and the query side each get gamma with ``prob_gamma`` and
    the geometric step with ``prob_geometric``, all four decisions independent.
    ``mode="one_of_two"`` (RPT): gamma is applied to exactly one side, the query with probability ``prob_gamma``
    and otherwise the support; the geometric step likewise with ``prob_geometric``, decided independently.

    Parameters
    ----------
    support_keys, query_keys
        ``(image_key, label_key)`` of each side; images ``[C, H, W]``, labels ``[1, H, W]`` in ``{0, 1}``.
    mode
        ``"independent"`` or ``"one_of_two"``.
    prob_gamma, prob_geometric
        See ``mode``.
    gamma_range
        ``(low, high)`` with ``0 < low <= high``; gamma ~ U(low, high).
    rotate_deg, translate_px, shear_deg, zoom, padding_mode
        See :class:`RandRPTAffined`.
    alpha, sigma
        See :class:`RandRPTElasticd`.
    prob
        Probability of augmenting an episode at all.
    allow_missing_keys
        Skip keys that are absent (e.g. an episode without query label).

    Notes
    -----
    ``set_random_state`` shares this transform's random state with its children, so one seed fixes every draw.
    """

    backend = RandRPTAffined.backend
    MODES = ("independent", "one_of_two")

    def __init__(
        self,
        support_keys: Sequence[Hashable] = ("support_image", "support_label"),
        query_keys: Sequence[Hashable] = ("query_image", "query_label"),
        mode: str = "independent",
        prob_gamma: float = 0.5,
        prob_geometric: float = 0.5,
        gamma_range: Sequence[float] = (0.5, 1.5),
        rotate_deg: float = 5.0,
        translate_px: float | Sequence[float] = 5.0,
        shear_deg: float = 5.0,
        zoom: Sequence[float] = (0.9, 1.2),
        alpha: float = 10.0,
        sigma: float = 5.0,
        padding_mode: str = "border",
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        support_keys, query_keys = tuple(support_keys), tuple(query_keys)
        for name, pair in (("support_keys", support_keys), ("query_keys", query_keys)):
            if len(pair) != 2:
                raise ValueError(f"{name} must be (image_key, label_key), got {pair}")
        MapTransform.__init__(self, support_keys + query_keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        for name, p in (("prob_gamma", prob_gamma), ("prob_geometric", prob_geometric)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        low, high = (float(g) for g in gamma_range)
        if not 0 < low <= high:
            raise ValueError(f"gamma_range must satisfy 0 < low <= high, got {tuple(gamma_range)}")
        self.mode = mode
        self.prob_gamma = float(prob_gamma)
        self.prob_geometric = float(prob_geometric)
        #: The augmentation's arguments, as a training run's provenance records them.
        self.settings: dict[str, Any] = {
            "mode": mode, "prob": float(prob), "prob_gamma": self.prob_gamma, "prob_geometric": self.prob_geometric,
            "gamma_range": [low, high], "rotate_deg": float(rotate_deg),
            "translate_px": [float(v) for v in ensure_tuple_rep(translate_px, 2)], "shear_deg": float(shear_deg),
            "zoom": [float(v) for v in zoom], "alpha": float(alpha), "sigma": float(sigma), "padding_mode": padding_mode,
        }
        self.sides: dict[str, dict[str, Any]] = {}
        for side, (image_key, label_key) in (("support", support_keys), ("query", query_keys)):
            pair = (image_key, label_key)
            self.sides[side] = {
                "gamma": RandAdjustContrastd(image_key, 1.0, (low, high), allow_missing_keys=allow_missing_keys),
                "affine": RandRPTAffined(
                    pair, 1.0, rotate_deg, translate_px, shear_deg, zoom, "bilinear", padding_mode,
                    label_keys=label_key, allow_missing_keys=allow_missing_keys,
                ),
                "elastic": RandRPTElasticd(pair, 1.0, alpha, sigma, label_key, allow_missing_keys),
            }
        self.decisions = {"support": (False, False), "query": (False, False)}

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RPTAugmentd:
        super().set_random_state(seed, state)
        for children in self.sides.values():
            for child in children.values():
                child.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw the (gamma, geometric) decision of each side."""
        super().randomize(None)
        if not self._do_transform:
            self.decisions = {"support": (False, False), "query": (False, False)}
        elif self.mode == "independent":
            gamma_s, gamma_q, geo_s, geo_q = (
                self.R.rand() < p for p in (self.prob_gamma,) * 2 + (self.prob_geometric,) * 2
            )
            self.decisions = {"support": (gamma_s, geo_s), "query": (gamma_q, geo_q)}
        else:
            gamma_q = self.R.rand() < self.prob_gamma
            geo_q = self.R.rand() < self.prob_geometric
            self.decisions = {"support": (not gamma_q, not geo_q), "query": (gamma_q, geo_q)}

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        self.randomize()
        for side, (do_gamma, do_geometric) in self.decisions.items():
            children = self.sides[side]
            if do_gamma:
                gamma = children["gamma"](d)
                # MONAI returns a MetaTensor whatever it was given; the episode keeps its own array type.
                d = {k: convert_to_dst_type(v, d[k])[0] if v is not d[k] else v for k, v in gamma.items()}
            if do_geometric:
                d = children["elastic"](children["affine"](d))
        return d


RandRPTAffineD = RandRPTAffineDict = RandRPTAffined
RandRPTElasticD = RandRPTElasticDict = RandRPTElasticd
RPTAugmentD = RPTAugmentDict = RPTAugmentd
