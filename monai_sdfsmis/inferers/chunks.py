"""The network side of the sliding-support inference: chunks of query slices segmented with their support slices.

:class:`ChunkSegmenter` holds one call's query volume, network and caches. Support contexts are cached per
(support, chunk, flip) by the caller's ``contexts`` dict (one per organ), so the support pass (autoencoder encoder,
VTCT, support UNet pass) runs once per support slice however many query batches use it; query latents are cached
per (slice, flip) for the whole call when the network splits ``segment`` into ``encode_latents`` /
``predict_mask_latent`` / ``decode_mask`` (as SDFSMIS does), so every support and organ shares one encoding of
each query slice.
"""

from __future__ import annotations

__all__ = ["ChunkSegmenter", "SliceContexts", "SlicePredictions", "nearest_support", "segment_longest_run"]

import itertools
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from monai_sdfsmis.inferers.alignment import align_support, body_box, check_support_alignment
from monai_sdfsmis.inferers.slices import largest_run, mirror, resize_slices, split_chunks
from monai_sdfsmis.progress import progress_bar

#: ``{(support k or -1 for the fused supports, chunk key, flip dim or None): network context}``; the chunk key is the
#: chunk's number ``j``, and with support alignment ``(j, first slice, last slice)``, since the aligned support slice
#: depends on the query slices of the chunk.
SliceContexts = dict[tuple[int, Any, "int | None"], Any]
#: ``{slice number: (mask bool [S, S], soft mask float32 [S, S] in [-1, 1])}``.
SlicePredictions = dict[int, tuple[torch.Tensor, torch.Tensor]]

_SPLIT_SEGMENT = ("encode_latents", "predict_mask_latent", "decode_mask")


class ChunkSegmenter:
    """Segment chunks of one query volume's slices, chunk ``j`` with slice ``j`` of every support.

    Parameters
    ----------
    network
        ``encode_support``, ``segment``, ``binarize`` (and ``fuse_supports`` for ``fusion="network"``).
    query
        The query volume ``[1, C, H, W, D]`` (plain tensor), ``C`` 1 or 3, in ``[-1, 1]``.
    device
        Where slices are computed.
    spatial_size
        ``S``, the network's in-plane size.
    sw_batch_size
        Query slices per network call.
    passes
        Flip passes (:func:`~monai_sdfsmis.inferers.slices.flip_passes`): ``None`` and slice dims to mirror.
    fusion
        With several supports (:data:`~monai_sdfsmis.inferers.sliding_support.SUPPORT_FUSIONS`): ``"average"`` the
        soft masks of every support; ``"network"``: fuse their contexts with ``network.fuse_supports`` (one query
        pass per chunk); ``"nearest"``: each query slice takes the soft mask of the support whose chunk slice is
        most like it (:func:`nearest_support`).
    amp
        bf16 autocast on CUDA (CPU runs fp32).
    support_alignment
        ``"none"`` or ``"body_box"``: each support slice mapped onto the body box of the query chunk it segments
        (:func:`~monai_sdfsmis.inferers.alignment.align_support`) before it is encoded.
    """

    def __init__(
        self,
        network: Any,
        query: torch.Tensor,
        device: torch.device,
        spatial_size: int,
        sw_batch_size: int,
        passes: Sequence[int | None],
        fusion: str = "average",
        amp: bool = True,
        support_alignment: str = "none",
    ) -> None:
        check_support_alignment(support_alignment)
        self.network = network
        self.query = query
        self.device = device
        self.spatial_size = int(spatial_size)
        self.sw_batch_size = int(sw_batch_size)
        self.passes = list(passes)
        self.fusion = fusion
        self.align = support_alignment == "body_box"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
        splits = all(callable(getattr(network, name, None)) for name in _SPLIT_SEGMENT)
        self.latents: dict[tuple[int, int | None], torch.Tensor] | None = {} if splits else None

    def __call__(
        self,
        chunks: Sequence[torch.Tensor],
        supports: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
        contexts: SliceContexts,
        bar: Any = None,
    ) -> SlicePredictions:
        """Segment the slice numbers of each chunk -> ``{slice: (mask, soft)}``.

        Parameters
        ----------
        chunks
            Slice numbers ``[n_j]`` per chunk.
        supports
            Per support volume, its chunk slices ``(images [n, 3, S, S], masks [n, 1, S, S])``; a support-free
            network passes ``[None]`` with every ``(0, j, flip)`` context already in ``contexts``.
        contexts
            The context cache of this organ (filled here).
        bar
            Progress bar updated per batch, or ``None``.

        Returns
        -------
        SlicePredictions
            The soft masks of every support and flip pass averaged, then binarized by the network.
        """
        out: SlicePredictions = {}
        with self.autocast:
            for j, index in enumerate(chunks):
                if index.numel() == 0:
                    continue
                key = self._chunk_key(j, index, supports)
                runs = self._contexts_of_chunk(j, key, index, supports, contexts)
                candidates = None
                if self.fusion == "nearest" and len(supports) > 1:
                    target = self._body_box(index)
                    candidates = torch.cat([self._support_slice(supports, k, j, target)[0] for k in range(len(supports))])
                for start in range(0, index.numel(), self.sw_batch_size):
                    batch_index = index[start : start + self.sw_batch_size]
                    out.update(
                        self._segment_batch(batch_index, [(k, contexts[(k, key, d)], d) for k, d in runs], candidates)
                    )
                    if bar is not None:
                        bar.update(int(batch_index.numel()))
        return out

    def _chunk_key(self, j: int, index: torch.Tensor, supports: Sequence[Any]) -> Any:
        """Key of chunk ``j``'s contexts (see :data:`SliceContexts`); a support-free network's is ``j``."""
        if not self.align or supports[0] is None:
            return j
        return (j, int(index[0]), int(index[-1]))

    def _contexts_of_chunk(
        self,
        j: int,
        key: Any,
        index: torch.Tensor,
        supports: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
        contexts: SliceContexts,
    ) -> list[tuple[int, int | None]]:
        """Encode (once) the supports' slice ``j`` for every flip pass; the ``(support, flip)`` runs of chunk ``j``."""
        runs = list(itertools.product(range(len(supports)), self.passes))
        todo = [k for k in range(len(supports)) if not all((k, key, dim) in contexts for dim in self.passes)]
        target = self._body_box(index) if todo else None  # once for all the chunk's supports
        for k in todo:
            image, label = self._support_slice(supports, k, j, target)
            for dim in self.passes:
                contexts[(k, key, dim)] = self.network.encode_support(mirror(image, dim), mirror(label, dim))
        if not (self.fusion == "network" and len(supports) > 1):
            return runs
        for dim in self.passes:
            if (-1, key, dim) not in contexts:
                contexts[(-1, key, dim)] = self.network.fuse_supports(
                    [contexts[(k, key, dim)] for k in range(len(supports))]
                )
        return [(-1, dim) for dim in self.passes]  # -1: the fused context

    def _body_box(self, index: torch.Tensor) -> Any:
        """The body box of the query slices ``index`` when the supports are aligned to it, else ``None``."""
        if not self.align:
            return None
        return body_box(resize_slices(self.query, index, "image", self.spatial_size, self.device))

    def _support_slice(
        self, supports: Sequence[Any], k: int, j: int, target: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Support ``k``'s slice ``j``, image ``[1, 3, S, S]`` and mask ``[1, 1, S, S]``, aligned to ``target``."""
        images, labels = supports[k]
        image, label = images[j : j + 1], labels[j : j + 1]
        return align_support(image, label, target) if self.align else (image, label)

    def _segment_batch(
        self,
        slice_numbers: torch.Tensor,
        runs: list[tuple[int, Any, int | None]],
        candidates: torch.Tensor | None = None,
    ) -> SlicePredictions:
        """The slices' soft masks of every ``(support k, context, flip)`` run, averaged, then binarized.

        With ``candidates`` (the chunk's support slices ``[K, 3, S, S]``), each slice is run with (and averages) only
        the runs of its nearest support (:func:`nearest_support`).
        """
        queries = resize_slices(self.query, slice_numbers, "image", self.spatial_size, self.device)
        if candidates is None:
            soft = sum(mirror(self._soft_masks(mirror(queries, d), slice_numbers, d, context), d) for _, context, d in runs)
            soft = soft / len(runs)  # x / 1 is x exactly
        else:
            # Only each slice's nearest support is run on it: k supports cost one support's query passes.
            nearest = nearest_support(queries, candidates)  # [B]
            soft = torch.zeros(queries.shape[0], 1, *queries.shape[-2:], device=queries.device)
            for k, context, d in runs:
                picked = (nearest == k).nonzero().flatten()
                if picked.numel():
                    own = mirror(self._soft_masks(mirror(queries[picked], d), slice_numbers[picked], d, context), d)
                    soft[picked] += own.float()
            soft = soft / len(self.passes)
        masks = self.network.binarize(soft)
        if tuple(masks.shape) != (queries.shape[0], 1, *queries.shape[-2:]):
            raise ValueError(
                f"network.binarize(network.segment(...)) returned shape {tuple(masks.shape)}, expected "
                f"{(queries.shape[0], 1, *queries.shape[-2:])}."
            )
        masks = masks[:, 0].to(torch.bool)
        return {d: (masks[i], soft[i, 0].float()) for i, d in enumerate(slice_numbers.tolist())}

    def _soft_masks(
        self, queries: torch.Tensor, slice_numbers: torch.Tensor, flip: int | None, context: Any
    ) -> torch.Tensor:
        """``network.segment(queries, context)``, with the query latents taken from (and added to) the cache."""
        if self.latents is None:
            return self.network.segment(queries, context)
        keys = [(d, flip) for d in slice_numbers.tolist()]
        todo = [i for i, key in enumerate(keys) if key not in self.latents]
        if todo:
            for i, latent in zip(todo, self.network.encode_latents(queries[todo])):
                self.latents[keys[i]] = latent
        stacked = torch.stack([self.latents[key] for key in keys])
        return self.network.decode_mask(self.network.predict_mask_latent(stacked, context))


def nearest_support(queries: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
    """For each query slice, the support slice most like it: the highest normalised cross-correlation of the images.

    NCC (the Pearson correlation of the pixel values) ignores a linear change of intensity, which is all that the
    per-volume intensity scaling of two scans leaves between them, and is high when the body and its organs lie at the
    same places in the field of view.

    Parameters
    ----------
    queries
        ``[B, C, S, S]`` query slices (channel 0 is used; the channels are copies of one image).
    supports
        ``[K, C, S, S]`` support slices of the same size.

    Returns
    -------
    torch.Tensor
        ``[B]`` long, the index in ``0..K-1`` of each query's nearest support (the first one on ties).
    """

    def standardised(images: torch.Tensor) -> torch.Tensor:
        flat = images[:, 0].flatten(1).float()
        flat = flat - flat.mean(dim=1, keepdim=True)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)

    return (standardised(queries) @ standardised(supports).T).argmax(dim=1)


def segment_longest_run(
    segmenter: ChunkSegmenter,
    supports: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    contexts: SliceContexts,
    n_chunks: int,
    progress: bool = False,
    rechunk: bool = True,
) -> tuple[SlicePredictions, list[int], Any]:
    """Deployment mode (no query label): which slices hold the organ, and their masks.

    A first pass segments every slice of the query in ``n_chunks`` chunks; the organ's extent is the longest run of
    consecutive slices with predicted foreground, which is re-chunked and segmented again (slices whose chunk does
    not change keep their first-pass prediction, unless the supports are aligned to their chunks). ``rechunk=False`` (one context for every chunk, a support-free
    network) keeps the first pass's predictions of the run.

    Returns
    -------
    tuple
        The predictions per slice of the run, the run's slice numbers and the open progress bar (or ``None``).
    """
    depth = int(segmenter.query.shape[-1])
    bar = progress_bar(total=depth, desc="query slices (pass 1)") if progress else None
    first_chunks = split_chunks(torch.arange(depth), n_chunks)
    first = segmenter(first_chunks, supports, contexts, bar)
    if bar is not None:
        bar.close()
    extent = largest_run([bool(first[d][0].any()) for d in range(depth)])
    if extent is None:
        return {}, [], None
    if not rechunk:
        return {d: first[d] for d in range(*extent)}, list(range(*extent)), None
    predicted: SlicePredictions = {}
    first_chunk_of = {int(d): j for j, c in enumerate(first_chunks) for d in c.tolist()}
    redo: list[torch.Tensor] = []
    for j, chunk in enumerate(split_chunks(torch.arange(*extent), n_chunks)):
        # An aligned support depends on its whole chunk, so with alignment every slice of the run is redone.
        same = set() if segmenter.align else {d for d in chunk.tolist() if first_chunk_of[d] == j}
        predicted.update({d: first[d] for d in same})
        redo.append(torch.tensor([d for d in chunk.tolist() if d not in same], dtype=torch.long))
    n_redo = sum(int(r.numel()) for r in redo)
    bar = progress_bar(total=n_redo, desc="query slices (pass 2)") if progress and n_redo else None
    predicted.update(segmenter(redo, supports, contexts, bar))
    return predicted, list(range(*extent)), bar
