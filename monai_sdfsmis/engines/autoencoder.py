"""Stage 1 of the no-prior mode: train the autoencoder on MONAI engines, then freeze and calibrate it.

Like MONAI's generative bundles (``train_autoencoder.json`` before ``train_diffusion.json``), the
autoencoder is trained first with a :class:`monai.engines.SupervisedTrainer` whose
``iteration_update`` is :class:`AutoencoderTrainingStep`, then frozen, its latent scaling factor
measured on the data (:func:`freeze_and_calibrate`), and saved as a diffusers folder
(:func:`~monai_sdfsmis.networks.autoencoder.save_autoencoder`) that stage 2 loads.
"""

from __future__ import annotations

__all__ = [
    "AutoencoderTrainingStep",
    "build_autoencoder_trainer",
    "freeze_and_calibrate",
    "save_autoencoder",
    "load_autoencoder",
]

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer

from monai_sdfsmis.engines.budget import TrainingBudget, attach_budget
from monai_sdfsmis.networks.autoencoder import (
    autoencoder_loss,
    estimate_scaling_factor,
    load_autoencoder,
    save_autoencoder,
)
from monai_sdfsmis.progress import attach_progress
from monai_sdfsmis.utils import training_autocast


class AutoencoderTrainingStep:
    """``iteration_update`` of a :class:`~monai.engines.SupervisedTrainer` for the autoencoder.

    One optimiser step on :func:`~monai_sdfsmis.networks.autoencoder.autoencoder_loss` (L1 + KL):
    bf16 autocast on CUDA (fp32 on CPU), gradient clipping, and a clear error on a non-finite loss.
    The trainer's ``network`` is the :class:`~diffusers.AutoencoderKL`, its ``optimizer`` the optimiser.

    Parameters
    ----------
    kl_weight
        Weight of the KL term.
    grad_clip
        Max gradient norm (``None`` or 0: no clipping).
    amp
        Use bf16 autocast when the batch is on a CUDA device.
    amp_on_cpu
        Also on CPU (:func:`~monai_sdfsmis.utils.training_autocast`).
    image_key
        Key of the ``[B, 3, H, W]`` images in the batch dictionaries.
    sample_posterior
        Decode a posterior sample (``True``) or the mean.

    Returns (``__call__``)
    ----------------------
    dict
        ``loss``, ``l1``, ``kl`` (detached scalar tensors), stored in ``engine.state.output``.
    """

    def __init__(
        self,
        kl_weight: float = 1e-6,
        grad_clip: float | None = 1.0,
        amp: bool = True,
        image_key: str = "image",
        sample_posterior: bool = True,
        amp_on_cpu: bool = False,
    ) -> None:
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
        if grad_clip is not None and grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 or None, got {grad_clip}.")
        self.kl_weight = float(kl_weight)
        self.grad_clip = grad_clip
        self.amp = amp
        self.amp_on_cpu = bool(amp_on_cpu)
        self.image_key = image_key
        self.sample_posterior = sample_posterior

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any] | torch.Tensor) -> dict[str, torch.Tensor]:
        if batchdata is None:
            raise ValueError("Must provide batch data for the current iteration.")
        if isinstance(batchdata, Mapping):
            if self.image_key not in batchdata:
                raise ValueError(f"Autoencoder batches must hold '{self.image_key}', got keys {sorted(batchdata)}.")
            images = batchdata[self.image_key]
        else:
            images = batchdata
        device = getattr(engine.state, "device", None) or next(engine.network.parameters()).device
        images = torch.as_tensor(images).to(device=device, non_blocking=getattr(engine, "non_blocking", False))
        network, optimizer = engine.network, engine.optimizer
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with training_autocast(images.device, self.amp, self.amp_on_cpu):
            loss, parts = autoencoder_loss(network, images, self.kl_weight, sample_posterior=self.sample_posterior)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Autoencoder loss is {loss.item()} at iteration {engine.state.iteration} (l1 {parts['l1'].item()}, "
                f"kl {parts['kl'].item()}); lower the learning rate or check the input range [-1, 1]."
            )
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip)
        optimizer.step()
        return {"loss": loss.detach(), "l1": parts["l1"], "kl": parts["kl"]}


def _epoch_plan(train_loader: Iterable, max_iterations: int | None) -> tuple[int | None, int]:
    """``(epoch_length, max_epochs)`` of the stage-1 trainer; an empty loader is refused.

    ``epoch_length`` is ``None`` for a loader without a length; without both an iteration budget and a length, the
    epoch count is left unbounded so that the time budget ends training.
    """
    try:
        epoch_length = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        epoch_length = None
    if epoch_length == 0:
        raise ValueError("The autoencoder training loader is empty.")
    if max_iterations is not None and epoch_length:
        max_epochs = math.ceil(max_iterations / epoch_length)
    else:
        max_epochs = 10**6  # the time budget stops training
    return epoch_length, max_epochs


def build_autoencoder_trainer(
    vae: AutoencoderKL,
    train_loader: Iterable,
    device: str | torch.device = "cpu",
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    max_iterations: int | None = 1000,
    max_seconds: float | None = None,
    schedule: str = "cosine",
    warmup_iterations: int = 50,
    kl_weight: float = 1e-6,
    grad_clip: float | None = 1.0,
    amp: bool = True,
    train_handlers: Sequence[Any] | None = None,
    progress: bool = True,
    amp_on_cpu: bool = False,
) -> tuple[SupervisedTrainer, TrainingBudget]:
    """A :class:`~monai.engines.SupervisedTrainer` for stage 1, with its :class:`TrainingBudget` attached.

    Parameters
    ----------
    vae
        Autoencoder to train (moved to ``device``).
    train_loader
        Loader of ``{"image": [B, 3, H, W]}`` batches (e.g. over :class:`~monai_sdfsmis.data.slices.SliceDataset`);
        a dataset with ``set_epoch`` is advanced at every epoch.
    device
        Training device.
    lr, weight_decay
        AdamW settings (from scratch: higher than SD-FSMIS's fine-tuning rate 1e-5).
    max_iterations, max_seconds, schedule, warmup_iterations
        Budget and learning-rate schedule (:func:`~monai_sdfsmis.engines.budget.attach_budget`; a decaying
        schedule runs over ``max_iterations``, ``max_seconds`` is a hard stop on top).
    kl_weight, grad_clip, amp, amp_on_cpu
        :class:`AutoencoderTrainingStep` settings.
    train_handlers
        More MONAI/ignite handlers (e.g. ``StatsHandler``, ``CheckpointSaver``).
    progress
        Show progress (a bar in a terminal, plain lines in a log: :func:`~monai_sdfsmis.progress.attach_progress`).

    Returns
    -------
    (trainer, budget)
        Run with ``trainer.run()``; ``budget.iterations`` and ``budget.elapsed`` tell what was spent.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    vae.to(device)
    vae.requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=weight_decay)
    epoch_length, max_epochs = _epoch_plan(train_loader, max_iterations)
    trainer = SupervisedTrainer(
        device=torch.device(device),
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=vae,
        optimizer=optimizer,
        loss_function=autoencoder_loss,
        epoch_length=epoch_length,
        iteration_update=AutoencoderTrainingStep(
            kl_weight=kl_weight, grad_clip=grad_clip, amp=amp, amp_on_cpu=amp_on_cpu
        ),
        train_handlers=list(train_handlers or []),
        # Outputs are scalars only; decollating the image batch every iteration would be wasted work.
        decollate=False,
        amp=False,  # bf16 autocast is done in the step; no GradScaler needed for bf16
    )
    budget = attach_budget(trainer, optimizer, max_iterations, max_seconds, schedule, warmup_iterations)
    dataset = getattr(train_loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: dataset.set_epoch(engine.state.epoch - 1))
    if progress:
        # a virtual dataset's epoch is no measure of the run: count to the iteration budget, or none for a time budget
        total = max_iterations if max_iterations is not None or max_seconds is not None else epoch_length
        attach_progress(trainer, "autoencoder", output_transform=lambda out: {"loss": out["loss"]}, total=total)
    return trainer, budget


def freeze_and_calibrate(
    vae: AutoencoderKL,
    data: torch.Tensor | Iterable,
    max_batches: int | None = None,
    batch_size: int = 16,
    sample_posterior: bool = False,
) -> AutoencoderKL:
    """Freeze the trained autoencoder and write the data-derived latent scaling factor into its config.

    Parameters
    ----------
    vae
        The trained autoencoder.
    data
        Calibration images: ``[N, 3, H, W]`` in [-1, 1] or a loader of ``{"image": ...}`` batches
        (the training slices and masks; see
        :func:`~monai_sdfsmis.networks.autoencoder.estimate_scaling_factor`).
    max_batches, batch_size
        How much of ``data`` to use.
    sample_posterior
        Measure the scale on posterior samples (for a stage 2 with ``vae_sample_in_training=True``) instead
        of posterior means (the no-prior default: posterior means in training and evaluation).

    Returns
    -------
    AutoencoderKL
        The same module, eval mode, gradients off, ``config.scaling_factor = 1 / std(latents)``, and
        ``sdfsmis_calibration`` recording the factor (saved by ``save_autoencoder``).
    """
    vae.requires_grad_(False).eval()
    factor = estimate_scaling_factor(
        vae, data, max_batches=max_batches, batch_size=batch_size, sample_posterior=sample_posterior
    )
    vae.register_to_config(scaling_factor=factor)
    vae.sdfsmis_calibration = {
        "scaling_factor": factor, "latent_std": 1.0 / factor, "source": "data",
        "latents": "posterior samples" if sample_posterior else "posterior means",
    }
    return vae
