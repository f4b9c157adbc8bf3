"""Segment a query volume slice by slice with support slices taken from an annotated support volume.

The few-shot protocol of RPT/ADNet (RPT's within-domain evaluation): the support organ's slices are split into
``n_chunks`` parts and the middle slice of each part is a support slice; the query slices are split
into as many contiguous chunks, and chunk ``j`` is segmented with support slice ``j`` (1-shot per
slice). The support is encoded once per chunk and reused by both passes of the deployment mode, and the
chunk's query slices go through the network in batches (on CUDA under bf16 autocast by default).
"""

from __future__ import annotations

__all__ = ["SlidingSupportInferer", "check_flip_axes", "largest_run", "network_device"]

import itertools
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

from monai_sdfsmis.data.protocol import chunk_bounds, support_slice_indices
from monai_sdfsmis.progress import progress_bar
from monai_sdfsmis.transforms.postprocess import OrganMaskPostprocess

QUERY_RANGES = ("protocol", "all")
_RANGE_TOLERANCE = 1e-3


def largest_run(flags: Sequence[bool] | np.ndarray | torch.Tensor) -> tuple[int, int] | None:
    """The longest run of consecutive ``True`` values, as ``[start, end)``; the first one on a tie.

    Returns ``None`` when no value is ``True``.
    """
    values = np.asarray(torch.as_tensor(flags).cpu(), dtype=bool).ravel()
    best: tuple[int, int] | None = None
    start = None
    for i, flag in enumerate([*values.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def check_flip_axes(flip_axes: Sequence[int] | int | None) -> tuple[int, ...]:
    """``flip_axes`` as a sorted tuple of distinct in-plane axes (0, 1); ``ValueError`` for anything else."""
    axes = () if flip_axes is None else (flip_axes,) if isinstance(flip_axes, int) else tuple(flip_axes)
    if any(isinstance(a, bool) or a not in (0, 1) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"flip_axes must name distinct in-plane axes 0 and/or 1, got {list(axes)}.")
    return tuple(sorted(int(a) for a in axes))


def network_device(network: Any) -> torch.device:
    """The device of a module's first parameter or buffer; otherwise CUDA when available, else the CPU."""
    if isinstance(network, torch.nn.Module):
        tensor = next(itertools.chain(network.parameters(), network.buffers()), None)
        if tensor is not None:
            return tensor.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SlidingSupportInferer(Inferer):
    """Few-shot inferer: a query volume, a support volume and its organ mask in, the query's organ mask out.

    The network must offer the interface of :class:`monai_sdfsmis.networks.sdfsmis.SDFSMIS`:
    ``ctx = network.encode_support(image [1, 3, S, S], label [1, 1, S, S])``,
    ``soft = network.segment(images [N, 3, S, S], ctx)`` and ``network.binarize(soft) -> bool [N, 1, S, S]``
    (``S = spatial_size``). :class:`monai_sdfsmis.networks.support_copy.SupportMaskCopy` is such a network.

    Slices run along the last axis. Support slices: the support organ's slices (those where
    ``support_label`` has foreground) are split into ``n_chunks`` parts and the middle one of each part is
    taken (:func:`monai_sdfsmis.data.protocol.support_slice_indices`). Query slices, by ``query_range``:

    - ``"protocol"`` (paper evaluation, needs ``query_label``): the query's organ slices, split into
      ``n_chunks`` contiguous chunks by :func:`monai_sdfsmis.data.protocol.chunk_bounds`;
    - ``"all"`` (deployment, no query label): a first pass over every slice of the volume in ``n_chunks``
      chunks; the organ's extent is then the longest run of consecutive slices with predicted foreground,
      which is re-chunked and segmented again (slices whose chunk does not change keep their first-pass
      prediction).

    Every slice outside the chosen range is 0. Slices of any in-plane size are resized to
    ``spatial_size x spatial_size`` (bilinear for images, nearest for masks), single-channel images are
    replicated to 3 channels, and the predicted masks are resized back (nearest) to the query's grid.
    Nearest resizing is pixel-centre aligned (``"nearest-exact"``, like the bilinear image resize), so a
    mask resized to ``spatial_size`` and back is unchanged; PyTorch's plain ``"nearest"`` would shift it by
    up to a pixel.

    Parameters
    ----------
    n_chunks
        Number of support slices / query chunks (3 in the paper).
    sw_batch_size
        Query slices per network call.
    spatial_size
        In-plane size the network works at (256 for SD-FSMIS).
    query_range
        ``"protocol"`` or ``"all"`` (see above).
    device
        Device the slices are computed on; default: the device of the network's first parameter or buffer.
    amp
        bf16 autocast when computing on CUDA (ignored on CPU, which runs fp32).
    progress
        Show progress over the query slices (a bar in a terminal, plain lines in a log).
    postprocess
        3D clean-up of the whole predicted mask, names from
        :data:`~monai_sdfsmis.transforms.postprocess.POSTPROCESS_STEPS` (``"largest_component"``,
        ``"fill_holes"``); ``None`` or ``[]`` for the raw per-slice predictions.
    flip_axes
        Flip test-time augmentation: each listed in-plane axis of the volume (``0``: its first axis, left-right in
        RAS; ``1``: its second, anterior-posterior) adds a pass in which query and support slices are both
        mirrored along it; the soft masks of all passes, mirrored back, are averaged before binarizing. ``()``
        (default) is the single plain pass. Each axis costs one more support pass per chunk and one more query pass.
    """

    def __init__(
        self,
        n_chunks: int = 3,
        sw_batch_size: int = 16,
        spatial_size: int = 256,
        query_range: str = "protocol",
        device: str | torch.device | None = None,
        amp: bool = True,
        progress: bool = False,
        postprocess: Sequence[str] | str | None = None,
        flip_axes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if int(n_chunks) < 1:
            raise ValueError(f"n_chunks must be at least 1, got {n_chunks}.")
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be at least 1, got {sw_batch_size}.")
        if int(spatial_size) < 1:
            raise ValueError(f"spatial_size must be a positive number of pixels, got {spatial_size}.")
        if query_range not in QUERY_RANGES:
            raise ValueError(f"query_range must be one of {QUERY_RANGES}, got {query_range!r}.")
        self.n_chunks = int(n_chunks)
        self.sw_batch_size = int(sw_batch_size)
        self.spatial_size = int(spatial_size)
        self.query_range = query_range
        self.device = None if device is None else torch.device(device)
        self.amp = bool(amp)
        self.progress = bool(progress)
        self.postprocess = OrganMaskPostprocess(postprocess)
        self.flip_axes = check_flip_axes(flip_axes)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_volume(name: str, volume: Any, channels: Sequence[int]) -> torch.Tensor:
        if not isinstance(volume, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [1, C, H, W, D], got {type(volume).__name__}.")
        if volume.ndim != 5 or volume.shape[0] != 1 or volume.shape[1] not in channels:
            raise ValueError(
                f"{name} must be [1, C, H, W, D] with C in {tuple(channels)} (one volume, slices along the last "
                f"axis), got shape {tuple(volume.shape)}."
            )
        if min(volume.shape[2:]) < 1:
            raise ValueError(f"{name} has an empty spatial shape {tuple(volume.shape)}.")
        return volume

    @staticmethod
    def _check_finite(name: str, volume: torch.Tensor) -> None:
        # min/max comparisons are False for NaN, so the range and mask checks alone let NaN volumes through.
        finite = torch.isfinite(volume)
        if not bool(finite.all()):
            n_bad = int(finite.numel() - int(finite.sum()))
            raise ValueError(f"{name} contains {n_bad} non-finite (NaN or infinite) voxels; fix or mask the input volume.")

    @staticmethod
    def _check_range(name: str, volume: torch.Tensor) -> None:
        low, high = float(volume.min()), float(volume.max())
        if low < -1.0 - _RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
            raise ValueError(
                f"{name} intensities must be in [-1, 1], got [{low:g}, {high:g}]; normalise the volume first "
                "(monai_sdfsmis.transforms.intensity.ScaleToUnitRanged)."
            )

    @staticmethod
    def _check_mask(name: str, mask: torch.Tensor) -> None:
        if not bool(((mask == 0) | (mask == 1)).all()):
            values = torch.unique(mask)
            shown = ", ".join(f"{float(v):g}" for v in values[:8])
            raise ValueError(
                f"{name} must be a binary organ mask in {{0, 1}}, found values [{shown}]; select one organ first "
                "(e.g. label == organ_id)."
            )

    # ------------------------------------------------------------------ slices
    def _slices(self, volume: torch.Tensor, index: torch.Tensor, mode: str, device: torch.device) -> torch.Tensor:
        """``volume [1, C, H, W, D]`` at slice numbers ``index [n]`` -> ``[n, C', S, S]`` float32 on ``device``."""
        slices = volume[0][..., index.to(volume.device)].permute(3, 0, 1, 2)  # [n, C, H, W]
        slices = slices.to(device=device, dtype=torch.float32)
        if mode == "image" and slices.shape[1] == 1:
            slices = slices.expand(-1, 3, -1, -1)
        size = (self.spatial_size, self.spatial_size)
        if tuple(slices.shape[-2:]) != size and slices.shape[0] > 0:
            if mode == "image":
                shrink = slices.shape[-2] > size[0] or slices.shape[-1] > size[1]
                slices = F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=shrink)
                slices = slices.clamp(-1.0, 1.0)
            else:
                slices = F.interpolate(slices, size=size, mode="nearest-exact")
        return slices.contiguous()

    def _support(
        self, support_image: torch.Tensor, support_label: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The ``n_chunks`` support slices: images ``[n, 3, S, S]``, masks ``[n, 1, S, S]`` and slice numbers."""
        present = torch.nonzero(support_label[0, 0].flatten(0, 1).any(dim=0)).flatten().cpu()
        if present.numel() == 0:
            raise ValueError(
                "support_label is empty: the support volume's mask has no foreground voxel, so there is no support "
                "slice to take; pass the organ mask of the support volume."
            )
        picked = present[support_slice_indices(int(present.numel()), self.n_chunks)]
        images = self._slices(support_image, picked, "image", device)
        labels = self._slices(support_label, picked, "label", device)
        if not bool(labels.flatten(1).any(dim=1).all()):
            # Nearest resizing can drop a very thin structure; the network must still see a non-empty support.
            raise ValueError(
                f"support_label: a support slice's mask vanished when resized to {self.spatial_size}x"
                f"{self.spatial_size}; the organ is too small in slices {picked.tolist()}."
            )
        return images, labels, picked.tolist()

    # ------------------------------------------------------------------ core
    def _segment_chunks(
        self,
        network: Any,
        inputs: torch.Tensor,
        chunks: list[torch.Tensor],
        support: tuple[torch.Tensor, torch.Tensor],
        device: torch.device,
        bar: Any,
        contexts: dict[tuple[int, int | None], Any],
    ) -> dict[int, torch.Tensor]:
        """Segment the query slice numbers of each chunk with its support slice -> ``{slice: bool [S, S]}``.

        ``contexts`` caches ``network.encode_support`` per chunk and flip for the whole call: the support pass (VAE
        encoder, VTCT, support UNet pass) runs once per support slice, however many query batches and passes use it.
        """
        support_images, support_labels = support
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.amp and device.type == "cuda" else nullcontext()
        )
        # A slice [N, C, H, W] mirrored along volume axis a is flipped along its dim a + 2; None is the plain pass.
        passes: list[int | None] = [None, *(a + 2 for a in self.flip_axes)]
        mirror = lambda x, dim: x if dim is None else x.flip(dim)  # noqa: E731
        out: dict[int, torch.Tensor] = {}
        with autocast:
            for j, index in enumerate(chunks):
                if index.numel() == 0:
                    continue
                for dim in passes:
                    if (j, dim) not in contexts:
                        contexts[(j, dim)] = network.encode_support(
                            mirror(support_images[j : j + 1], dim), mirror(support_labels[j : j + 1], dim)
                        )
                for start in range(0, index.numel(), self.sw_batch_size):
                    batch_index = index[start : start + self.sw_batch_size]
                    queries = self._slices(inputs, batch_index, "image", device)
                    soft = sum(mirror(network.segment(mirror(queries, d), contexts[(j, d)]), d) for d in passes)
                    masks = network.binarize(soft / len(passes))  # x / 1 is x exactly
                    if tuple(masks.shape) != (queries.shape[0], 1, *queries.shape[-2:]):
                        raise ValueError(
                            f"network.binarize(network.segment(...)) returned shape {tuple(masks.shape)}, expected "
                            f"{(queries.shape[0], 1, *queries.shape[-2:])}."
                        )
                    masks = masks[:, 0].to(torch.bool)
                    for k, slice_number in enumerate(batch_index.tolist()):
                        out[slice_number] = masks[k]
                    if bar is not None:
                        bar.update(int(batch_index.numel()))
        return out

    def _split(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [index[a:b] for a, b in chunk_bounds(int(index.numel()), self.n_chunks)]

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., Any],
        *args: Any,
        support_image: torch.Tensor | None = None,
        support_label: torch.Tensor | None = None,
        query_label: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Segment the query volume.

        Parameters
        ----------
        inputs
            Query volume ``[1, C, H, W, D]``, ``C`` 1 or 3, intensities in ``[-1, 1]``.
        network
            A network with ``encode_support`` / ``segment`` / ``binarize`` (see the class docstring).
        support_image
            Support volume ``[1, C', Hs, Ws, Ds]``, ``C'`` 1 or 3, in ``[-1, 1]``; any in-plane size.
        support_label
            Binary organ mask of the support volume ``[1, 1, Hs, Ws, Ds]`` in ``{0, 1}``.
        query_label
            Binary organ mask of the query ``[1, 1, H, W, D]``; required when ``query_range="protocol"``
            (only its slice extent is used), ignored otherwise.

        Returns
        -------
        torch.Tensor
            ``[1, 1, H, W, D]`` float32 mask in ``{0, 1}`` on the query's grid and device (a ``MetaTensor``
            carrying the query's metadata when ``inputs`` is one).
        """
        if args or kwargs:
            # A misspelt keyword (e.g. ``support=``) must not be dropped silently, as MONAI's SliceInferer does.
            unexpected = [f"positional #{i + 2}" for i in range(len(args))] + sorted(kwargs)
            raise ValueError(
                f"SlidingSupportInferer got unexpected arguments {unexpected}; it takes inputs, network, support_image, "
                "support_label and query_label."
            )
        for name in ("encode_support", "segment", "binarize"):
            if not callable(getattr(network, name, None)):
                raise ValueError(
                    f"network {type(network).__name__} has no '{name}' method; SlidingSupportInferer needs the "
                    "SDFSMIS interface (encode_support, segment, binarize)."
                )
        if support_image is None or support_label is None:
            raise ValueError("SlidingSupportInferer needs support_image and support_label (the annotated support volume).")
        self._check_volume("inputs (query volume)", inputs, (1, 3))
        self._check_volume("support_image", support_image, (1, 3))
        self._check_volume("support_label", support_label, (1,))
        if support_label.shape[2:] != support_image.shape[2:]:
            raise ValueError(
                f"support_label {tuple(support_label.shape)} and support_image {tuple(support_image.shape)} must have "
                "the same spatial shape."
            )
        # MetaTensor bookkeeping on every slicing op is slow; the metadata is put back on the output only.
        query, support_image, support_label = (
            x.as_tensor() if isinstance(x, MetaTensor) else x for x in (inputs, support_image, support_label)
        )
        if isinstance(query_label, MetaTensor):
            query_label = query_label.as_tensor()
        self._check_finite("inputs (query volume)", query)
        self._check_finite("support_image", support_image)
        if support_label.is_floating_point():
            self._check_finite("support_label", support_label)
        if query_label is not None and query_label.is_floating_point():
            self._check_finite("query_label", query_label)
        self._check_range("inputs (query volume)", query)
        self._check_range("support_image", support_image)
        self._check_mask("support_label", support_label)
        if self.query_range == "protocol":
            if query_label is None:
                raise ValueError(
                    "query_range='protocol' needs query_label (the query's organ mask, to select its organ slices); "
                    "use query_range='all' when the query has no annotation."
                )
            self._check_volume("query_label", query_label, (1,))
            if query_label.shape[2:] != inputs.shape[2:]:
                raise ValueError(
                    f"query_label {tuple(query_label.shape)} and the query volume {tuple(inputs.shape)} must have the "
                    "same spatial shape."
                )
            self._check_mask("query_label", query_label)

        device = self.device if self.device is not None else network_device(network)
        height, width, depth = (int(s) for s in inputs.shape[2:])
        with torch.no_grad():
            support = self._support(support_image, support_label, device)[:2]
            contexts: dict[tuple[int, int | None], Any] = {}
            if self.query_range == "protocol":
                assert query_label is not None
                present = torch.nonzero(query_label[0, 0].flatten(0, 1).any(dim=0)).flatten().cpu()
                if present.numel() == 0:
                    raise ValueError(
                        "query_label is empty: the query's organ mask has no foreground voxel, so protocol mode has no "
                        "organ slice to segment; use query_range='all' for unannotated queries."
                    )
                bar = progress_bar(total=int(present.numel()), desc="query slices") if self.progress else None
                predicted = self._segment_chunks(network, query, self._split(present), support, device, bar, contexts)
                keep = present.tolist()
            else:
                every = torch.arange(depth)
                bar = progress_bar(total=depth, desc="query slices (pass 1)") if self.progress else None
                first_chunks = self._split(every)
                first = self._segment_chunks(network, query, first_chunks, support, device, bar, contexts)
                if bar is not None:
                    bar.close()
                extent = largest_run([bool(first[d].any()) for d in range(depth)])
                predicted, keep, bar = {}, [], None
                if extent is not None:
                    first_chunk_of = {int(d): j for j, c in enumerate(first_chunks) for d in c.tolist()}
                    second_chunks = self._split(torch.arange(*extent))
                    redo: list[torch.Tensor] = []
                    for j, chunk in enumerate(second_chunks):
                        same = [d for d in chunk.tolist() if first_chunk_of[d] == j]
                        predicted.update({d: first[d] for d in same})
                        redo.append(torch.tensor([d for d in chunk.tolist() if first_chunk_of[d] != j], dtype=torch.long))
                    n_redo = sum(int(r.numel()) for r in redo)
                    if self.progress and n_redo:
                        bar = progress_bar(total=n_redo, desc="query slices (pass 2)")
                    predicted.update(self._segment_chunks(network, query, redo, support, device, bar, contexts))
                    keep = list(range(*extent))
            if bar is not None:
                bar.close()

            output = torch.zeros((depth, 1, self.spatial_size, self.spatial_size), dtype=torch.float32, device=device)
            if keep:
                output[keep, 0] = torch.stack([predicted[d] for d in keep]).to(torch.float32)
            if (height, width) != (self.spatial_size, self.spatial_size):
                output = F.interpolate(output, size=(height, width), mode="nearest-exact")
            output = self.postprocess(output.permute(1, 2, 3, 0).unsqueeze(0))  # [1, 1, H, W, D]
        if isinstance(inputs, MetaTensor):
            return convert_to_dst_type(output, inputs, dtype=torch.float32)[0]
        return output.to(device=inputs.device)
