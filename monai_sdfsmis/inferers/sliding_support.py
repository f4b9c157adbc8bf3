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
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

from monai_sdfsmis.inferers.alignment import check_support_alignment
from monai_sdfsmis.inferers.chunks import ChunkSegmenter, SliceContexts, segment_longest_run
from monai_sdfsmis.inferers.inputs import (
    check_call_arguments,
    check_finite,
    check_range,
    check_volume,
    checked_organ_ids,
    checked_query_label,
    checked_supports,
    network_uses_support,
)
from monai_sdfsmis.inferers.probabilities import foreground_probability, organ_label_map
from monai_sdfsmis.inferers.slices import (
    check_flip_axes,
    flip_passes,
    foreground_slices,
    largest_run,
    split_chunks,
    support_slices,
    volume_from_slices,
)
from monai_sdfsmis.progress import progress_bar
from monai_sdfsmis.transforms.postprocess import OrganMaskPostprocess

QUERY_RANGES = ("protocol", "all")
#: k-shot fusion: average the supports' soft masks, fuse their contexts inside the network (``fuse_supports``), or take
#: for each query slice the soft mask of the support whose slice is most like it.
SUPPORT_FUSIONS = ("average", "network", "nearest")


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
    ``spatial_size x spatial_size`` and the masks back to the query's grid (:mod:`monai_sdfsmis.inferers.slices`);
    the network calls, batching and caches are :class:`~monai_sdfsmis.inferers.chunks.ChunkSegmenter`'s.

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
        to the tokens of all supports) and runs one query pass per chunk; ``"nearest"`` segments each chunk with every
        support and keeps, for each query slice, the soft mask of the support whose chunk slice correlates best with
        it (:func:`~monai_sdfsmis.inferers.chunks.nearest_support`; any network, the copy baseline too).
    organ_ids
        The organ(s) a support-free network segments when a call gives no ``organ_id`` (see :meth:`__call__`).
    support_alignment
        ``"none"`` (the paper) or ``"body_box"``: each support slice, image and mask, is mapped onto the body bounding
        box of the query chunk it segments before it is encoded (:mod:`monai_sdfsmis.inferers.alignment`); in
        deployment mode every slice of the organ's run is then segmented again in the second pass.
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
        support_alignment: str = "none",
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
        self.organ_ids = None if organ_ids is None else checked_organ_ids(list(organ_ids))
        self.support_alignment = check_support_alignment(support_alignment)

    # ------------------------------------------------------------------ one organ
    def _segment_organ(
        self,
        segmenter: ChunkSegmenter,
        supports: list[tuple[torch.Tensor, torch.Tensor]],
        query_label: torch.Tensor | None,
        with_soft: bool,
        context: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One organ of the query: its mask ``[1, 1, H, W, D]`` (post-processed) and, ``with_soft``, its
        :func:`foreground_probability` ``[1, 1, H, W, D]`` (else ``None``). ``context``: a support-free network's
        organ context, used for every chunk and flip in place of the supports'."""
        contexts: SliceContexts = {}
        if context is not None:
            support: list[Any] = [None]
            contexts.update({(0, j, d): context for j in range(self.n_chunks) for d in segmenter.passes})
        else:
            names = ["support_label"] if len(supports) == 1 else [f"support_label[{k}]" for k in range(len(supports))]
            support = [
                support_slices(image, label, self.n_chunks, self.spatial_size, segmenter.device, name)[:2]
                for (image, label), name in zip(supports, names)
            ]
        if self.query_range == "protocol":
            assert query_label is not None
            present = foreground_slices(query_label)
            if present.numel() == 0:
                raise ValueError(
                    "query_label is empty: the query's organ mask has no foreground voxel, so protocol mode has no "
                    "organ slice to segment; use query_range='all' for unannotated queries."
                )
            bar = progress_bar(total=int(present.numel()), desc="query slices") if self.progress else None
            predicted = segmenter(split_chunks(present, self.n_chunks), support, contexts, bar)
            keep = present.tolist()
        else:
            predicted, keep, bar = segment_longest_run(
                segmenter, support, contexts, self.n_chunks, self.progress, rechunk=context is None
            )
        if bar is not None:
            bar.close()
        # channel 0 the mask; for probabilities, channel 1 the soft mask (-1 off the segmented range)
        output = volume_from_slices(
            predicted, keep, segmenter.query.shape[2:], self.spatial_size, segmenter.device, with_soft
        )
        mask = self.postprocess(output[:, :1])
        return mask, foreground_probability(output[:, 1:], mask) if with_soft else None

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
        check_call_arguments(args, kwargs)
        uses_support = network_uses_support(network)
        check_volume("inputs (query volume)", inputs, (1, 3))
        supports, organ_ids = self._checked_supports(network, uses_support, support_image, support_label, organ_id)
        n_organs = int(supports[0][1].shape[1]) if uses_support else len(organ_ids)
        # MetaTensor bookkeeping on every slicing op is slow; the metadata is put back on the output only.
        query = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        check_finite("inputs (query volume)", query)
        check_range("inputs (query volume)", query)
        query_label = checked_query_label(query_label, query, n_organs, needed=self.query_range == "protocol")

        device = self.device if self.device is not None else network_device(network)
        segmenter = ChunkSegmenter(
            network, query, device, self.spatial_size, self.sw_batch_size, flip_passes(self.flip_axes),
            fusion=self.support_fusion, amp=self.amp, support_alignment=self.support_alignment,
        )
        with torch.no_grad():
            masks, probabilities = [], []
            for organ in range(n_organs):
                mask, probability = self._segment_organ(
                    segmenter,
                    [(image, label[:, organ : organ + 1]) for image, label in supports],
                    None if query_label is None else query_label[:, organ : organ + 1],
                    self.probabilities or n_organs > 1,
                    None if uses_support else network.organ_context(organ_ids[organ]),
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

    def _checked_supports(
        self, network: Any, uses_support: bool, support_image: Any, support_label: Any, organ_id: Any
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
        """The checked supports (few-shot network) or organ ids (support-free network)."""
        if not uses_support:
            return [], checked_organ_ids(self.organ_ids if organ_id is None else organ_id)
        supports = checked_supports(support_image, support_label)
        if len(supports) > 1 and self.support_fusion == "network" and not callable(getattr(network, "fuse_supports", None)):
            raise ValueError(
                f"support_fusion='network' needs a network with fuse_supports; {type(network).__name__} has none "
                "(use support_fusion='average')."
            )
        return supports, []
