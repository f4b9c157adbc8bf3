"""The two UNet passes of :class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS` and the :class:`SupportContext` between them.

:func:`support_pass` turns support slices into a :class:`SupportContext` (their VAE latents, the text-like condition,
the QE prototype and, with SII, the support UNet pass's per-block features); :func:`query_pass` predicts the mask
latents of query slices from their image latents and a context, in one UNet call and one step. Since nothing else
travels from one pass to the other, one support serves any number of queries, and :meth:`SupportContext.fuse` makes
one context of ``k`` supports. The functions read the network's parts and settings and keep no state::

    ctx = support_pass(net, support_image[Bs, 3, H, W], support_label[Bs, 1, H, W])   # with autograd
    x0 = query_pass(net, query_latent[Bq, 4, h, w], ctx)                              # [Bq, 4, h, w]
"""

from __future__ import annotations

__all__ = ["SupportContext", "support_pass", "query_pass"]

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from monai_sdfsmis.networks.one_step import predict_original_sample
from monai_sdfsmis.networks.sqi import SUPPORT_FEATURES_KEY, SUPPORT_STORE_KEY, match_support_batch

if TYPE_CHECKING:
    from monai_sdfsmis.networks.sdfsmis import SDFSMIS


@dataclass
class SupportContext:
    """Everything the query pass needs from a support slice, computed once by
    :meth:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS.encode_support`.

    Attributes
    ----------
    image_latent
        ``[Bs, 4, h, w]`` scaled VAE latent of the support image.
    mask_latent
        ``[Bs, 4, h, w]`` scaled VAE latent of the support mask (3 channels in ``{-1, 1}``).
    condition
        ``[Bs, T, D]`` text-like condition of the query pass (VTCT output, or the empty-prompt embedding).
    prototype
        ``[Bs, K, 4]`` QE support prototype(s), ``None`` without QE.
    features
        Per transformer block (module name -> ``[Bs, L, C]``) normed support hidden states from the
        support UNet pass, ``None`` without SII.
    """

    image_latent: torch.Tensor
    mask_latent: torch.Tensor
    condition: torch.Tensor
    prototype: torch.Tensor | None = None
    features: dict[str, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.image_latent.shape[0])

    def to(self, *args: Any, **kwargs: Any) -> SupportContext:
        """``Tensor.to`` applied to every tensor (e.g. ``ctx.to("cuda")``)."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = value.to(*args, **kwargs)
            elif isinstance(value, dict):
                changes[f.name] = {k: v.to(*args, **kwargs) for k, v in value.items()}
        return replace(self, **changes)

    @classmethod
    def fuse(cls, contexts: Sequence[SupportContext]) -> SupportContext:
        """One context from the contexts of ``k`` support slices (k-shot fusion inside the network, as DiffewS).

        Each SII block attends to the tokens of all ``k`` supports (their features concatenated along the token
        axis, so the attention's softmax runs over every support's tokens); the QE prototypes, the VTCT conditions
        and the latents are averaged over the supports. One query pass then uses all supports.

        Parameters
        ----------
        contexts
            ``k`` contexts of one support slice each (``batch_size`` 1), from
            :meth:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS.encode_support`.
        """
        if not contexts or any(c.batch_size != 1 for c in contexts):
            raise ValueError("fusing supports takes one or more contexts of one support slice each (batch size 1).")
        if len(contexts) == 1:
            return contexts[0]

        def mean(name: str) -> torch.Tensor | None:
            values = [getattr(c, name) for c in contexts]
            return None if values[0] is None else torch.stack(values).mean(dim=0)

        features = None
        if contexts[0].features is not None:
            features = {key: torch.cat([c.features[key] for c in contexts], dim=1) for key in contexts[0].features}
        return cls(mean("image_latent"), mean("mask_latent"), mean("condition"), mean("prototype"), features)


def support_pass(
    network: SDFSMIS,
    support_image: torch.Tensor,
    support_label: torch.Tensor,
    image_latent: torch.Tensor | None = None,
    mask_latent: torch.Tensor | None = None,
) -> SupportContext:
    """The support side of ``network``, with autograd: the :class:`SupportContext` of ``Bs`` support slices.

    ``SDFSMIS.encode_support`` runs it without gradients after its input checks; ``SDFSMIS.compute_loss`` runs it
    with the support latents it already has.

    Parameters
    ----------
    network
        The :class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS` whose autoencoder, condition, QE and UNet are used.
    support_image
        ``[Bs, 3, H, W]`` in ``[-1, 1]``.
    support_label
        ``[Bs, 1, H, W]`` in ``{0, 1}``; every mask needs a foreground pixel.
    image_latent, mask_latent
        ``[Bs, 4, h, w]`` scaled VAE latents of the support images and masks, where the caller has them;
        ``None`` encodes both here.

    Returns
    -------
    SupportContext
        ``batch_size`` ``Bs``; ``prototype`` is ``None`` without QE, ``features`` ``None`` without SII.
    """
    empty = (support_label.flatten(1).amax(dim=1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"support mask is empty (batch items {empty}): a support needs at least one foreground pixel."
        )
    if image_latent is None or mask_latent is None:
        latents = network.encode_latents(torch.cat([support_image, network.mask_to_image(support_label)]))
        image_latent, mask_latent = latents.chunk(2)
    config = network.config
    condition = network.condition(support_image, support_label)
    prototype = network.qe.support_prototype(image_latent, support_label) if network.qe is not None else None
    features: dict[str, torch.Tensor] | None = None
    if config.use_sii:
        support_cond = condition
        if config.support_condition == "empty":
            support_cond = network.empty_prompt_embedding.expand(support_image.shape[0], -1, -1)
        # Passed explicitly (not through network.bank), so checkpointed and compiled UNets see it as an input.
        features = {}
        network.unet.run_branch(
            torch.cat([image_latent, mask_latent], dim=1), config.timestep, support_cond, "support",
            {SUPPORT_STORE_KEY: features},
        )
    return SupportContext(image_latent, mask_latent, condition, prototype, features)


def query_pass(network: SDFSMIS, query_latent: torch.Tensor, context: SupportContext) -> torch.Tensor:
    """The query side of ``network``: QE, the query UNet pass and the one step, against a support's context.

    Parameters
    ----------
    network
        The :class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS` whose QE, UNet and one-step scheduler are used.
    query_latent
        ``[Bq, 4, h, w]`` scaled VAE latent of the query images; ``Bq`` equals ``context.batch_size`` (pairs) or
        is a multiple of it (one support, many queries: query ``i`` uses support ``i // (Bq // Bs)``).
    context
        From :func:`support_pass`; it carries the support features when the network uses SII.

    Returns
    -------
    torch.Tensor
        ``[Bq, 4, h, w]`` predicted mask latent ``x0`` (plus the support's mask latent with
        ``residual_from_support``).
    """
    config = network.config
    batch = query_latent.shape[0]
    sample = network.qe.enhance(query_latent, context.prototype) if network.qe is not None else query_latent
    condition = match_support_batch(context.condition, batch, "support condition")
    features = None
    if config.use_sii:
        if context.features is None:
            raise ValueError("this SupportContext has no support features but the network uses SII.")
        features = {SUPPORT_FEATURES_KEY: context.features}
    output = network.unet.run_branch(sample, config.timestep, condition, "query", features)
    x0 = predict_original_sample(network.scheduler, output, query_latent, config.timestep)
    if config.residual_from_support:
        x0 = x0 + match_support_batch(context.mask_latent, batch, "support mask latent").to(x0.dtype)
    return x0
