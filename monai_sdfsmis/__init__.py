"""SD-FSMIS for MONAI: few-shot medical image segmentation with a Stable Diffusion prior.

The public API is small; everything else lives in the sub-packages (``transforms``, ``data``,
``networks``, ``inferers``, ``engines``, ``monailabel``). Names are resolved on first use so that
``import monai_sdfsmis`` (and the command line) does not pay for importing diffusers and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # transforms
    "LoadVolumed": "transforms",
    "ScaleToUnitRanged": "transforms",
    "ResizeSlicesd": "transforms",
    "ReplicateChanneld": "transforms",
    "RPTAugmentd": "transforms",
    # data
    "VolumeRecord": "data",
    "find_alpnet_volumes": "data",
    "load_datalist": "data",
    "VolumeStore": "data",
    "EpisodeDataset": "data",
    "compute_supervoxels": "data",
    "write_supervoxels": "data",
    "protocol_cases": "data",
    "make_phantom_dataset": "data",
    # networks
    "SDFSMIS": "networks",
    "SupportMaskCopy": "networks",
    "SupervisedLatentSegmenter": "networks",
    "load_pretrained_components": "networks",
    # inference and workflows
    "SlidingSupportInferer": "inferers",
    "EpisodeTrainer": "engines",
    "ProtocolEvaluator": "engines",
    "evaluate_protocol": "engines",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .data import (
        EpisodeDataset,
        VolumeRecord,
        VolumeStore,
        compute_supervoxels,
        find_alpnet_volumes,
        load_datalist,
        make_phantom_dataset,
        protocol_cases,
        write_supervoxels,
    )
    from .engines import EpisodeTrainer, ProtocolEvaluator, evaluate_protocol
    from .inferers import SlidingSupportInferer
    from .networks import SDFSMIS, SupervisedLatentSegmenter, SupportMaskCopy, load_pretrained_components
    from .transforms import LoadVolumed, ReplicateChanneld, ResizeSlicesd, RPTAugmentd, ScaleToUnitRanged
