"""Per-volume metrics of the few-shot protocol: Dice, HD95 and ASSD in millimetres (MONAI metrics).

MONAI's ignite metric handlers call their metric without the voxel spacing, which HD95 and ASSD in
mm need. The metrics here read it from the ``MetaTensor`` affine of the prediction or label (the
protocol dataset builds those affines from the volume's spacing), so they plug into a
``SupervisedEvaluator`` like any MONAI metric.

Surface distances are infinite when exactly one of the two masks is empty (MONAI returns inf or NaN).
Dropping such a case from the means would make a method that predicts nothing look better, so it gets a
stated penalty instead, :func:`empty_prediction_distance`: the diagonal of the volume's physical extent,
larger than any distance measured inside the volume. Only a case whose prediction and label are both
empty stays NaN (undefined); :func:`monai_sdfsmis.engines.tables.summarize` counts both kinds.
"""

from __future__ import annotations

__all__ = [
    "spacing_of",
    "empty_prediction_distance",
    "SpacedHausdorffDistanceMetric",
    "SpacedSurfaceDistanceMetric",
    "SpacedHausdorffDistance",
    "SpacedSurfaceDistance",
    "volume_metrics",
]

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.handlers import IgniteMetricHandler
from monai.metrics import (
    HausdorffDistanceMetric,
    SurfaceDistanceMetric,
    compute_average_surface_distance,
    compute_hausdorff_distance,
)
from monai.metrics.utils import prepare_spacing
from monai.utils import MetricReduction


def spacing_of(tensor: Any, spatial_dims: int) -> list[tuple[float, ...]] | None:
    """Voxel spacing of each item of a batch-first ``MetaTensor`` ``[B, C, *spatial]``; ``None`` without metadata."""
    if not isinstance(tensor, MetaTensor):
        return None
    affine = tensor.affine
    affines = affine if affine.ndim == 3 else affine.unsqueeze(0).expand(tensor.shape[0], -1, -1)
    if affines.shape[0] != tensor.shape[0]:
        affines = affines[:1].expand(tensor.shape[0], -1, -1)
    return [
        tuple(float(s) for s in np.asarray(affine_to_spacing(a, r=spatial_dims), dtype=float)) for a in affines.cpu()
    ]


def empty_prediction_distance(shape: Sequence[int], spacing: float | Sequence[float] | None = None) -> float:
    """HD95 and ASSD given to an empty prediction (or an empty label): the diagonal of the volume's extent.

    The volume spans ``shape[i] * spacing[i]`` along axis ``i``; no two of its voxels are farther apart
    than the diagonal of that box, so the penalty is larger than the HD95/ASSD of any non-empty
    prediction of the same volume, whatever it is.

    Parameters
    ----------
    shape
        Spatial shape of the volume, ``(H, W, D)`` (no channel axis).
    spacing
        Voxel size per spatial axis (mm), one number for isotropic voxels, or ``None`` for 1.

    Returns
    -------
    float
        ``sqrt(sum_i (shape[i] * spacing[i]) ** 2)`` in the units of ``spacing`` (Euclidean, also for the
        ``"chessboard"``/``"taxicab"`` distance metrics).
    """
    extent = np.asarray([int(n) for n in shape], dtype=float)
    step = np.ones(1) if spacing is None else np.asarray(spacing, dtype=float).ravel()
    if step.size not in (1, extent.size):
        raise ValueError(f"spacing {tuple(step)} must have one value per spatial axis of shape {tuple(shape)}.")
    return float(np.sqrt(np.sum((extent * step) ** 2)))


def _penalize_empty(
    values: torch.Tensor, y_pred: torch.Tensor, y: torch.Tensor, spacing: Any, include_background: bool
) -> torch.Tensor:
    """Distances ``[B, C]``: :func:`empty_prediction_distance` where one mask is empty, NaN where both are.

    MONAI gives inf (ASSD) or NaN (HD95 percentile of inf) when one mask is empty, so the masks decide,
    not the values.
    """
    first = 0 if include_background else 1
    pred_any = (y_pred[:, first:] != 0).flatten(2).any(-1)
    label_any = (y[:, first:] != 0).flatten(2).any(-1)
    spatial = tuple(y.shape[2:])
    per_item = prepare_spacing(spacing=spacing, batch_size=y.shape[0], img_dim=len(spatial))
    penalty = torch.tensor([empty_prediction_distance(spatial, s) for s in per_item], dtype=values.dtype)
    penalty = penalty.to(values.device)[:, None].expand_as(values)
    values = torch.where(pred_any ^ label_any, penalty, values)
    return torch.where(pred_any | label_any, values, torch.full_like(values, float("nan")))


def _plain(x: torch.Tensor) -> torch.Tensor:
    # MetaTensor bookkeeping on every op makes MONAI's edge extraction several times slower.
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _spacing(y_pred: torch.Tensor, y: torch.Tensor, kwargs: dict) -> Any:
    if kwargs.get("spacing") is not None:
        return kwargs["spacing"]
    spatial_dims = y_pred.ndim - 2
    return spacing_of(y, spatial_dims) or spacing_of(y_pred, spatial_dims)


class _SpacedDistance:
    """Mixin: call MONAI's distance metric with the spacing of the inputs; an empty mask gets the penalty."""

    include_background: bool

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        spacing = _spacing(y_pred, y, kwargs)
        y_pred, y = _plain(y_pred), _plain(y)
        values = super()._compute_tensor(y_pred, y, spacing=spacing)  # type: ignore[misc]
        return _penalize_empty(values, y_pred, y, spacing, self.include_background)


class SpacedHausdorffDistanceMetric(_SpacedDistance, HausdorffDistanceMetric):
    """MONAI's Hausdorff distance (95th percentile by default) in the units of the input's affine (mm).

    Inputs ``[B, C, *spatial]`` binary; the spacing comes from ``spacing=`` when given, otherwise from the
    ``MetaTensor`` affine of ``y`` (then ``y_pred``), otherwise 1. Output ``[B, C]``. When exactly one of
    prediction and label is empty (an infinite distance), the value is :func:`empty_prediction_distance` of
    ``y``'s spatial shape and that spacing; when both are empty it is NaN (undefined, skipped by MONAI's
    mean reductions).
    """

    def __init__(
        self,
        include_background: bool = True,
        percentile: float | None = 95.0,
        directed: bool = False,
        distance_metric: str = "euclidean",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(
            include_background=include_background,
            distance_metric=distance_metric,
            percentile=percentile,
            directed=directed,
            reduction=reduction,
            get_not_nans=get_not_nans,
        )


class SpacedSurfaceDistanceMetric(_SpacedDistance, SurfaceDistanceMetric):
    """MONAI's average surface distance, symmetric by default (ASSD), in the units of the input's affine (mm).

    Spacing and empty predictions are handled as in :class:`SpacedHausdorffDistanceMetric`.
    """

    def __init__(
        self,
        include_background: bool = True,
        symmetric: bool = True,
        distance_metric: str = "euclidean",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(
            include_background=include_background,
            symmetric=symmetric,
            distance_metric=distance_metric,
            reduction=reduction,
            get_not_nans=get_not_nans,
        )


class SpacedHausdorffDistance(IgniteMetricHandler):
    """Ignite handler of :class:`SpacedHausdorffDistanceMetric` (HD95 in mm by default).

    ``output_transform`` extracts ``(y_pred, y)`` from ``engine.state.output``, e.g.
    ``monai.handlers.from_engine(["pred", "label"])``.
    """

    def __init__(
        self,
        include_background: bool = True,
        percentile: float | None = 95.0,
        directed: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = SpacedHausdorffDistanceMetric(
            include_background=include_background, percentile=percentile, directed=directed, reduction=reduction
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class SpacedSurfaceDistance(IgniteMetricHandler):
    """Ignite handler of :class:`SpacedSurfaceDistanceMetric` (ASSD in mm by default)."""

    def __init__(
        self,
        include_background: bool = True,
        symmetric: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = SpacedSurfaceDistanceMetric(include_background=include_background, symmetric=symmetric, reduction=reduction)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


def volume_metrics(
    pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, spacing: Sequence[float] | None = None
) -> dict[str, float | bool]:
    """Dice, HD95 and ASSD of one binary volume prediction.

    Parameters
    ----------
    pred, label
        Binary masks of the same shape, ``[H, W, D]`` or ``[1, H, W, D]``.
    spacing
        Voxel size (mm) per spatial axis; default 1.

    Returns
    -------
    dict
        ``dice`` = 2TP / (2TP + FP + FN) (0 when exactly one mask is empty, NaN when both are); ``hd95`` and
        ``assd`` in the units of ``spacing``: :func:`empty_prediction_distance` of the volume when exactly one
        mask is empty, NaN (undefined) when both are; ``empty_prediction``: the prediction is empty while the
        label is not.
    """
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).bool()
    g = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label).bool()
    if p.shape != g.shape:
        raise ValueError(f"pred {tuple(p.shape)} and label {tuple(g.shape)} must have the same shape.")
    if p.ndim == 4 and p.shape[0] == 1:
        p, g = p[0], g[0]
    # A plain count is all Dice needs on one binary volume; MONAI's DiceMetric would add a batch/channel
    # wrapper and its own empty-label convention for the same number.
    tp = int((p & g).sum())
    denominator = int(p.sum()) + int(g.sum())
    dice = 2.0 * tp / denominator if denominator else float("nan")
    pred_any, label_any = bool(p.any()), bool(g.any())
    empty = {"empty_prediction": label_any and not pred_any}
    if not pred_any and not label_any:
        return {"dice": dice, "hd95": float("nan"), "assd": float("nan"), **empty}
    if not pred_any or not label_any:
        penalty = empty_prediction_distance(tuple(p.shape), spacing)
        return {"dice": dice, "hd95": penalty, "assd": penalty, **empty}
    batch_p, batch_g = p[None, None].float(), g[None, None].float()
    space = None if spacing is None else [float(s) for s in spacing]
    hd95 = compute_hausdorff_distance(batch_p, batch_g, include_background=True, percentile=95, spacing=space)
    assd = compute_average_surface_distance(batch_p, batch_g, include_background=True, symmetric=True, spacing=space)
    return {"dice": dice, "hd95": float(hd95.item()), "assd": float(assd.item()), **empty}
