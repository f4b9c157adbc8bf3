"""inferers of monai_sdfsmis."""

from __future__ import annotations
