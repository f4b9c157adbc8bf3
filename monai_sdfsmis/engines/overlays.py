"""PNG overlays of query slices for a person to read: image | ground truth | prediction, with titles and a legend.

Each PNG shows one query slice in three titled panels, the masks blended over the image in the organ's colour
(:data:`ORGAN_COLOURS`) with :func:`monai.visualize.blend_images`, the case and its volume Dice in the title and
a legend naming the organ. Rendering uses matplotlib's Agg canvas directly, so no display is needed.
"""

from __future__ import annotations

__all__ = [
    "ORGAN_COLOURS",
    "path_slug",
    "organ_colour",
    "overlay_slices",
    "overlay_panels",
    "overlay_png",
    "overlay_size",
    "save_overlay",
    "volume_dice",
    "OverlaySaver",
]

import io
import math
import re
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import optional_import
from monai.visualize import blend_images

from monai_sdfsmis.data.protocol import support_slice_indices
from monai_sdfsmis.utils import atomic_write

matplotlib, has_matplotlib = optional_import("matplotlib")
Events, _ = optional_import("ignite.engine", name="Events")

#: Display colour (RGB, 0-255) of each organ's masks; other organs get :data:`DEFAULT_COLOUR`.
ORGAN_COLOURS: dict[str, tuple[int, int, int]] = {
    "liver": (255, 140, 0),
    "spleen": (170, 70, 255),
    "left_kidney": (0, 150, 255),
    "right_kidney": (0, 210, 110),
}
DEFAULT_COLOUR: tuple[int, int, int] = (255, 40, 40)

#: Layout of a PNG, in pixels: panels are upscaled by a whole factor to at least MIN_PANEL pixels on their long
#: side, PAD apart and from the border, under a TOP band (title, panel titles) and over a BOTTOM band (legend).
MIN_PANEL, PAD, TOP, BOTTOM = 256, 8, 46, 30
_DPI = 100
_PANEL_TITLES = ("image", "ground truth", "prediction")


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def organ_colour(organ: str | None) -> tuple[int, int, int]:
    """The display colour of ``organ`` (a name of :data:`ORGAN_COLOURS`, else :data:`DEFAULT_COLOUR`)."""
    return ORGAN_COLOURS.get(str(organ).lower().replace(" ", "_"), DEFAULT_COLOUR) if organ else DEFAULT_COLOUR


def volume_dice(label: Any, pred: Any) -> float:
    """Dice 2TP / (2TP + FP + FN) of two binary volumes of any shape; NaN when the ground truth is empty.

    NaN, not 1, for an empty ground truth matches MONAI's ``DiceMetric(ignore_empty=True)`` used by the evaluator.
    """
    gt, pr = _numpy(label) > 0, _numpy(pred) > 0
    if not gt.any():
        return float("nan")
    return float(2.0 * np.logical_and(gt, pr).sum() / (gt.sum() + pr.sum()))


def overlay_slices(label: Any, n_slices: int = 2) -> list[int]:
    """Slice numbers to show: the middles of ``n_slices`` parts of the slices where ``label [.., H, W, D]`` is set.

    Falls back to the middle slice of the volume when the label is empty.
    """
    mask = _numpy(label).reshape(-1, *_numpy(label).shape[-3:]).any(axis=0)
    present = np.flatnonzero(mask.any(axis=(0, 1)))
    if present.size == 0:
        return [mask.shape[-1] // 2]
    return sorted({int(present[i]) for i in support_slice_indices(int(present.size), max(1, int(n_slices)))})


def _colormap(colour: tuple[int, int, int]) -> str:
    # blend_images takes a matplotlib colormap by name: a one-colour map gives every labelled pixel `colour`.
    name = "sdfsmis_{:02x}{:02x}{:02x}".format(*colour)
    if name not in matplotlib.colormaps:
        from matplotlib.colors import ListedColormap

        matplotlib.colormaps.register(ListedColormap([np.asarray(colour, dtype=float) / 255.0], name=name))
    return name


def _upright(rgb: np.ndarray) -> np.ndarray:
    # RAS arrays (VolumeStore's default): rows run along A, columns along R. Radiological display puts anterior
    # up and the patient's right on the image's left.
    return np.ascontiguousarray(np.transpose(rgb, (1, 0, 2))[::-1, ::-1])


def overlay_panels(
    image: Any, label: Any, pred: Any, colour: tuple[int, int, int] = DEFAULT_COLOUR, alpha: float = 0.45
) -> list[np.ndarray]:
    """The three panels of one slice: the image in grey, then ground truth and prediction blended over it.

    Parameters
    ----------
    image
        ``[H, W]`` (or ``[C, H, W]``, first channel used) intensities in ``[-1, 1]``, shown as grey ``(x + 1) / 2``.
    label, pred
        ``[H, W]`` binary masks (a leading channel of 1 is allowed).
    colour
        RGB (0-255) of both masks.
    alpha
        Weight of the colour where a mask is set: ``(1 - alpha) * grey + alpha * colour``.

    Returns
    -------
    list of np.ndarray
        Three ``[W, H, 3]`` uint8 arrays in display orientation (for RAS slices: anterior up, the patient's right
        on the left).
    """
    if not has_matplotlib:
        raise RuntimeError("Writing overlays needs matplotlib: pip install matplotlib.")
    img = _numpy(image)
    img = img[0] if img.ndim == 3 else img
    grey = np.clip((img.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)[None]
    cmap = _colormap(tuple(int(c) for c in colour))
    panels = [np.repeat(grey, 3, axis=0)]
    for mask in (label, pred):
        binary = (_numpy(mask).reshape(img.shape) > 0).astype(np.float32)[None]
        panels.append(blend_images(grey, binary, alpha=alpha, cmap=cmap, rescale_arrays=False))
    return [_upright(np.rint(np.moveaxis(p, 0, -1) * 255.0).clip(0, 255).astype(np.uint8)) for p in panels]


def overlay_size(height: int, width: int) -> tuple[int, int]:
    """``(png_width, png_height)`` in pixels of the overlay of an ``[H, W]`` slice (panels are ``[W, H]``)."""
    scale = max(1, math.ceil(MIN_PANEL / max(height, width)))
    return 3 * height * scale + 4 * PAD, TOP + width * scale + BOTTOM


def overlay_png(
    image: Any,
    label: Any,
    pred: Any,
    alpha: float = 0.45,
    organ: str | None = None,
    dice: float | None = None,
    title: str | None = None,
) -> bytes:
    """Encode one slice as a PNG: titled image, ground-truth and prediction panels, the organ's legend, the Dice.

    Parameters
    ----------
    image
        ``[H, W]`` (or ``[C, H, W]``, first channel used) intensities in ``[-1, 1]``.
    label, pred
        ``[H, W]`` binary masks (a leading channel of 1 is allowed).
    alpha
        Weight of the organ colour over the image.
    organ
        Organ name: the masks' colour (:func:`organ_colour`) and the legend's text.
    dice
        The case's Dice (a fraction), shown in the title; NaN shows as "n/a".
    title
        Case description put before the Dice.

    Returns
    -------
    bytes
        PNG file content of :func:`overlay_size` pixels; each panel is the slice upscaled by a whole factor
        without interpolation, black elsewhere. The title is also the PNG's ``Title`` text chunk.
    """
    colour = organ_colour(organ)
    panels = overlay_panels(image, label, pred, colour=colour, alpha=alpha)
    height, width = _numpy(label).shape[-2:]
    png_width, png_height = overlay_size(int(height), int(width))
    scale = max(1, math.ceil(MIN_PANEL / max(height, width)))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    figure = Figure(figsize=(png_width / _DPI, png_height / _DPI), dpi=_DPI, facecolor="black")
    FigureCanvasAgg(figure)
    panel_w, panel_h = panels[0].shape[1] * scale, panels[0].shape[0] * scale
    for i, (panel, name) in enumerate(zip(panels, _PANEL_TITLES)):
        left = PAD + i * (panel_w + PAD)
        # figimage puts array pixels on figure pixels unresampled, so the panels are exactly the blended slice.
        figure.figimage(np.kron(panel, np.ones((scale, scale, 1), dtype=np.uint8)), xo=left, yo=BOTTOM, origin="upper")
        figure.text((left + panel_w / 2) / png_width, (BOTTOM + panel_h + 3) / png_height, name,
                    ha="center", va="bottom", color="white", fontsize=10)
    heading = " - ".join(part for part in (title, None if dice is None else _dice_text(dice)) if part)
    if heading:
        figure.text(0.5, 1 - 3 / png_height, heading, ha="center", va="top", color="white", fontsize=11)
    legend = Patch(facecolor=np.asarray(colour) / 255.0, edgecolor="white", label=(organ or "organ").replace("_", " "))
    figure.legend(handles=[legend], loc="lower center", frameon=False, labelcolor="white", fontsize=9,
                  bbox_to_anchor=(0.5, 0.0))
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3]  # opaque figure: RGB is the whole picture
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    # The heading is also stored as the PNG's Title text chunk: searchable, and readable without OCR.
    info = PngInfo()
    info.add_text("Title", heading or "overlay")
    info.add_text("Description", "panels: " + ", ".join(_PANEL_TITLES))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _dice_text(dice: float) -> str:
    return "volume Dice n/a (empty ground truth)" if math.isnan(float(dice)) else f"volume Dice {100 * float(dice):.1f}%"


def save_overlay(path: str | PathLike, image: Any, label: Any, pred: Any, **kwargs: Any) -> Path:
    """Write :func:`overlay_png` of one slice (``kwargs``: its ``organ``, ``dice``, ``title``...) atomically."""
    return atomic_write(path, overlay_png(image, label, pred, **kwargs))


def path_slug(value: Any) -> str:
    """``value`` as a file-name part: runs of characters other than letters, digits, ``.``, ``_``, ``-`` become ``_``."""
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
    fields ``fold``, ``organ``, ``query_id`` from ``engine.state.batch``; the title carries the method, the case
    and its volume Dice (:func:`volume_dice` of the whole ``label``/``pred``). Files:
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
        self.method = str(method)
        self.output_dir = Path(output_dir) / path_slug(method)
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
            fold, organ = _item(case.get("fold", "x")), _item(case.get("organ", "organ"))
            query = _item(case.get("query_id", engine.state.iteration))
            name = "_".join([f"fold{path_slug(fold)}", path_slug(organ), f"q{path_slug(query)}"])
            dice = volume_dice(label, pred)  # of the whole query volume, as the protocol's tables score it
            for z in overlay_slices(label, self.n_slices):
                path = self.output_dir / f"{name}_z{z:03d}.png"
                title = f"{self.method}: fold {fold}, query {query}, slice {z}"
                self.written.append(
                    save_overlay(path, image[0, ..., z], label[0, ..., z], pred[0, ..., z],
                                 organ=str(organ), dice=dice, title=title)
                )

    @staticmethod
    def paths_for(output_dir: str | PathLike, method: str) -> Sequence[Path]:
        """PNG files already written for ``method`` under ``output_dir``."""
        return sorted((Path(output_dir) / path_slug(method)).glob("*.png"))
