"""The one-step "diffusion" of SD-FSMIS / DiffewS (same t in training and inference, x0 = -unet_output).

DiffewS configures diffusers' DDIM scheduler with ``beta_start = beta_end = 1``. Every
``alphas_cumprod`` is then 0, so for a v-prediction model the DDIM estimate of the clean sample is
``x0 = sqrt(a_t) * x_t - sqrt(1 - a_t) * v = -v`` whatever the timestep: the UNet is a deterministic
one-step regressor from the query latent to (minus) the mask latent, and the timestep only changes
the UNet's time embedding. SD-FSMIS uses ``t = 999`` [P section 4.1]; DiffewS's code uses ``t = 1``.
"""

from __future__ import annotations

__all__ = ["one_step_scheduler", "predict_original_sample", "ONE_STEP_SCHEDULER_CONFIG"]

import torch
from diffusers import DDIMScheduler

# DiffewS's scheduler_1.0_1.0/scheduler_config.json (aim-uofa/DiffewS), loaded into a DDIMScheduler.
ONE_STEP_SCHEDULER_CONFIG: dict = {
    "beta_start": 1.0,
    "beta_end": 1.0,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}


def one_step_scheduler() -> DDIMScheduler:
    """A ``DDIMScheduler`` configured as DiffewS's one-step scheduler, ready for :func:`predict_original_sample`.

    Returns
    -------
    DDIMScheduler
        With ``set_timesteps(1)`` already called (so ``step`` can be used directly).
    """
    scheduler = DDIMScheduler(**ONE_STEP_SCHEDULER_CONFIG)
    scheduler.set_timesteps(1)
    return scheduler


def predict_original_sample(
    scheduler: DDIMScheduler, model_output: torch.Tensor, sample: torch.Tensor, timestep: int = 999
) -> torch.Tensor:
    """The scheduler's estimate of the clean sample ``x0`` from one UNet output.

    DDIM's estimate from the scheduler's own ``alphas_cumprod`` and ``prediction_type`` (the
    ``pred_original_sample`` of ``DDIMScheduler.step``, without its unused and here NaN ``prev_sample``);
    with :func:`one_step_scheduler` the result is exactly ``-model_output``.

    Parameters
    ----------
    scheduler
        A diffusers ``DDIMScheduler``.
    model_output
        ``[B, C, h, w]`` UNet output.
    sample
        ``[B, C, h, w]`` the UNet's "noisy" input latent (the query image latent; it has weight
        ``sqrt(alphas_cumprod[t]) = 0`` under the one-step scheduler).
    timestep
        Integer timestep in ``[0, num_train_timesteps)``; 999 (paper) or 1 (DiffewS code).

    Returns
    -------
    torch.Tensor
        ``[B, C, h, w]`` predicted clean sample, dtype of ``model_output``.
    """
    num_train = scheduler.config.num_train_timesteps
    if not 0 <= int(timestep) < num_train:
        raise ValueError(f"timestep must be in [0, {num_train}), got {timestep}.")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} must have the same shape."
        )
    # DDIM's x0 estimate (its step formula, from the scheduler's own alphas_cumprod and prediction type). The full
    # scheduler.step would also form prev_sample, which is 0/0 = NaN under alphas_cumprod = 0 and is never used.
    alpha = scheduler.alphas_cumprod[int(timestep)].to(device=model_output.device, dtype=torch.float32)
    x_t, out = sample.to(torch.float32), model_output.to(torch.float32)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        x0 = alpha.sqrt() * x_t - (1 - alpha).sqrt() * out
    elif kind == "epsilon":
        x0 = (x_t - (1 - alpha).sqrt() * out) / alpha.sqrt()
    elif kind == "sample":
        x0 = out
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (v_prediction, epsilon or sample)")
    if scheduler.config.thresholding:
        raise ValueError("dynamic thresholding is not supported by the one-step prediction")
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0.to(model_output.dtype)
