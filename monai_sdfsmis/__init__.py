"""SD-FSMIS for MONAI: few-shot medical image segmentation with a Stable Diffusion prior."""

from __future__ import annotations

__version__ = "0.1.0"
