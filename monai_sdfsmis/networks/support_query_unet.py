"""SD's UNet as SD-FSMIS uses it: two input convolutions and support-query interaction, saved and loaded by diffusers.

:class:`SupportQueryUNet` is a :class:`~diffusers.UNet2DConditionModel` whose config has one more key,
``support_query`` (``None`` for SD's plain UNet). When it is set, the UNet is built with a
:class:`DualConvIn` (one input convolution per branch) and with SII in every transformer block
(:func:`~monai_sdfsmis.networks.sqi.install_sii`), so diffusers' own round trip restores the whole network::

    unet = SupportQueryUNet.from_unet(sd_unet, {"use_qe": True, "use_sii": True, "shared_conv_in": False,
                                                "sii_mode": "sii"})        # SD's weights, Marigold-initialised convs
    unet.save_pretrained("folder")                                          # config.json + safetensors
    unet = SupportQueryUNet.from_pretrained("folder")                       # the same modules and weights

The module names are those SD-FSMIS has always used (``conv_in.query``, ``conv_in.support``, ``...attn_sq``), so
``model.pt`` files written before this class load unchanged.
"""

from __future__ import annotations

__all__ = ["SupportQueryUNet", "DualConvIn", "SUPPORT_QUERY_KEYS", "check_support_query"]

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from monai_sdfsmis.networks.sqi import SII_MODES, SupportBank, install_sii, sii_blocks

#: The keys of ``support_query`` in the UNet's config.
SUPPORT_QUERY_KEYS = ("use_qe", "use_sii", "shared_conv_in", "sii_mode")


class DualConvIn(nn.Module):
    """Replacement of ``unet.conv_in`` with one input convolution per branch (Marigold-initialised 8-channel convs).

    The UNet is called once per branch (support pass, query pass); :meth:`routing` selects which
    convolution the next calls use. Everything after ``conv_in`` is shared.

    Parameters
    ----------
    query
        Convolution of the query branch (8 input channels with QE, SD's 4-channel one without).
    support
        Convolution of the support branch (8 input channels); ``None`` when it is shared with the
        query (``shared_conv_in``) or when there is no support pass (no SII).
    shared
        Whether the support branch uses ``query``.
    """

    BRANCHES = ("query", "support")

    def __init__(self, query: nn.Conv2d, support: nn.Conv2d | None = None, shared: bool = False) -> None:
        super().__init__()
        self.query = query
        self.support = support
        self.shared = shared
        self.branch = "query"

    @staticmethod
    def marigold(conv_in: nn.Conv2d, copies: int = 2) -> nn.Conv2d:
        """SD's ``conv_in`` widened to ``copies * in_channels`` inputs: kernel repeated along inputs and divided by
        ``copies`` (Marigold / DiffewS), bias copied, so a repeated input gives SD's activation."""
        # Built on the meta device: no throw-away random init, so the global RNG (and with it the init of
        # whatever is built next) does not depend on how many input convs a configuration has.
        new = nn.Conv2d(
            conv_in.in_channels * copies,
            conv_in.out_channels,
            kernel_size=conv_in.kernel_size,
            stride=conv_in.stride,
            padding=conv_in.padding,
            bias=conv_in.bias is not None,
            device="meta",
            dtype=conv_in.weight.dtype,
        ).to_empty(device=conv_in.weight.device)
        with torch.no_grad():
            new.weight.copy_(conv_in.weight.repeat(1, copies, 1, 1) / copies)
            if conv_in.bias is not None:
                new.bias.copy_(conv_in.bias)
        return new

    @contextmanager
    def routing(self, branch: str) -> Iterator[None]:
        """Route the UNet calls inside the block through ``branch`` (``"query"`` or ``"support"``)."""
        if branch not in self.BRANCHES:
            raise ValueError(f"branch must be one of {self.BRANCHES}, got {branch!r}.")
        previous, self.branch = self.branch, branch
        try:
            yield
        finally:
            self.branch = previous

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        conv = self.query if self.branch == "query" or self.shared else self.support
        if conv is None:
            raise RuntimeError("this UNet has no support input convolution (SII is off): there is no support pass.")
        if sample.shape[1] != conv.in_channels:
            raise ValueError(
                f"{self.branch} UNet input has {sample.shape[1]} channels, its input convolution expects {conv.in_channels}."
            )
        return conv(sample)


def check_support_query(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as stored in the config (every key of :data:`SUPPORT_QUERY_KEYS`), or a ``ValueError``."""
    missing = [key for key in SUPPORT_QUERY_KEYS if key not in settings]
    unknown = sorted(set(settings) - set(SUPPORT_QUERY_KEYS))
    if missing or unknown:
        raise ValueError(f"support_query needs exactly the keys {SUPPORT_QUERY_KEYS}; missing {missing}, unknown {unknown}.")
    if settings["sii_mode"] not in SII_MODES:
        raise ValueError(f"sii_mode must be one of {SII_MODES}, got {settings['sii_mode']!r}.")
    if settings["shared_conv_in"] and not settings["use_qe"]:
        raise ValueError("shared_conv_in=True needs use_qe=True: without QE the query input has 4 channels and the support 8.")
    return {"use_qe": bool(settings["use_qe"]), "use_sii": bool(settings["use_sii"]),
            "shared_conv_in": bool(settings["shared_conv_in"]), "sii_mode": str(settings["sii_mode"])}


class SupportQueryUNet(UNet2DConditionModel):
    """SD's UNet with SD-FSMIS's input convolutions and support-query interaction (SII).

    Parameters
    ----------
    *args, **kwargs
        :class:`~diffusers.UNet2DConditionModel`'s arguments (its ``in_channels`` stays SD's 4: the latent width
        the input convolutions are widened from).
    support_query
        ``None``: SD's plain UNet. Otherwise a mapping with every key of :data:`SUPPORT_QUERY_KEYS`:
        ``use_qe`` (the query's input is the 8-channel ``[z_q; QE(z_q)]``, else SD's 4-channel latent),
        ``use_sii`` (a support pass with its own 8-channel input ``[z_s; z_sm]`` and SII in every block),
        ``shared_conv_in`` (one input convolution for both branches) and ``sii_mode``
        (:data:`~monai_sdfsmis.networks.sqi.SII_MODES`). Stored in the config, so ``save_pretrained`` /
        ``from_pretrained`` rebuild the same modules.

    Notes
    -----
    Calls go through :meth:`run_branch`, which routes ``conv_in`` and passes the support features in
    ``cross_attention_kwargs`` (:mod:`.sqi`). The processors' :class:`~monai_sdfsmis.networks.sqi.SupportBank`
    is :attr:`support_bank`.
    """

    def __init__(self, *args: Any, support_query: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.support_bank = SupportBank()
        if support_query is None:
            self.register_to_config(support_query=None)
        else:
            self._add_support_query(check_support_query(support_query))

    # diffusers builds a model from its config by the names in ``__init__``'s signature: SD's own plus ours.
    __init__.__signature__ = inspect.signature(UNet2DConditionModel.__init__).replace(  # type: ignore[attr-defined]
        parameters=[
            *inspect.signature(UNet2DConditionModel.__init__).parameters.values(),
            inspect.Parameter("support_query", inspect.Parameter.KEYWORD_ONLY, default=None),
        ]
    )

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, support_query: Mapping[str, Any]) -> SupportQueryUNet:
        """SD's ``unet`` (its weights, not copies) with the SD-FSMIS modules added and Marigold-initialised.

        Raises
        ------
        ValueError
            ``unet.conv_in`` is not SD's original latent-width ``Conv2d`` (e.g. a UNet already converted).
        """
        settings = check_support_query(support_query)
        conv_in = unet.conv_in
        if not isinstance(conv_in, nn.Conv2d) or conv_in.in_channels != unet.config.in_channels:
            raise ValueError(
                f"unet.conv_in must be SD's original {unet.config.in_channels}-channel Conv2d, got {conv_in!r} "
                "(was this UNet already wrapped by SDFSMIS?)."
            )
        # Built on the meta device, without drawing from the global RNG: the weights are SD's, assigned below.
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            converted = cls.from_config(unet.config)
        converted.load_state_dict(unet.state_dict(), strict=True, assign=True)
        converted._add_support_query(settings)
        return converted.train(unet.training)

    def _add_support_query(self, settings: dict[str, Any]) -> None:
        conv_in = self.conv_in
        # Marigold init (SD's kernel repeated twice, halved, bias copied); without QE the query keeps SD's conv_in.
        query_conv = DualConvIn.marigold(conv_in) if settings["use_qe"] else conv_in
        support_conv = DualConvIn.marigold(conv_in) if settings["use_sii"] and not settings["shared_conv_in"] else None
        self.conv_in = DualConvIn(query_conv, support_conv, shared=settings["shared_conv_in"] and settings["use_sii"])
        if settings["use_sii"]:
            install_sii(self, self.support_bank, settings["sii_mode"])
        self.register_to_config(support_query=settings)

    @property
    def new_modules(self) -> list[nn.Module]:
        """The modules SD-FSMIS adds to SD's UNet: the input convolutions and every block's ``attn_sq``."""
        if not isinstance(self.conv_in, DualConvIn):
            return []
        return [self.conv_in] + [block.attn_sq for _, block in sii_blocks(self) if hasattr(block, "attn_sq")]

    def run_branch(
        self,
        sample: torch.Tensor,
        timestep: int,
        condition: torch.Tensor,
        branch: str,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """One UNet call of the support or the query branch.

        Parameters
        ----------
        sample
            ``[B, 8, h, w]`` (support: ``[z_s; z_sm]``; query with QE: ``[z_q; QE(z_q)]``) or ``[B, 4, h, w]``
            (query without QE).
        timestep
            The timestep of every item.
        condition
            ``[B, T, D]`` text-like condition.
        branch
            ``"support"`` or ``"query"`` (:class:`DualConvIn`'s routing).
        cross_attention_kwargs
            The SII keys (:data:`~monai_sdfsmis.networks.sqi.SUPPORT_STORE_KEY` on the support pass,
            :data:`~monai_sdfsmis.networks.sqi.SUPPORT_FEATURES_KEY` on the query pass).

        Returns
        -------
        torch.Tensor
            ``[B, 4, h, w]`` UNet output.
        """
        timesteps = torch.full((sample.shape[0],), int(timestep), dtype=torch.long, device=sample.device)
        with self.conv_in.routing(branch):
            return self(
                sample.to(self.dtype),
                timesteps,
                encoder_hidden_states=condition.to(self.dtype),
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )[0]
