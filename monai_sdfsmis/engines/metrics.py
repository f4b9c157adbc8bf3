"""Per-volume metrics of the few-shot protocol: Dice, HD95 and ASSD in millimetres (DECISIONS.md #12).

MONAI's ignite metric handlers call their metric without the voxel spacing, which HD95 and ASSD in
mm need. The metrics here read it from the ``MetaTensor`` affine of the prediction or label (the
protocol dataset builds those affines from the volume's spacing), so they plug into a
``SupervisedEvaluator`` like any MONAI metric.
"""

from __future__ import annotations

__all__ = [
    "spacing_of",
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


def _finite_or_nan(values: torch.Tensor) -> torch.Tensor:
    # An empty prediction gives an infinite distance; NaN lets MONAI's reductions skip it.
    return torch.where(torch.isfinite(values), values, torch.full_like(values, float("nan")))


def _plain(x: torch.Tensor) -> torch.Tensor:
    # MetaTensor bookkeeping on every op makes MONAI's edge extraction several times slower.
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _spacing(y_pred: torch.Tensor, y: torch.Tensor, kwargs: dict) -> Any:
    if kwargs.get("spacing") is not None:
        return kwargs["spacing"]
    spatial_dims = y_pred.ndim - 2
    return spacing_of(y, spatial_dims) or spacing_of(y_pred, spatial_dims)


class _SpacedDistance:
    """Mixin: call MONAI's distance metric with the spacing of the inputs, and report inf (empty prediction) as NaN."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        spacing = _spacing(y_pred, y, kwargs)
        return _finite_or_nan(super()._compute_tensor(_plain(y_pred), _plain(y), spacing=spacing))  # type: ignore[misc]


class SpacedHausdorffDistanceMetric(_SpacedDistance, HausdorffDistanceMetric):
    """MONAI's Hausdorff distance (95th percentile by default) in the units of the input's affine (mm).

    Inputs ``[B, C, *spatial]`` binary; the spacing comes from ``spacing=`` when given, otherwise from the
    ``MetaTensor`` affine of ``y`` (then ``y_pred``), otherwise 1. Infinite values (empty prediction) become NaN.
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
) -> dict[str, float]:
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
        ``dice`` = 2TP / (2TP + FP + FN) (NaN when both are empty), ``hd95`` and ``assd`` in the units of
        ``spacing`` (NaN when either mask is empty).
    """
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).bool()
    g = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label).bool()
    if p.shape != g.shape:
        raise ValueError(f"pred {tuple(p.shape)} and label {tuple(g.shape)} must have the same shape.")
    if p.ndim == 4 and p.shape[0] == 1:
        p, g = p[0], g[0]
    tp = int((p & g).sum())
    denominator = int(p.sum()) + int(g.sum())
    dice = 2.0 * tp / denominator if denominator else float("nan")
    if not bool(p.any()) or not bool(g.any()):
        return {"dice": dice, "hd95": float("nan"), "assd": float("nan")}
    batch_p, batch_g = p[None, None].float(), g[None, None].float()
    space = None if spacing is None else [float(s) for s in spacing]
    hd95 = compute_hausdorff_distance(batch_p, batch_g, include_background=True, percentile=95, spacing=space)
    assd = compute_average_surface_distance(batch_p, batch_g, include_background=True, symmetric=True, spacing=space)
    return {"dice": dice, "hd95": float(hd95.item()), "assd": float(assd.item())}
