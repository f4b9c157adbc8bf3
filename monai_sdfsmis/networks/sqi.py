"""Support-Query Interaction: the support information injection (SII) of SD-FSMIS (one new cross-attention per block).

Two UNet passes share every weight. The **support pass** runs the support latent through the UNet
and, in every ``BasicTransformerBlock``, stores the block's normed hidden states (the input of its
self-attention ``attn1``, ``LN1(h_s)``) in a :class:`SupportBank`. The **query pass** then lets the
query attend to them:

* ``mode="sii"`` (default, the paper's Fig. 3): a new cross-attention layer per block
  (:class:`SupportQueryAttention`, registered on the block as ``block.attn_sq`` so that
  ``state_dict``, ``save_pretrained`` and parameter groups see it) between self-attention and text
  cross-attention::

      h = h + SAttn(LN1 h)
      h = h + SQAttn(LN_sq h, f_s)        # Q from the query, K/V from the support features f_s
      h = h + CAttn(LN2 h, E_t)
      h = h + FFN(LN3 h)

  Its q/k/v weights and its norm are copies of the block's ``attn1`` / ``norm1`` and its output
  projection is zero, so before training the network computes exactly what SD computes.
* ``mode="kv_concat"`` (DiffewS): no new weights; the query's ``attn1`` attends to
  ``K = [K_q; K_s]``, ``V = [V_q; V_s]`` with ``K_s, V_s`` its own projections of ``f_s``.

Both are diffusers attention processors installed on ``attn1`` (diffusers' ``BasicTransformerBlock``
is not edited or subclassed). The support features travel explicitly in the UNet call's
``cross_attention_kwargs``, as diffusers' IP-Adapter processors receive their image tokens::

    store = {}
    unet(z_s, t, c, cross_attention_kwargs={"support_store": store})     # support pass: fills store
    unet(z_q, t, c, cross_attention_kwargs={"support_features": store})  # query pass

so nothing depends on state held between calls, and gradient checkpointing
(``unet.enable_gradient_checkpointing()``, which re-runs blocks in the backward pass) and
``torch.compile(fullgraph=True)`` see the same data flow as an eager call. An ``attn1`` processor only
sees ``LN1(h)``, not ``h``: a forward pre-hook on the block adds ``h`` to the kwargs it forwards to
``attn1`` (returning new arguments, keeping nothing), and the processor returns
``attn1_out + SQAttn(LN_sq(h + attn1_out), f_s)``; the block then adds ``h``, which gives exactly the
two residual steps above. The support pass skips the new layer. ``attn2`` gets a pass-through
processor that drops the support keys (the block hands the same kwargs to both).

Without those keys, a :class:`SupportBank` switches the passes (``bank.storing()`` /
``bank.using()``), for interactive use; that mode is state, so it is not for checkpointed or
compiled UNets.

Batches: features from ``Bs`` supports serve ``Bq`` queries when ``Bq == Bs`` (pairs, as in
training) or ``Bq`` is a multiple of ``Bs`` (query ``i`` uses support ``i // (Bq // Bs)``; with one
cached support that is a broadcast, see :func:`match_support_batch`).
"""

from __future__ import annotations

__all__ = [
    "SupportBank",
    "SupportQueryAttention",
    "SupportQueryAttnProcessor",
    "KVConcatAttnProcessor",
    "SIIPassThroughProcessor",
    "SUPPORT_FEATURES_KEY",
    "SUPPORT_STORE_KEY",
    "install_sii",
    "sii_blocks",
    "match_support_batch",
    "SII_MODES",
]

import copy
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

SII_MODES = ("sii", "kv_concat")


def match_support_batch(tensor: torch.Tensor, batch_size: int, what: str = "support tensor") -> torch.Tensor:
    """Repeat a per-support tensor ``[Bs, ...]`` to a query batch ``[Bq, ...]``.

    Query ``i`` is paired with support ``i // (Bq // Bs)``. One support is expanded as a view (no copy).

    Parameters
    ----------
    tensor
        ``[Bs, ...]`` tensor computed from the supports.
    batch_size
        ``Bq``, the query batch size; must equal ``Bs`` or be a multiple of it.
    what
        Name used in the error message.
    """
    bs = tensor.shape[0]
    if bs == batch_size:
        return tensor
    if bs == 0 or batch_size % bs != 0:
        raise ValueError(
            f"{what} has batch {bs} but the query batch is {batch_size}: the query batch must equal the support "
            "batch or be a multiple of it."
        )
    if bs == 1:
        return tensor.expand(batch_size, *tensor.shape[1:])
    return tensor.repeat_interleave(batch_size // bs, dim=0)


class SupportBank:
    """Per-block support features shared by all SII processors of one UNet, and the pass switch.

    ``mode`` is ``"off"`` (plain SD), ``"store"`` (support pass: every processor stores its block's
    normed hidden states ``[Bs, L, C]`` under the block's name) or ``"use"`` (query pass).
    Use the context managers rather than setting ``mode`` by hand::

        with bank.storing() as features:
            unet(z_s, t, cond)              # fills ``features``
        with bank.using(features):
            out = unet(z_q, t, cond)        # query attends to the stored features
    """

    MODES = ("off", "store", "use")

    def __init__(self) -> None:
        self.mode = "off"
        self.features: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        """Drop the stored features (frees their memory)."""
        self.features = {}

    @contextmanager
    def storing(self) -> Iterator[dict[str, torch.Tensor]]:
        """Support pass: start from an empty bank and yield the dict the processors fill."""
        previous = self.mode
        self.features = {}
        self.mode = "store"
        try:
            yield self.features
        finally:
            self.mode = previous

    @contextmanager
    def using(self, features: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
        """Query pass, with ``features`` (e.g. a cached support context) or the bank's current contents."""
        previous_mode, previous_features = self.mode, self.features
        if features is not None:
            self.features = dict(features)
        self.mode = "use"
        try:
            yield
        finally:
            self.mode = previous_mode
            if features is not None:
                self.features = previous_features

    def put(self, key: str, hidden_states: torch.Tensor) -> None:
        self.features[key] = hidden_states

    def get(self, key: str, batch_size: int) -> torch.Tensor:
        """The support features of block ``key`` matched to a query batch of ``batch_size``."""
        if key not in self.features:
            raise RuntimeError(
                f"no support features for transformer block '{key}': run the support pass (bank.storing()) "
                "before the query pass, with the same UNet."
            )
        return match_support_batch(self.features[key], batch_size, f"support features of block '{key}'")


class SupportQueryAttention(nn.Module):
    """The SII layer of one transformer block: ``SQAttn(LN_sq(h), f_s)``.

    Parameters
    ----------
    self_attention
        The block's ``attn1``; its q/k/v projections (and head layout) are copied.
    norm
        The block's ``norm1`` (a ``LayerNorm``); copied as ``LN_sq``.

    Notes
    -----
    The output projection is zero-initialised, so the layer outputs exactly 0 until it is trained.
    The attention itself runs through the copied ``Attention``'s processor (``AttnProcessor2_0`` by
    default), so ``unet.set_attn_processor`` choices such as xformers reach it too.
    """

    def __init__(self, self_attention: Attention, norm: nn.LayerNorm) -> None:
        super().__init__()
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"SII needs a LayerNorm as the block's norm1, got {type(norm).__name__}.")
        if getattr(self_attention, "is_cross_attention", False):
            raise ValueError("SII needs the block's attn1 to be a self-attention (only_cross_attention=False).")
        self.norm = copy.deepcopy(norm)
        attn = copy.deepcopy(self_attention)
        # The copy may carry an SII processor (reinstall); the new layer is a plain cross-attention.
        attn.set_processor(AttnProcessor2_0())
        with torch.no_grad():
            attn.to_out[0].weight.zero_()
            if attn.to_out[0].bias is not None:
                attn.to_out[0].bias.zero_()
        self.attn = attn

    def forward(self, hidden_states: torch.Tensor, support_features: torch.Tensor) -> torch.Tensor:
        """Cross-attention of the query tokens to the support tokens.

        Parameters
        ----------
        hidden_states
            ``[Bq, L, C]`` query hidden states (not normed; ``LN_sq`` is applied here).
        support_features
            ``[Bq, Ls, C]`` support features (already normed by the support pass's ``norm1``).

        Returns
        -------
        torch.Tensor
            ``[Bq, L, C]`` update to add to the residual stream.
        """
        return self.attn(self.norm(hidden_states), encoder_hidden_states=support_features)


SUPPORT_FEATURES_KEY = "support_features"
"""``cross_attention_kwargs`` key of the query pass: ``{block name: [Bs, Ls, C]}`` support features."""
SUPPORT_STORE_KEY = "support_store"
"""``cross_attention_kwargs`` key of the support pass: a dict each block's processor adds its ``LN1(h_s)`` to."""
BLOCK_INPUT_KEY = "sii_block_input"
"""``cross_attention_kwargs`` key the block pre-hook adds for ``attn1``: the block input ``h``."""


def _base_processor(attn: Attention) -> Any:
    """The processor ``attn`` had before SII, unwrapping an earlier install."""
    processor = attn.processor
    while isinstance(processor, (_SupportPassProcessor, SIIPassThroughProcessor)):
        processor = processor.base
    return processor if processor is not None else AttnProcessor2_0()


def _pass_mode(bank: SupportBank, features: Mapping[str, torch.Tensor] | None, store: dict | None) -> str:
    """Which pass this call is: explicit keyword arguments win; without them the bank's mode decides."""
    if store is not None:
        return "store"
    if features is not None:
        return "use"
    return bank.mode


def _store(bank: SupportBank, store: dict | None, key: str, hidden_states: torch.Tensor) -> None:
    # First write wins: a gradient-checkpointing recomputation of the support pass runs this again and must not
    # replace the features the query pass already used.
    target = bank.features if store is None else store
    if key not in target:
        target[key] = hidden_states


def _support_for(
    bank: SupportBank, features: Mapping[str, torch.Tensor] | None, key: str, batch_size: int
) -> torch.Tensor:
    if features is None:
        return bank.get(key, batch_size)
    if key not in features:
        raise RuntimeError(
            f"no support features for transformer block '{key}': run the support pass (support_store, or "
            "bank.storing()) before the query pass, with the same UNet."
        )
    return match_support_batch(features[key], batch_size, f"support features of block '{key}'")


class _BlockInputInjector:
    """Forward pre-hook on a block with an SII processor: add the block input ``h`` to its cross-attention kwargs.

    ``BasicTransformerBlock`` passes ``cross_attention_kwargs`` on to ``attn1`` (as it does for IP-Adapter
    processors), which is how the ``attn1`` processor gets ``h``. The argument positions are read from the signature
    of the installed block's own ``forward`` when SII is installed (not assumed, and not inspected while running, so
    that ``torch.compile(fullgraph=True)`` traces the hook): a diffusers release or a subclass that reorders the
    block's arguments cannot hand SII the wrong tensor. The hook keeps nothing: it returns new arguments, so a
    gradient-checkpointing recomputation or a compiled graph sees the same data flow as an eager call.
    """

    def __init__(self, block_type: type) -> None:
        names = list(inspect.signature(block_type.forward).parameters)[1:]  # without self
        if "hidden_states" not in names or "cross_attention_kwargs" not in names:
            raise ValueError(
                f"{block_type.__name__}.forward takes {names}: SII needs 'hidden_states' and 'cross_attention_kwargs'."
            )
        self.hidden_index = names.index("hidden_states")
        self.kwargs_index = names.index("cross_attention_kwargs")

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not isinstance(block.attn1.processor, SupportQueryAttnProcessor):
            return None  # SII was removed (set_attn_processor): plain SD, nothing to add
        hidden_states = args[self.hidden_index] if len(args) > self.hidden_index else kwargs["hidden_states"]
        i = self.kwargs_index
        if len(args) > i:  # passed by position (diffusers' gradient checkpointing does)
            extra = {**(args[i] or {}), BLOCK_INPUT_KEY: hidden_states}
            return (*args[:i], extra, *args[i + 1:]), kwargs
        extra = {**(kwargs.get("cross_attention_kwargs") or {}), BLOCK_INPUT_KEY: hidden_states}
        return args, {**kwargs, "cross_attention_kwargs": extra}


class _SupportPassProcessor:
    """The pass dispatch both ``attn1`` processors share; subclasses define only the query pass.

    * support pass: store ``LN1(h_s)`` (this processor's input) under ``key``; ordinary self-attention;
    * query pass: :meth:`query_pass` with the support features of this block;
    * neither: ordinary self-attention (plain SD).
    """

    def __init__(self, bank: SupportBank, key: str, base: Any = None) -> None:
        self.bank = bank
        self.key = key
        self.base = base if base is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        sii_block_input: torch.Tensor | None = None,
        support_features: Mapping[str, torch.Tensor] | None = None,
        support_store: dict | None = None,
    ) -> torch.Tensor:
        mode = _pass_mode(self.bank, support_features, support_store)
        if mode == "use":
            support = _support_for(self.bank, support_features, self.key, hidden_states.shape[0])
            return self.query_pass(attn, hidden_states, encoder_hidden_states, attention_mask, temb, support,
                                   sii_block_input)
        if mode == "store":
            _store(self.bank, support_store, self.key, hidden_states)
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def query_pass(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        support: torch.Tensor,
        block_input: torch.Tensor | None,
    ) -> torch.Tensor:
        """``attn1``'s output on the query pass; ``support`` is ``[B, N_s, C]``, ``block_input`` the block's ``h``."""
        raise NotImplementedError


class SupportQueryAttnProcessor(_SupportPassProcessor):
    """``attn1`` processor for ``mode="sii"``: self-attention plus the block's :class:`SupportQueryAttention`.

    The pass is chosen by the UNet call's ``cross_attention_kwargs`` (stateless; works with gradient
    checkpointing and ``torch.compile``)::

        store = {}
        unet(z_s, t, c, cross_attention_kwargs={"support_store": store})   # support pass fills store
        unet(z_q, t, c, cross_attention_kwargs={"support_features": store})  # query pass

    Without these keys the :class:`SupportBank`'s mode decides (``bank.storing()`` / ``bank.using()``):

    * support pass: store ``LN1(h_s)`` (this processor's input) under ``key``; ordinary self-attention;
    * query pass: ``attn1_out + SQAttn(LN_sq(h + attn1_out), f_s)``, where ``h`` is the block input that the block's
      forward pre-hook adds to the kwargs (``sii_block_input``);
    * neither: ordinary self-attention (plain SD).

    Parameters
    ----------
    bank
        The shared :class:`SupportBank` (used only when the call passes no support keyword).
    key
        The block's module name inside the UNet (feature key).
    layer
        The block's :class:`SupportQueryAttention` (registered on the block as ``attn_sq``).
    base
        Processor doing the ordinary self-attention (default: the one attn1 had).
    """

    def __init__(self, bank: SupportBank, key: str, layer: SupportQueryAttention, base: Any = None) -> None:
        super().__init__(bank, key, base)
        self.layer = layer

    def query_pass(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, support, block_input):
        if block_input is None:
            raise RuntimeError(
                f"SII processor of '{self.key}' did not receive its block input: the block's forward pre-hook "
                "is missing (install SII with install_sii, and do not call attn1 outside its block)."
            )
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        # The block adds h afterwards: h + out + SQ(LN_sq(h + out)) = paper's two residual steps.
        return out + self.layer(block_input + out, support)


class KVConcatAttnProcessor(_SupportPassProcessor):
    """``attn1`` processor for ``mode="kv_concat"`` (DiffewS): the query also attends to the support tokens.

    Passes are chosen as in :class:`SupportQueryAttnProcessor`:

    * support pass: store ``LN1(h_s)``; ordinary self-attention;
    * query pass: keys/values over ``[LN1(h_q); f_s]`` with attn1's own projections, i.e.
      ``K = [K_q; K_s]``, ``V = [V_q; V_s]`` (no new weights);
    * neither: ordinary self-attention.
    """

    def query_pass(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, support, block_input):
        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError("kv_concat SII supports plain self-attention only (no attention mask, no context).")
        # attn1 projects its "context" with to_k/to_v: a context [h_q; f_s] gives K = [K_q; K_s], V = [V_q; V_s].
        context = torch.cat([hidden_states, support.to(hidden_states.dtype)], dim=1)
        return self.base(attn, hidden_states, context, None, temb)


class SIIPassThroughProcessor:
    """``attn2`` processor of an SII block: the original processor, minus the SII keyword arguments.

    ``BasicTransformerBlock`` hands the same ``cross_attention_kwargs`` to ``attn1`` and ``attn2``; without this
    wrapper diffusers would warn on every text cross-attention call that the support keys are unexpected.
    """

    def __init__(self, base: Any = None) -> None:
        self.base = base if base is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        sii_block_input: torch.Tensor | None = None,
        support_features: Mapping[str, torch.Tensor] | None = None,
        support_store: dict | None = None,
    ) -> torch.Tensor:
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def sii_blocks(unet: nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """Every ``BasicTransformerBlock`` of ``unet`` with its module name (16 in SD-1.5)."""
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def install_sii(unet: nn.Module, bank: SupportBank, mode: str = "sii") -> list[SupportQueryAttention]:
    """Install support-query interaction in every transformer block of ``unet`` (in place).

    Parameters
    ----------
    unet
        A diffusers ``UNet2DConditionModel`` (any module holding ``BasicTransformerBlock`` s).
    bank
        The :class:`SupportBank` the processors share (switches support / query / off passes).
    mode
        ``"sii"``: new :class:`SupportQueryAttention` layer per block (registered as ``block.attn_sq``);
        ``"kv_concat"``: DiffewS's K/V concatenation in ``attn1``, no new weights.

    Returns
    -------
    list[SupportQueryAttention]
        The new layers in block order (empty for ``"kv_concat"``).

    Notes
    -----
    Calling ``unet.set_attn_processor`` afterwards replaces these processors (and so removes SII).
    Installing again replaces the previous installation (new zero-initialised layers for ``"sii"``).
    """
    if mode not in SII_MODES:
        raise ValueError(f"SII mode must be one of {SII_MODES}, got {mode!r}.")
    blocks = sii_blocks(unet)
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has no BasicTransformerBlock: nothing to install SII in.")
    layers: list[SupportQueryAttention] = []
    for name, block in blocks:
        if block.only_cross_attention or block.norm_type != "layer_norm":
            raise ValueError(
                f"transformer block '{name}' is not an SD-style block (self-attention + layer_norm); SII cannot be "
                "installed."
            )
        base = _base_processor(block.attn1)
        old = getattr(block, "_sii_hook_handle", None)
        if old is not None:
            old.remove()
            block._sii_hook_handle = None
        if isinstance(getattr(block, "attn_sq", None), nn.Module):
            delattr(block, "attn_sq")
        if mode == "sii":
            block.attn_sq = SupportQueryAttention(block.attn1, block.norm1)
            processor = SupportQueryAttnProcessor(bank, name, block.attn_sq, base)
            block._sii_hook_handle = block.register_forward_pre_hook(_BlockInputInjector(type(block)), with_kwargs=True)
            layers.append(block.attn_sq)
        else:
            processor = KVConcatAttnProcessor(bank, name, base)
        block.attn1.set_processor(processor)
        if block.attn2 is not None:
            block.attn2.set_processor(SIIPassThroughProcessor(_base_processor(block.attn2)))
    return layers
