"""Support sets in engine batches: the item keys of ``k`` annotated support volumes and the batch preparation that
hands them to :class:`~monai_sdfsmis.inferers.SlidingSupportInferer`.

One support uses the keys ``support_image`` / ``support_label``; a k-shot item adds ``support_image_2`` /
``support_label_2`` up to ``support_image_k`` / ``support_label_k``. :class:`PrepareSupportBatch` passes them to the
inferer as one tensor each (1-shot) or as lists of ``k`` tensors (k-shot).
"""

from __future__ import annotations

__all__ = ["support_keys", "count_support_keys", "PrepareSupportBatch"]

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatchExtraInput


def support_keys(n_supports: int) -> list[tuple[str, str]]:
    """``[(image key, label key), ...]`` of ``n_supports`` support volumes, the first ``("support_image",
    "support_label")``, then ``("support_image_2", "support_label_2")`` and so on."""
    if int(n_supports) < 0:
        raise ValueError(f"the number of support volumes cannot be negative, got {n_supports}.")
    if int(n_supports) == 0:
        return []  # a supervised model segments without a support
    return [("support_image", "support_label")] + [
        (f"support_image_{k}", f"support_label_{k}") for k in range(2, int(n_supports) + 1)
    ]


def count_support_keys(data: Mapping[str, Any]) -> int:
    """How many support volumes ``data`` holds under :func:`support_keys`' names (``support_image``,
    ``support_image_2``, ...; 0 without a ``support_image``)."""
    k = 0
    while support_keys(k + 1)[-1][0] in data:
        k += 1
    return k


class PrepareSupportBatch(PrepareBatchExtraInput):
    """``prepare_batch`` of a MONAI evaluator whose inferer takes ``support_image`` and ``support_label``.

    MONAI's ``PrepareBatchExtraInput`` moves every support key (and ``extra_keys``) to the engine's device; the
    supports are then handed over as one tensor each (1 support) or as lists of ``n_supports`` tensors (k-shot):
    ``(image, label, (), {"support_image": ..., "support_label": ..., **extra})``.

    Parameters
    ----------
    n_supports
        Number of support volumes in each item (:func:`support_keys`).
    extra_keys
        More inferer keywords and the batch keys they take (the protocol: ``{"query_label": "label"}``).
    optional_keys
        Like ``extra_keys``, but passed only when the batch has them (the protocol's ``{"organ_id": "organ_id"}``,
        which a support-free network needs and datasets of few-shot cases may lack).
    """

    def __init__(
        self, n_supports: int = 1, extra_keys: Mapping[str, str] | None = None,
        optional_keys: Mapping[str, str] | None = None,
    ) -> None:
        self.support_keys = support_keys(n_supports)
        self.optional_keys = dict(optional_keys or {})
        super().__init__({**{key: key for pair in self.support_keys for key in pair}, **dict(extra_keys or {})})

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, Any]]:
        image, label, args, extra = super().__call__(batchdata, device, non_blocking, **kwargs)
        extra.update({name: batchdata[key] for name, key in self.optional_keys.items() if key in batchdata})
        if not self.support_keys:
            return image, label, args, extra
        images = [extra.pop(image_key) for image_key, _ in self.support_keys]
        labels = [extra.pop(label_key) for _, label_key in self.support_keys]
        several = len(self.support_keys) > 1
        supports = {"support_image": images if several else images[0], "support_label": labels if several else labels[0]}
        return image, label, args, {**supports, **extra}
