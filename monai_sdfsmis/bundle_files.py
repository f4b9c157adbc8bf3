"""Where the ``sd_fsmis`` bundle's configs are, for the commands and apps that run them.

The bundle (``bundles/sd_fsmis``) is the one definition of training, inference and evaluation; ``python -m
monai_sdfsmis train`` and the MONAI Label app run its configs rather than a copy of them.
"""

from __future__ import annotations

__all__ = ["NO_PRIOR_RECIPE", "SUPERVISED_RECIPE", "default_bundle_dir", "training_configs"]

from os import PathLike
from pathlib import Path

#: The no-prior training recipe: configs layered in this order.
NO_PRIOR_RECIPE = ("configs/train.json", "configs/no_prior.json")
#: The supervised (SDSeg) recipe: the no-prior recipe with labelled slices in place of supervoxel episodes.
SUPERVISED_RECIPE = (*NO_PRIOR_RECIPE, "configs/supervised.json")


def default_bundle_dir() -> Path:
    """``bundles/sd_fsmis`` of the checkout this package is installed from (``pip install -e``)."""
    import monai_sdfsmis

    bundle = Path(monai_sdfsmis.__file__).resolve().parents[1] / "bundles" / "sd_fsmis"
    if not (bundle / "configs").is_dir():
        raise FileNotFoundError(
            f"the sd_fsmis bundle was not found at {bundle} (the package is not installed from a checkout); "
            "pass the bundle folder (--bundle_dir, or download it: python -m monai.bundle download)"
        )
    return bundle


def training_configs(bundle_dir: str | PathLike, recipe: tuple[str, ...] = NO_PRIOR_RECIPE) -> list[str]:
    """The recipe's config files in ``bundle_dir``, checked to exist."""
    files = [Path(bundle_dir) / name for name in recipe]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle folder {bundle_dir}: missing {', '.join(missing)}")
    return [str(f) for f in files]
