"""Independent recomputations of the SD-FSMIS method core, for the tests that pin it.

Nothing here calls the network's own composition (``compute_loss``, ``encode_latents``, ``decode_mask``,
``predict_mask_latent``, ``mask_to_image``, ``QueryEnhancement``, ``predict_original_sample``): only the
frozen VAE's diffusers calls, the scheduler's ``alphas_cumprod`` table and the UNet's recorded in- and
outputs, combined with the formulas of the paper (and DiffewS's code) written out by hand.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


def mask_image(label: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` in {0, 1} -> ``[B, 3, H, W]`` in {-1, 1}: what SD's VAE sees of a mask."""
    return (label.float() * 2.0 - 1.0).repeat(1, 3, 1, 1)


@torch.no_grad()
def scaled_mean_latent(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Posterior mean of the frozen VAE times its scaling factor (tiny configs have no shift factor)."""
    assert not getattr(vae.config, "shift_factor", None), "the hand formulas below assume no VAE shift factor"
    return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def hand_decode(vae: Any, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled mask latent -> (soft mask ``[B, 1, H, W]`` = channel mean of the clipped decode, the clipped decode)."""
    image = vae.decode(latent / vae.config.scaling_factor).sample.float().clamp(-1.0, 1.0)
    return image.mean(dim=1, keepdim=True), image


def one_step_alpha_bar(scheduler: Any, timestep: int) -> float:
    """``alphas_cumprod[t]`` of DiffewS's one-step scheduler, recomputed from its documented config.

    ``scaled_linear`` betas: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (DDPM/SD), here with
    ``beta_start = beta_end = 1`` so every ``alpha_bar`` is 0. Checked against the scheduler's own table.
    """
    config = scheduler.config
    assert config.beta_schedule == "scaled_linear" and config.prediction_type == "v_prediction"
    assert config.beta_start == config.beta_end == 1.0  # DiffewS scheduler_1.0_1.0
    steps = config.num_train_timesteps
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, steps, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    torch.testing.assert_close(alpha_bar.float(), scheduler.alphas_cumprod.float(), rtol=0, atol=1e-7)
    return float(alpha_bar[timestep])


def v_prediction_x0(v: torch.Tensor, sample: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """DDIM's clean-sample estimate for a v-prediction model: ``sqrt(a) * x_t - sqrt(1 - a) * v``."""
    return alpha_bar**0.5 * sample.float() - (1.0 - alpha_bar) ** 0.5 * v.float()


def hand_query_enhancement(
    support_latent: torch.Tensor, support_label: torch.Tensor, query_latent: torch.Tensor,
    threshold: float = 0.7, fallback_k: int = 12,
) -> torch.Tensor:
    """QE [P Eq. 2-4], cosine mode: ``[z_qi, broadcast(p_q)]``.

    ``p_s``: support latent averaged with the mask's foreground fraction of each latent cell as weight; ``p_q``:
    mean of the query latent vectors whose cosine with ``p_s`` exceeds ``threshold`` (the ``fallback_k`` most
    similar when none does). Pairs ``support[i]`` with ``query[i]``.
    """
    factor = support_label.shape[-1] // support_latent.shape[-1]
    weight = F.avg_pool2d(support_label.float(), factor)  # [B, 1, h, w]: foreground fraction per cell
    p_s = (support_latent * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))  # [B, C]
    out = []
    for b in range(query_latent.shape[0]):
        q = query_latent[b].flatten(1).T  # [L, C]
        cos = (q @ p_s[b]) / (q.norm(dim=1) * p_s[b].norm())
        chosen = cos > threshold
        if not chosen.any():
            chosen = torch.zeros_like(chosen)
            chosen[cos.argsort(descending=True)[:fallback_k]] = True
        p_q = q[chosen].mean(dim=0)
        out.append(torch.cat([query_latent[b], p_q[:, None, None].expand_as(query_latent[b])]))
    return torch.stack(out)


@dataclass
class UNetCall:
    branch: str
    sample: torch.Tensor
    timestep: torch.Tensor
    condition: torch.Tensor
    output: torch.Tensor
    live: torch.Tensor  # the output tensor itself (its ``.grad`` is kept after a backward pass)


@dataclass
class UNetRecorder:
    calls: list[UNetCall] = field(default_factory=list)

    def only(self, branch: str) -> UNetCall:
        found = [c for c in self.calls if c.branch == branch]
        assert len(found) == 1, f"expected one {branch} UNet call, got {[c.branch for c in self.calls]}"
        return found[0]


@contextmanager
def record_unet(model: Any):
    """Record every call of ``model.unet`` (input sample, timestep, condition, output, and the input conv's routing)."""
    recorder = UNetRecorder()

    def hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        condition = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        out = output[0] if isinstance(output, tuple) else output.sample
        if out.requires_grad:
            out.retain_grad()
        recorder.calls.append(UNetCall(
            model.unet.conv_in.branch, sample.detach().clone(), torch.as_tensor(timestep).detach().clone(),
            condition.detach().clone(), out.detach().clone(), out,
        ))

    handle = model.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()


def hand_loss_check(model: Any, support_image, support_label, query_image, query_label, loss: torch.Tensor,
                    calls: UNetRecorder, qe: bool = True, backward: bool = True) -> dict[str, float]:
    """Assert that ``loss`` is Eq. 5 recomputed by hand from the recorded UNet calls; return the margins.

    Checks the support pass input ``[z_si, z_sm]``, the query pass input (QE by hand), the timestep, the loss value
    ``MSE(sqrt(a) z_qi - sqrt(1 - a) v, z_qm)`` and, with ``backward``, the regression target read back from the
    gradient: ``dL/dv = -sqrt(1 - a) * 2 (x0 - target) / N`` gives ``target`` exactly, whatever ``x0`` is (the
    loss value alone separates the query- from the support-mask target by only ~1% on an untrained model).

    Returns ``{"loss", "support_target_mse", "margin", "target_error", "target_vs_support"}``: the MSE the loss would
    be with the *support* mask latent as target, ``|loss - that| / loss``, and (with ``backward``) the RMS distance of
    the recovered target to ``z_qm`` and to ``z_sm``.
    """
    z_si = scaled_mean_latent(model.vae, support_image)
    z_sm = scaled_mean_latent(model.vae, mask_image(support_label))
    z_qi = scaled_mean_latent(model.vae, query_image)
    z_qm = scaled_mean_latent(model.vae, mask_image(query_label))
    t = model.config.timestep
    if model.config.use_sii:
        support = calls.only("support")
        torch.testing.assert_close(support.sample, torch.cat([z_si, z_sm], dim=1), rtol=1e-5, atol=1e-6)
        assert torch.all(support.timestep == t)
    query = calls.only("query")
    expected_input = hand_query_enhancement(z_si, support_label, z_qi) if qe else z_qi
    torch.testing.assert_close(query.sample, expected_input, rtol=1e-5, atol=1e-6)
    assert torch.all(query.timestep == t)
    x0 = v_prediction_x0(query.output, z_qi, one_step_alpha_bar(model.scheduler, t))
    manual = ((x0 - z_qm.float()) ** 2).mean()
    torch.testing.assert_close(loss.detach(), manual)
    wrong = float(((x0 - z_sm.float()) ** 2).mean())
    result = {"loss": float(manual), "support_target_mse": wrong, "margin": abs(float(manual) - wrong) / float(manual)}
    if backward:
        loss.backward()
        grad = query.live.grad
        assert grad is not None, "the loss does not depend on the query pass output"
        alpha_bar = one_step_alpha_bar(model.scheduler, t)
        target = x0 + grad.float() * x0.numel() / (2.0 * (1.0 - alpha_bar) ** 0.5)
        result["target_error"] = float((target - z_qm).pow(2).mean().sqrt())
        result["target_vs_support"] = float((target - z_sm).pow(2).mean().sqrt())
        torch.testing.assert_close(target, z_qm.float(), rtol=0, atol=1e-5)
    return result
