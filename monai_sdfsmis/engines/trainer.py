"""Episode training with MONAI's ``SupervisedTrainer``.

An episode batch (``support_image``, ``support_label``, ``query_image``, ``query_label``) does not fit
the trainer's ``inferer(image) -> loss_function(pred, label)`` pattern: the network computes its own
loss from all four tensors (``network.compute_loss``, called as ``network(..., mode="loss")`` where
the network's ``forward`` offers that, so that a ``DistributedDataParallel`` wrapper synchronises in
buckets). :class:`EpisodeTrainingStep` is that iteration (bf16 autocast on CUDA, fp32 on CPU, gradient
clipping at max-norm 1.0), and :class:`EpisodeTrainer` is a ``SupervisedTrainer`` that uses it, so that
a bundle only names the trainer. The iteration's
output has the shape of MONAI's decollated trainer output, one dict per episode of the batch with the
(replicated) loss, ``[{"loss": tensor}, ...]``, so ``StatsHandler``/``TensorBoardStatsHandler`` read it
with ``output_transform=monai.handlers.from_engine(["loss"], first=True)`` as in the model-zoo bundles.
"""

from __future__ import annotations

__all__ = ["EPISODE_KEYS", "EpisodeTrainingStep", "EpisodeTrainer"]

import inspect
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from monai_sdfsmis.data.episodes import LATENT_KEY_SUFFIX
from monai_sdfsmis.networks.latent_cache import LatentCache
from monai_sdfsmis.utils import training_autocast

#: Batch keys handed to ``network.compute_loss``, in argument order.
EPISODE_KEYS: tuple[str, ...] = ("support_image", "support_label", "query_image", "query_label")


def _accepts(function: Any, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


class EpisodeTrainingStep:
    """One training iteration on a batch of episodes: ``loss = network.compute_loss(...)``, backward, clip, step.

    Parameters
    ----------
    grad_clip
        Max norm of all gradients together (``torch.nn.utils.clip_grad_norm_``); ``None`` or 0 to skip.
    amp
        bf16 autocast for the forward pass when the engine's device is CUDA.
    amp_on_cpu
        bf16 autocast on CPU too (:func:`~monai_sdfsmis.utils.training_autocast`).
    keys
        Batch keys passed to ``compute_loss`` in order; each value ``[B, C, H, W]``.
    skip_non_finite
        Skip the optimizer step (with a warning) when the loss is NaN/inf instead of corrupting the weights;
        the number of skipped steps is kept in ``engine.state.skipped_steps``.
    latent_cache
        A :class:`~monai_sdfsmis.networks.latent_cache.LatentCache`: the frozen VAE's posteriors of the four
        inputs are looked up by the batch's ``<key>_key`` entries (:class:`~monai_sdfsmis.data.episodes.EpisodeDataset`)
        and only the misses are encoded; ``None`` encodes every input.

    Returns (from ``__call__``)
    ---------------------------
    list[dict]
        ``[{"loss": ..., "loss_mean_target": ...}] * B`` (detached scalars, one dict per episode, as MONAI's
        decollated output), stored by ignite in ``engine.state.output``. ``loss_mean_target`` is the MSE
        against the posterior-mean target, which differs from ``loss`` only when the posterior is sampled.
    """

    def __init__(
        self,
        grad_clip: float | None = 1.0,
        amp: bool = True,
        keys: Sequence[str] = EPISODE_KEYS,
        skip_non_finite: bool = True,
        latent_cache: LatentCache | None = None,
        amp_on_cpu: bool = False,
    ) -> None:
        if grad_clip is not None and grad_clip < 0:
            raise ValueError(f"grad_clip must be positive (or None to disable), got {grad_clip}.")
        if len(keys) == 0:
            raise ValueError("keys must name the batch entries passed to compute_loss.")
        self.grad_clip = grad_clip
        self.amp = amp
        self.amp_on_cpu = bool(amp_on_cpu)
        self.keys = tuple(keys)
        self.skip_non_finite = skip_non_finite
        self.latent_cache = latent_cache

    def _cached_posteriors(self, model: torch.nn.Module, batch: dict[str, Any], inputs: list[torch.Tensor]) -> Any:
        """The four inputs' posteriors through ``latent_cache``, or ``None`` when there is no cache or no keys."""
        names = [f"{k}{LATENT_KEY_SUFFIX}" for k in self.keys]
        if self.latent_cache is None or len(inputs) != 4 or not all(n in batch for n in names):
            return None
        support_image, support_label, query_image, query_label = inputs
        images = torch.cat(
            [support_image, model.mask_to_image(support_label), query_image, model.mask_to_image(query_label)]
        )
        keys = [key for n in names for key in batch[n]]
        return self.latent_cache.posteriors(model, images, keys).chunk(4)

    def __call__(self, engine: Any, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        if not isinstance(batch, dict):
            raise ValueError(f"An episode batch must be a dict with keys {self.keys}, got {type(batch).__name__}.")
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise ValueError(f"Episode batch lacks {missing}; it has {sorted(batch)}.")
        device = torch.device(engine.state.device)
        inputs = [torch.as_tensor(batch[k]).to(device=device, non_blocking=engine.non_blocking) for k in self.keys]
        network = engine.network
        model = _unwrap(network)
        compute_loss = getattr(model, "compute_loss", None)
        if not callable(compute_loss):
            raise ValueError(f"network {type(model).__name__} has no compute_loss(); episode training needs one.")

        network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        autocast = training_autocast(device, self.amp, self.amp_on_cpu)
        extra: dict[str, Any] = {}
        if _accepts(compute_loss, "return_parts"):
            extra["return_parts"] = True
        with autocast:  # the cache's misses are encoded as compute_loss would encode them
            posteriors = self._cached_posteriors(model, batch, inputs)
        if posteriors is not None:
            extra["posteriors"] = posteriors
        # Through forward (and so through a DDP wrapper's reducer) where the network supports it.
        through_forward = _accepts(model.forward, "mode")
        if model is not network and not through_forward:
            raise ValueError(
                f"{type(model).__name__} cannot train under DistributedDataParallel: its forward has no mode='loss', "
                "so DDP would never synchronise its gradients"
            )
        with autocast:
            loss = network(*inputs, mode="loss", **extra) if through_forward else compute_loss(*inputs, **extra)
        parts: dict[str, torch.Tensor] = {}
        if isinstance(loss, tuple):
            loss, parts = loss
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = loss.float().mean()
        if not math.isfinite(float(loss.detach())) and self.skip_non_finite:
            engine.state.skipped_steps = getattr(engine.state, "skipped_steps", 0) + 1
            warnings.warn(f"Non-finite loss {float(loss.detach()):g} at iteration {engine.state.iteration}; step skipped.")
            engine.optimizer.zero_grad(set_to_none=True)
            return self._output(loss, inputs[0], parts)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.grad_clip:
            params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm=float(self.grad_clip))
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return self._output(loss, inputs[0], parts)

    @staticmethod
    def _output(
        loss: torch.Tensor, first_input: torch.Tensor, parts: dict[str, torch.Tensor] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        item = {"loss": loss.detach(), **{k: v.detach().float() for k, v in (parts or {}).items()}}
        return [dict(item) for _ in range(max(int(first_input.shape[0]), 1))]


class EpisodeTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration is :class:`EpisodeTrainingStep`.

    Parameters
    ----------
    device
        Device the episodes are moved to (the network must already be there).
    max_epochs
        Epochs to run; with an episode dataset of ``length`` items, ``iterations = max_epochs * length``
        (or ``max_epochs * epoch_length``).
    train_data_loader
        Loader of episode dicts (``EpisodeDataset``), batch ``[B, C, 256, 256]`` per key.
    network
        Network with ``compute_loss(support_image, support_label, query_image, query_label)``.
    optimizer
        E.g. ``torch.optim.AdamW(network.parameter_groups(...))``.
    grad_clip, amp, latent_cache, amp_on_cpu, keys
        See :class:`EpisodeTrainingStep` (defaults 1.0 and bf16 on CUDA, fp32 on CPU; no cache; the episode keys).
        The supervised mode trains on ``("image", "label", "organ_index")``.
    epoch_length, train_handlers, key_train_metric, non_blocking, optim_set_to_none
        As ``SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None = 1.0,
        amp: bool = True,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        non_blocking: bool = False,
        optim_set_to_none: bool = True,
        latent_cache: LatentCache | None = None,
        amp_on_cpu: bool = False,
        keys: Sequence[str] = EPISODE_KEYS,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=torch.device(device),
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=_no_loss_function,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=EpisodeTrainingStep(
                grad_clip=grad_clip, amp=amp, keys=keys, latent_cache=latent_cache, amp_on_cpu=amp_on_cpu
            ),
            key_train_metric=key_train_metric,
            train_handlers=train_handlers,
            amp=False,  # bf16 autocast is handled by the step; no GradScaler needed
            decollate=False,  # the output is a single loss, nothing to decollate
            optim_set_to_none=optim_set_to_none,
            **kwargs,
        )


def _no_loss_function(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("EpisodeTrainer computes the loss with network.compute_loss(); loss_function is unused.")
