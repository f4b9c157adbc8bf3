from __future__ import annotations

import pytest
import torch

from monai_sdfsmis.networks.one_step import ONE_STEP_SCHEDULER_CONFIG, one_step_scheduler, predict_original_sample


def test_scheduler_is_configured_as_diffews():
    scheduler = one_step_scheduler()
    config = scheduler.config
    for key, value in ONE_STEP_SCHEDULER_CONFIG.items():
        assert config[key] == value, key
    assert config.prediction_type == "v_prediction"
    assert config.beta_start == config.beta_end == 1.0
    # beta == 1 everywhere -> every alpha_bar is 0, which is what makes x0 = -v for any t
    assert torch.count_nonzero(scheduler.alphas_cumprod) == 0
    # leading spacing + offset 1 with one inference step gives DiffewS's t = 1
    assert scheduler.timesteps.tolist() == [1]


@pytest.mark.parametrize("timestep", [999, 1])
def test_predict_original_sample_is_minus_model_output(timestep):
    g = torch.Generator().manual_seed(0)
    output = torch.randn(2, 4, 8, 8, generator=g)
    sample = torch.randn(2, 4, 8, 8, generator=g) * 5
    x0 = predict_original_sample(one_step_scheduler(), output, sample, timestep)
    assert torch.equal(x0, -output)


def test_predict_original_sample_keeps_dtype_and_grad():
    output = torch.randn(1, 4, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    x0 = predict_original_sample(one_step_scheduler(), output, torch.randn(1, 4, 4, 4), 999)
    assert x0.dtype == torch.bfloat16
    assert torch.equal(x0, -output.detach())
    x0.float().sum().backward()
    assert torch.equal(output.grad, torch.full_like(output, -1.0))


def test_predict_original_sample_sets_timesteps_when_missing():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**ONE_STEP_SCHEDULER_CONFIG)  # set_timesteps never called
    output = torch.randn(1, 4, 2, 2)
    assert torch.equal(predict_original_sample(scheduler, output, torch.zeros_like(output)), -output)


def test_predict_original_sample_rejects_bad_input():
    scheduler = one_step_scheduler()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="timestep"):
        predict_original_sample(scheduler, x, x, 1000)
    with pytest.raises(ValueError, match="same shape"):
        predict_original_sample(scheduler, x, torch.zeros(1, 8, 2, 2), 999)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_predict_original_sample_equals_ddim_step_on_an_ordinary_schedule(prediction_type, clip_sample):
    """Against diffusers' own DDIM step (where its prev_sample is finite): the same x0 for every prediction type."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=clip_sample)
    scheduler.set_timesteps(10)
    output, sample = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = int(scheduler.timesteps[3])
    expected = scheduler.step(output, t, sample).pred_original_sample
    torch.testing.assert_close(predict_original_sample(scheduler, output, sample, t), expected)


def test_one_step_prediction_is_finite():
    x0 = predict_original_sample(one_step_scheduler(), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), 999)
    assert torch.isfinite(x0).all()
