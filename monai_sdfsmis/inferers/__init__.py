"""inferers of monai_sdfsmis."""

from __future__ import annotations

from .sliding_support import SlidingSupportInferer, check_flip_axes, largest_run
