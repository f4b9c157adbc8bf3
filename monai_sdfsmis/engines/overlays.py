"""PNG overlays of query slices: image | ground truth | prediction, for a quick look at protocol results."""

from __future__ import annotations

__all__ = ["overlay_slices", "overlay_png", "save_overlay", "OverlaySaver"]

import io
import re
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import optional_import

from monai_sdfsmis.data.protocol import support_slice_indices
from monai_sdfsmis.utils import atomic_write

Image, has_pil = optional_import("PIL.Image")
imageio, has_imageio = optional_import("imageio.v3")
Events, _ = optional_import("ignite.engine", name="Events")

_GT_COLOUR = np.array([0, 255, 0], dtype=np.float32)
_PRED_COLOUR = np.array([255, 40, 40], dtype=np.float32)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def overlay_slices(label: Any, n_slices: int = 2) -> list[int]:
    """Slice numbers to show: the middles of ``n_slices`` parts of the slices where ``label [.., H, W, D]`` is set.

    Falls back to the middle slice of the volume when the label is empty.
    """
    mask = _numpy(label).reshape(-1, *_numpy(label).shape[-3:]).any(axis=0)
    present = np.flatnonzero(mask.any(axis=(0, 1)))
    if present.size == 0:
        return [mask.shape[-1] // 2]
    return sorted({int(present[i]) for i in support_slice_indices(int(present.size), max(1, int(n_slices)))})


def overlay_png(image: Any, label: Any, pred: Any, alpha: float = 0.45) -> bytes:
    """Encode one slice as a 3-panel PNG: image, image + ground truth (green), image + prediction (red).

    Parameters
    ----------
    image
        ``[H, W]`` (or ``[C, H, W]``, first channel used) intensities in ``[-1, 1]``.
    label, pred
        ``[H, W]`` binary masks (a leading channel of 1 is allowed).

    Returns
    -------
    bytes
        PNG file content, ``W`` rows by ``3 H`` columns; for RAS-oriented slices each panel is in radiological
        display (anterior up, patient's right on the left).
    """
    img = _numpy(image)
    img = img[0] if img.ndim == 3 else img
    gt = _numpy(label).reshape(img.shape) > 0
    pr = _numpy(pred).reshape(img.shape) > 0
    grey = np.clip((img + 1.0) * 127.5, 0, 255).astype(np.float32)
    base = np.repeat(grey[..., None], 3, axis=-1)

    def tint(mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
        out = base.copy()
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        return out

    def upright(rgb: np.ndarray) -> np.ndarray:
        # RAS arrays (VolumeStore's default): rows run along A, columns along R. Radiological display puts
        # anterior up and the patient's right on the image's left.
        return np.transpose(rgb, (1, 0, 2))[::-1, ::-1]

    panel = np.concatenate([upright(base), upright(tint(gt, _GT_COLOUR)), upright(tint(pr, _PRED_COLOUR))], axis=1)
    pixels = np.ascontiguousarray(np.clip(panel, 0, 255).astype(np.uint8))
    if has_pil:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()
    if has_imageio:
        return bytes(imageio.imwrite("<bytes>", pixels, extension=".png"))
    raise RuntimeError("Writing PNG overlays needs Pillow or imageio; install one of them.")


def save_overlay(path: str | PathLike, image: Any, label: Any, pred: Any) -> Path:
    """Write :func:`overlay_png` of one slice to ``path`` atomically."""
    return atomic_write(path, overlay_png(image, label, pred))


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "x"


def _item(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item() if value.numel() else None
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _item(value[0])
    return value


class OverlaySaver:
    """Ignite handler: after each evaluator iteration, write overlays of ``n_slices`` query slices per case.

    Reads ``image``/``label``/``pred`` ``[C, H, W, D]`` from the (decollated) ``engine.state.output`` and the case
    fields ``fold``, ``organ``, ``query_id`` from ``engine.state.batch``. Files:
    ``<output_dir>/<method>/fold<k>_<organ>_q<query>_z<slice>.png``.

    Parameters
    ----------
    output_dir
        Folder for the PNG files.
    method
        Sub-folder name (the method evaluated).
    n_slices
        Slices per query volume, picked in the middle of equal parts of the ground-truth organ extent.
    """

    def __init__(self, output_dir: str | PathLike, method: str = "sd_fsmis", n_slices: int = 2) -> None:
        self.output_dir = Path(output_dir) / _slug(method)
        self.n_slices = int(n_slices)
        self.written: list[Path] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        if self.n_slices <= 0:
            return
        outputs = engine.state.output
        batches = engine.state.batch
        outputs = outputs if isinstance(outputs, list) else [outputs]
        batches = batches if isinstance(batches, list) else [batches]
        for out, case in zip(outputs, batches):
            image, label, pred = out["image"], out["label"], out["pred"]
            if image.ndim == 5:  # not decollated: take the first (only) item of the batch
                image, label, pred = image[0], label[0], pred[0]
            name = "_".join(
                [
                    f"fold{_slug(_item(case.get('fold', 'x')))}",
                    _slug(_item(case.get("organ", "organ"))),
                    f"q{_slug(_item(case.get('query_id', engine.state.iteration)))}",
                ]
            )
            for z in overlay_slices(label, self.n_slices):
                path = self.output_dir / f"{name}_z{z:03d}.png"
                self.written.append(save_overlay(path, image[0, ..., z], label[0, ..., z], pred[0, ..., z]))

    @staticmethod
    def paths_for(output_dir: str | PathLike, method: str) -> Sequence[Path]:
        """PNG files already written for ``method`` under ``output_dir``."""
        return sorted((Path(output_dir) / _slug(method)).glob("*.png"))
