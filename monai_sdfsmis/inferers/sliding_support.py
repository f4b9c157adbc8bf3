"""Segment a query volume slice by slice with support slices taken from an annotated support volume.

The few-shot protocol of RPT/ADNet (RPT's within-domain evaluation): the support organ's slices are split into
``n_chunks`` parts and the middle slice of each part is a support slice; the query slices are split
into as many contiguous chunks, and chunk ``j`` is segmented with support slice ``j`` (1-shot per
slice). The support is encoded once per chunk and reused by both passes of the deployment mode, and the
chunk's query slices go through the network in batches (on CUDA under bf16 autocast by default).
"""

from __future__ import annotations

__all__ = [
    "SUPPORT_FUSIONS",
    "SlidingSupportInferer",
    "check_flip_axes",
    "foreground_probability",
    "largest_run",
    "network_device",
    "organ_label_map",
]

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
#: k-shot fusion: average the supports' soft masks, or fuse their contexts inside the network (``fuse_supports``).
SUPPORT_FUSIONS = ("average", "network")
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


def foreground_probability(soft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft mask in ``[-1, 1]`` -> probability ``(soft + 1) / 2`` in ``[0, 1]`` that thresholds to ``mask`` at 0.5.

    Where ``mask`` is 1 the probability is raised to at least the next float32 above 0.5, elsewhere lowered to at
    most 0.5, so ``probability > 0.5`` reproduces ``mask`` exactly (a relative binarization threshold or a removed
    island would otherwise disagree with a plain 0.5 cut). Same shape as ``soft``, float32.
    """
    return _agree_at_half(((soft.float() + 1.0) / 2.0).clamp(0.0, 1.0), mask)


def _agree_at_half(probability: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    half = torch.tensor(0.5, dtype=torch.float32, device=probability.device)
    above = torch.nextafter(half, torch.ones_like(half))
    return torch.where(mask.bool(), probability.clamp(min=above), probability.clamp(max=half))


def organ_label_map(masks: torch.Tensor, probabilities: torch.Tensor, with_probabilities: bool = False) -> torch.Tensor:
    """``K`` organs' masks and probabilities ``[1, K, H, W, D]`` -> one label map ``[1, 1, H, W, D]``.

    The label map holds ``k + 1`` where organ ``k``'s mask is 1 and 0 where no organ's is; a voxel in several masks
    goes to the organ with the higher probability (the first on a tie). ``with_probabilities``: the ``K``
    probabilities follow as channels ``1..K``, each > 0.5 exactly where the label map holds its organ.
    """
    inside = masks.bool()
    score = torch.where(inside, probabilities, torch.full_like(probabilities, -1.0))
    labels = torch.where(inside.any(dim=1, keepdim=True), score.argmax(dim=1, keepdim=True) + 1, 0).to(torch.float32)
    if not with_probabilities:
        return labels
    organs = torch.arange(1, masks.shape[1] + 1, device=labels.device, dtype=labels.dtype).view(1, -1, 1, 1, 1)
    return torch.cat([labels, _agree_at_half(probabilities, labels == organs)], dim=1)


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
    (``S = spatial_size``). :class:`monai_sdfsmis.networks.support_copy.SupportMaskCopy` is such a network. When the
    network also splits ``segment`` into ``encode_latents``, ``predict_mask_latent`` and ``decode_mask`` (as
    ``SDFSMIS`` does), each query slice is encoded once per call and flip, and every support and organ reuses it.

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
    probabilities
        Also return the organ's foreground probability as a second channel: ``(soft + 1) / 2`` of the (averaged)
        soft mask, resized like the mask and set just above 0.5 where the mask is 1 and to at most 0.5 elsewhere, so
        that ``probability > 0.5`` is exactly the mask, whatever the binarization rule and post-processing.
    support_fusion
        k-shot (several support volumes): ``"average"`` segments each chunk with every support and averages the soft
        masks; ``"network"`` fuses the supports' contexts with the network's ``fuse_supports`` (SDFSMIS: SII attends
        to the tokens of all supports) and runs one query pass per chunk.
    organ_ids
        The organ(s) a support-free network segments when a call gives no ``organ_id`` (see :meth:`__call__`).
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
        probabilities: bool = False,
        support_fusion: str = "average",
        organ_ids: Sequence[int] | None = None,
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
        self.probabilities = bool(probabilities)
        if support_fusion not in SUPPORT_FUSIONS:
            raise ValueError(f"support_fusion must be one of {SUPPORT_FUSIONS}, got {support_fusion!r}.")
        self.support_fusion = support_fusion
        self.organ_ids = None if organ_ids is None else self._checked_organ_ids(list(organ_ids))

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_volume(name: str, volume: Any, channels: Sequence[int] | None) -> torch.Tensor:
        """``channels`` ``None``: any number (an organ mask per channel)."""
        if not isinstance(volume, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [1, C, H, W, D], got {type(volume).__name__}.")
        allowed = "C >= 1" if channels is None else f"C in {tuple(channels)}"
        if volume.ndim != 5 or volume.shape[0] != 1 or (channels is not None and volume.shape[1] not in channels) or (
            volume.shape[1] < 1
        ):
            raise ValueError(
                f"{name} must be [1, C, H, W, D] with {allowed} (one volume, slices along the last axis), got shape "
                f"{tuple(volume.shape)}."
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

    @staticmethod
    def _checked_organ_ids(organ_id: Any) -> list[int]:
        """The organ ids a support-free network is asked for, as ints (a collated batch gives a tensor)."""
        if organ_id is None:
            raise ValueError(
                "this network segments without a support and needs organ_id (the label id(s) of the organ(s) to segment)."
            )
        values = torch.as_tensor(organ_id).flatten().tolist() if not isinstance(organ_id, (list, tuple)) else organ_id
        if not values or any(int(v) != v for v in values):
            raise ValueError(f"organ_id must be one or more integer label ids, got {organ_id!r}.")
        return [int(v) for v in values]

    def _checked_supports(
        self, support_image: Any, support_label: Any
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The support volumes and masks as plain tensors, each pair checked; one pair, or ``k`` for k-shot."""
        if support_image is None or support_label is None:
            raise ValueError("SlidingSupportInferer needs support_image and support_label (the annotated support volume).")
        several = isinstance(support_image, (list, tuple))
        images = list(support_image) if several else [support_image]
        labels = list(support_label) if isinstance(support_label, (list, tuple)) else [support_label]
        if not images or len(images) != len(labels):
            raise ValueError(
                f"got {len(images)} support image(s) and {len(labels)} support label(s); give one organ mask per "
                "support volume."
            )
        pairs = []
        for k, (image, label) in enumerate(zip(images, labels)):
            suffix = f"[{k}]" if several else ""
            image_name, label_name = f"support_image{suffix}", f"support_label{suffix}"
            self._check_volume(image_name, image, (1, 3))
            self._check_volume(label_name, label, None)
            if label.shape[1] != labels[0].shape[1]:
                raise ValueError(
                    f"{label_name} has {label.shape[1]} organ channel(s) but support_label[0] has "
                    f"{labels[0].shape[1]}; every support needs the same organs."
                )
            if label.shape[2:] != image.shape[2:]:
                raise ValueError(
                    f"{label_name} {tuple(label.shape)} and {image_name} {tuple(image.shape)} must have the same "
                    "spatial shape."
                )
            image, label = (x.as_tensor() if isinstance(x, MetaTensor) else x for x in (image, label))
            self._check_finite(image_name, image)
            if label.is_floating_point():
                self._check_finite(label_name, label)
            self._check_range(image_name, image)
            self._check_mask(label_name, label)
            pairs.append((image, label))
        return pairs

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
        self, support_image: torch.Tensor, support_label: torch.Tensor, device: torch.device,
        name: str = "support_label",
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The ``n_chunks`` support slices: images ``[n, 3, S, S]``, masks ``[n, 1, S, S]`` and slice numbers."""
        present = torch.nonzero(support_label[0, 0].flatten(0, 1).any(dim=0)).flatten().cpu()
        if present.numel() == 0:
            raise ValueError(
                f"{name} is empty: the support volume's mask has no foreground voxel, so there is no support "
                "slice to take; pass the organ mask of the support volume."
            )
        picked = present[support_slice_indices(int(present.numel()), self.n_chunks)]
        images = self._slices(support_image, picked, "image", device)
        labels = self._slices(support_label, picked, "label", device)
        if not bool(labels.flatten(1).any(dim=1).all()):
            # Nearest resizing can drop a very thin structure; the network must still see a non-empty support.
            raise ValueError(
                f"{name}: a support slice's mask vanished when resized to {self.spatial_size}x"
                f"{self.spatial_size}; the organ is too small in slices {picked.tolist()}."
            )
        return images, labels, picked.tolist()

    # ------------------------------------------------------------------ core
    def _segment_chunks(
        self,
        network: Any,
        inputs: torch.Tensor,
        chunks: list[torch.Tensor],
        supports: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        bar: Any,
        contexts: dict[tuple[int, int, int | None], Any],
        latents: dict[tuple[int, int | None], torch.Tensor] | None = None,
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Segment the query slice numbers of each chunk with its support slices -> ``{slice: (bool [S, S], soft [S, S])}``.

        Chunk ``j`` is segmented with slice ``j`` of every support volume; the soft masks of all supports and flip
        passes are averaged. ``contexts`` caches ``network.encode_support`` per support, chunk and flip for the whole
        call: the support pass (VAE encoder, VTCT, support UNet pass) runs once per support slice, however many query
        batches and passes use it. ``latents`` (a network with ``encode_latents`` / ``predict_mask_latent`` /
        ``decode_mask``) caches each query slice's latent per flip for the whole call, so supports and organs share
        one encoding of the query.
        """
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.amp and device.type == "cuda" else nullcontext()
        )
        passes = self._flip_passes()
        mirror = lambda x, dim: x if dim is None else x.flip(dim)  # noqa: E731
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with autocast:
            for j, index in enumerate(chunks):
                if index.numel() == 0:
                    continue
                runs = list(itertools.product(range(len(supports)), passes))
                for k, dim in runs:
                    if (k, j, dim) not in contexts:
                        images, labels = supports[k]
                        contexts[(k, j, dim)] = network.encode_support(
                            mirror(images[j : j + 1], dim), mirror(labels[j : j + 1], dim)
                        )
                if self.support_fusion == "network" and len(supports) > 1:
                    for dim in passes:
                        if (-1, j, dim) not in contexts:
                            contexts[(-1, j, dim)] = network.fuse_supports(
                                [contexts[(k, j, dim)] for k in range(len(supports))]
                            )
                    runs = [(-1, dim) for dim in passes]  # -1: the fused context
                for start in range(0, index.numel(), self.sw_batch_size):
                    batch_index = index[start : start + self.sw_batch_size]
                    queries = self._slices(inputs, batch_index, "image", device)
                    soft = sum(
                        mirror(self._soft_masks(network, mirror(queries, d), batch_index, d, contexts[(k, j, d)], latents), d)
                        for k, d in runs
                    )
                    soft = soft / len(runs)  # x / 1 is x exactly
                    masks = network.binarize(soft)
                    if tuple(masks.shape) != (queries.shape[0], 1, *queries.shape[-2:]):
                        raise ValueError(
                            f"network.binarize(network.segment(...)) returned shape {tuple(masks.shape)}, expected "
                            f"{(queries.shape[0], 1, *queries.shape[-2:])}."
                        )
                    masks = masks[:, 0].to(torch.bool)
                    for k, slice_number in enumerate(batch_index.tolist()):
                        out[slice_number] = (masks[k], soft[k, 0].float())
                    if bar is not None:
                        bar.update(int(batch_index.numel()))
        return out

    @staticmethod
    def _soft_masks(
        network: Any,
        queries: torch.Tensor,
        slice_numbers: torch.Tensor,
        flip: int | None,
        context: Any,
        latents: dict[tuple[int, int | None], torch.Tensor] | None,
    ) -> torch.Tensor:
        """``network.segment(queries, context)``, with the query latents taken from (and added to) ``latents``."""
        if latents is None:
            return network.segment(queries, context)
        keys = [(d, flip) for d in slice_numbers.tolist()]
        todo = [i for i, key in enumerate(keys) if key not in latents]
        if todo:
            for i, latent in zip(todo, network.encode_latents(queries[todo])):
                latents[keys[i]] = latent
        return network.decode_mask(network.predict_mask_latent(torch.stack([latents[key] for key in keys]), context))

    def _segment_organ(
        self,
        network: Any,
        query: torch.Tensor,
        supports: list[tuple[torch.Tensor, torch.Tensor]],
        query_label: torch.Tensor | None,
        device: torch.device,
        with_soft: bool,
        latents: dict[tuple[int, int | None], torch.Tensor] | None = None,
        context: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One organ of the query: its mask ``[1, 1, H, W, D]`` (post-processed) and, ``with_soft``, its
        :func:`foreground_probability` ``[1, 1, H, W, D]`` (else ``None``). ``context``: a support-free network's
        organ context, used for every chunk and flip in place of the supports'."""
        height, width, depth = (int(s) for s in query.shape[2:])
        contexts: dict[tuple[int, int, int | None], Any] = {}
        if context is not None:
            support: list[Any] = [None]
            contexts.update({(0, j, d): context for j in range(self.n_chunks) for d in self._flip_passes()})
        else:
            names = ["support_label"] if len(supports) == 1 else [f"support_label[{k}]" for k in range(len(supports))]
            support = [self._support(image, label, device, name)[:2] for (image, label), name in zip(supports, names)]
        if self.query_range == "protocol":
            assert query_label is not None
            present = torch.nonzero(query_label[0, 0].flatten(0, 1).any(dim=0)).flatten().cpu()
            if present.numel() == 0:
                raise ValueError(
                    "query_label is empty: the query's organ mask has no foreground voxel, so protocol mode has no "
                    "organ slice to segment; use query_range='all' for unannotated queries."
                )
            bar = progress_bar(total=int(present.numel()), desc="query slices") if self.progress else None
            predicted = self._segment_chunks(
                network, query, self._split(present), support, device, bar, contexts, latents
            )
            keep = present.tolist()
        else:
            predicted, keep, bar = self._segment_extent(
                network, query, support, device, contexts, latents, rechunk=context is None
            )
        if bar is not None:
            bar.close()

        # channel 0 the mask; for probabilities, channel 1 the soft mask (-1 off the segmented range)
        channels = 2 if with_soft else 1
        output = torch.zeros((depth, channels, self.spatial_size, self.spatial_size), dtype=torch.float32, device=device)
        output[:, 1:] = -1.0
        if keep:
            output[keep, 0] = torch.stack([predicted[d][0] for d in keep]).to(torch.float32)
            if with_soft:
                output[keep, 1] = torch.stack([predicted[d][1] for d in keep])
        if (height, width) != (self.spatial_size, self.spatial_size):
            output = F.interpolate(output, size=(height, width), mode="nearest-exact")
        output = output.permute(1, 2, 3, 0).unsqueeze(0)  # [1, channels, H, W, D]
        mask = self.postprocess(output[:, :1])
        return mask, foreground_probability(output[:, 1:], mask) if with_soft else None

    def _segment_extent(
        self,
        network: Any,
        query: torch.Tensor,
        support: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        contexts: dict[tuple[int, int, int | None], Any],
        latents: dict[tuple[int, int | None], torch.Tensor] | None = None,
        rechunk: bool = True,
    ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], list[int], Any]:
        """Deployment mode: a first pass over every slice, then the longest predicted run re-chunked (see the class
        docstring) -> predictions per slice, the kept slice numbers and the open progress bar (or ``None``).
        ``rechunk=False`` (one context for every chunk) keeps the first pass's predictions of the run."""
        depth = int(query.shape[-1])
        bar = progress_bar(total=depth, desc="query slices (pass 1)") if self.progress else None
        first_chunks = self._split(torch.arange(depth))
        first = self._segment_chunks(network, query, first_chunks, support, device, bar, contexts, latents)
        if bar is not None:
            bar.close()
        extent = largest_run([bool(first[d][0].any()) for d in range(depth)])
        if extent is None:
            return {}, [], None
        if not rechunk:
            return {d: first[d] for d in range(*extent)}, list(range(*extent)), None
        predicted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        first_chunk_of = {int(d): j for j, c in enumerate(first_chunks) for d in c.tolist()}
        redo: list[torch.Tensor] = []
        for j, chunk in enumerate(self._split(torch.arange(*extent))):
            same = [d for d in chunk.tolist() if first_chunk_of[d] == j]
            predicted.update({d: first[d] for d in same})
            redo.append(torch.tensor([d for d in chunk.tolist() if first_chunk_of[d] != j], dtype=torch.long))
        n_redo = sum(int(r.numel()) for r in redo)
        bar = progress_bar(total=n_redo, desc="query slices (pass 2)") if self.progress and n_redo else None
        predicted.update(self._segment_chunks(network, query, redo, support, device, bar, contexts, latents))
        return predicted, list(range(*extent)), bar

    def _flip_passes(self) -> list[int | None]:
        # A slice [N, C, H, W] mirrored along volume axis a is flipped along its dim a + 2; None is the plain pass.
        return [None, *(a + 2 for a in self.flip_axes)]

    def _split(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [index[a:b] for a, b in chunk_bounds(int(index.numel()), self.n_chunks)]

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., Any],
        *args: Any,
        support_image: torch.Tensor | Sequence[torch.Tensor] | None = None,
        support_label: torch.Tensor | Sequence[torch.Tensor] | None = None,
        query_label: torch.Tensor | None = None,
        organ_id: int | Sequence[int] | torch.Tensor | None = None,
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
            Support volume ``[1, C', Hs, Ws, Ds]``, ``C'`` 1 or 3, in ``[-1, 1]``; any in-plane size. k-shot: a
            sequence of ``k`` such volumes (each its own size); chunk ``j`` of the query is then segmented with
            support slice ``j`` of each of them and the ``k`` soft masks are averaged before binarizing.
        support_label
            Binary organ mask of the support volume ``[1, 1, Hs, Ws, Ds]`` in ``{0, 1}`` (k-shot: one per support).
            Several organs in one call: ``[1, K, Hs, Ws, Ds]``, one binary mask per organ; each organ is segmented
            as in a call of its own and the result is a label map (:func:`organ_label_map`).
        query_label
            Binary organ mask of the query ``[1, 1, H, W, D]`` (``[1, K, ...]`` for ``K`` organs); required when
            ``query_range="protocol"`` (only its slice extent is used), ignored otherwise.
        organ_id
            Label id(s) of the organ(s) for a network that needs no support (``uses_support = False``, the supervised
            :class:`~monai_sdfsmis.networks.supervised.SupervisedLatentSegmenter`): each organ is segmented with
            ``network.organ_context(organ_id)`` in place of a support context, and ``support_image`` /
            ``support_label`` are not read. Ignored by few-shot networks.

        Returns
        -------
        torch.Tensor
            ``[1, 1, H, W, D]`` float32 mask in ``{0, 1}`` (``[1, 2, H, W, D]`` with ``probabilities``: the mask, then
            :func:`foreground_probability`); for ``K`` organs the label map in ``{0, ..., K}`` (and, with
            ``probabilities``, the ``K`` organs' probabilities: ``[1, 1 + K, H, W, D]``); on the query's grid and
            device (a ``MetaTensor``
            carrying the query's metadata when ``inputs`` is one).
        """
        if args or kwargs:
            # A misspelt keyword (e.g. ``support=``) must not be dropped silently, as MONAI's SliceInferer does.
            unexpected = [f"positional #{i + 2}" for i in range(len(args))] + sorted(kwargs)
            raise ValueError(
                f"SlidingSupportInferer got unexpected arguments {unexpected}; it takes inputs, network, support_image, "
                "support_label, query_label and organ_id."
            )
        uses_support = getattr(network, "uses_support", True)
        needed = ("encode_support", "segment", "binarize") if uses_support else ("organ_context", "segment", "binarize")
        for name in needed:
            if not callable(getattr(network, name, None)):
                raise ValueError(
                    f"network {type(network).__name__} has no '{name}' method; SlidingSupportInferer needs the "
                    f"SDFSMIS interface ({', '.join(needed)})."
                )
        self._check_volume("inputs (query volume)", inputs, (1, 3))
        if uses_support:
            supports = self._checked_supports(support_image, support_label)
            n_organs = int(supports[0][1].shape[1])
        else:
            organ_ids = self._checked_organ_ids(self.organ_ids if organ_id is None else organ_id)
            supports, n_organs = [], len(organ_ids)
        if len(supports) > 1 and self.support_fusion == "network" and not callable(getattr(network, "fuse_supports", None)):
            raise ValueError(
                f"support_fusion='network' needs a network with fuse_supports; {type(network).__name__} has none "
                "(use support_fusion='average')."
            )
        # MetaTensor bookkeeping on every slicing op is slow; the metadata is put back on the output only.
        query = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        if isinstance(query_label, MetaTensor):
            query_label = query_label.as_tensor()
        self._check_finite("inputs (query volume)", query)
        if query_label is not None and query_label.is_floating_point():
            self._check_finite("query_label", query_label)
        self._check_range("inputs (query volume)", query)
        if self.query_range == "protocol":
            if query_label is None:
                raise ValueError(
                    "query_range='protocol' needs query_label (the query's organ mask, to select its organ slices); "
                    "use query_range='all' when the query has no annotation."
                )
            self._check_volume("query_label", query_label, (n_organs,))
            if query_label.shape[2:] != inputs.shape[2:]:
                raise ValueError(
                    f"query_label {tuple(query_label.shape)} and the query volume {tuple(inputs.shape)} must have the "
                    "same spatial shape."
                )
            self._check_mask("query_label", query_label)

        device = self.device if self.device is not None else network_device(network)
        with torch.no_grad():
            masks, probabilities = [], []
            splits = all(callable(getattr(network, n, None)) for n in ("encode_latents", "predict_mask_latent", "decode_mask"))
            latents: dict[tuple[int, int | None], torch.Tensor] | None = {} if splits else None
            for organ in range(n_organs):
                organ_supports = [(image, label[:, organ : organ + 1]) for image, label in supports]
                organ_query = None if query_label is None else query_label[:, organ : organ + 1]
                context = None if uses_support else network.organ_context(organ_ids[organ])
                mask, probability = self._segment_organ(
                    network, query, organ_supports, organ_query, device, self.probabilities or n_organs > 1, latents,
                    context,
                )
                masks.append(mask)
                probabilities.append(probability)
            if n_organs == 1:
                output = torch.cat([masks[0], probabilities[0]], dim=1) if self.probabilities else masks[0]
            else:
                output = organ_label_map(torch.cat(masks, dim=1), torch.cat(probabilities, dim=1), self.probabilities)
        if isinstance(inputs, MetaTensor):
            return convert_to_dst_type(output, inputs, dtype=torch.float32)[0]
        return output.to(device=inputs.device)
