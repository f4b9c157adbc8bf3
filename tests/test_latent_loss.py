from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_sdfsmis.networks.latent_loss import foreground_cells, latent_mse, mask_latent_loss
from monai_sdfsmis.networks.sdfsmis import SDFSMIS


def test_foreground_cells_marks_every_cell_the_mask_touches():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 0, 0] = 1  # one pixel of the top-left 4x4 cell
    mask[0, 0, 5:7, 6] = 1  # two pixels of the bottom-right cell
    cells = foreground_cells(mask, (2, 2))
    assert cells.tolist() == [[[[1.0, 0.0], [0.0, 1.0]]]]
    with pytest.raises(ValueError, match="not a multiple"):
        foreground_cells(mask, (3, 3))


def test_latent_mse_by_hand():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 0, 0] = 1  # episode 0: cell (0, 0); episode 1: no foreground
    assert torch.equal(latent_mse(prediction, target), F.mse_loss(prediction, target))
    assert torch.equal(latent_mse(prediction, target, mask, 1.0), F.mse_loss(prediction, target))
    # by hand: every latent value weighs 1, except episode 0's four channels at cell (0, 0), which weigh 5
    total, weights = 0.0, 0.0
    for b in range(2):
        for c in range(4):
            for i in range(2):
                for j in range(2):
                    w = 5.0 if (b, i, j) == (0, 0, 0) else 1.0
                    total += w * float(prediction[b, c, i, j] - target[b, c, i, j]) ** 2
                    weights += w
    assert latent_mse(prediction, target, mask, 5.0).item() == pytest.approx(total / weights, rel=1e-6)
    with pytest.raises(ValueError, match="needs the target mask"):
        latent_mse(prediction, target, None, 5.0)
    with pytest.raises(ValueError, match="positive"):
        latent_mse(prediction, target, mask, 0.0)


def _episode(query_foreground: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    si, qi = (torch.rand(2, 3, 64, 64, generator=g) * 2 - 1 for _ in range(2))
    sl = torch.zeros(2, 1, 64, 64)
    sl[:, :, 20:40, 20:40] = 1
    ql = torch.zeros(2, 1, 64, 64)
    if query_foreground:
        ql[:, :, 10:30, 24:44] = 1
    return si, sl, qi, ql


def test_mask_latent_loss_and_its_logged_parts_by_hand():
    """The loss a network trains on and the parts it logs, against the formulas written out here."""
    torch.manual_seed(0)
    prediction, target, mean_target = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, :3, :3] = 1  # item 1 has no foreground

    def decode(latent: torch.Tensor) -> torch.Tensor:  # latent cell -> 4x4 pixels, channel mean, in [-1, 1]
        return torch.tanh(latent.mean(dim=1, keepdim=True)).repeat_interleave(4, 2).repeat_interleave(4, 3)

    weight = torch.ones(2, 1, 2, 2)
    weight[0, 0, 0, 0] = 3.0  # the one cell the mask touches
    squared = (prediction - target) ** 2
    mse = (weight * squared).sum() / (weight.expand_as(squared)).sum()
    p = (decode(prediction) + 1) / 2
    dice = (2 * (p * mask).sum(dim=(1, 2, 3)) + 1e-5) / (p.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3)) + 1e-5)
    loss, parts = mask_latent_loss(prediction, target, mask, 3.0, 0.25, decode)
    assert loss.item() == pytest.approx((mse + 0.25 * (1 - dice).mean()).item(), rel=1e-6)
    assert parts["loss_latent"].item() == pytest.approx(mse.item(), rel=1e-6)
    assert parts["loss_decoded_dice"].item() == pytest.approx((1 - dice).mean().item(), rel=1e-6)
    assert parts["loss_mean_target"].item() == pytest.approx(mse.item(), rel=1e-6)
    # a sampled target logs the MSE against the posterior mean instead
    squared_mean = (prediction - mean_target) ** 2
    mse_mean = (weight * squared_mean).sum() / (weight.expand_as(squared_mean)).sum()
    loss, parts = mask_latent_loss(prediction, target, mask, 3.0, mean_target=mean_target)
    assert loss.item() == pytest.approx(mse.item(), rel=1e-6) and set(parts) == {"loss_mean_target"}
    assert parts["loss_mean_target"].item() == pytest.approx(mse_mean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs decode"):
        mask_latent_loss(prediction, target, mask, decoded_dice_weight=0.5)


def test_sdfsmis_weights_the_query_organ_cells_only():
    plain = SDFSMIS.tiny(seed=0, vae_sample_in_training=False).train()
    weighted = SDFSMIS.tiny(seed=0, vae_sample_in_training=False, foreground_weight=8.0).train()
    assert weighted.settings["foreground_weight"] == 8.0 and plain.settings["foreground_weight"] == 1.0
    # no query foreground: no cell is weighted, the two losses are the paper's MSE
    empty = _episode(query_foreground=False)
    assert torch.allclose(plain.compute_loss(*empty), weighted.compute_loss(*empty))
    organ = _episode(query_foreground=True)
    assert not torch.allclose(plain.compute_loss(*organ), weighted.compute_loss(*organ))
    with pytest.raises(ValueError, match="foreground_weight"):
        SDFSMIS.tiny(seed=0, foreground_weight=0)


def test_decoded_dice_term_by_hand():
    """loss = latent MSE + w * (1 - soft Dice) of the decoded prediction, recomputed from the UNet's recorded output,
    the frozen decoder and the Dice formula; the term's gradient reaches the UNet through the frozen decoder."""
    from tests import hand_reference

    plain = SDFSMIS.tiny(seed=0, vae_sample_in_training=False).train()
    net = SDFSMIS.tiny(seed=0, vae_sample_in_training=False, decoded_dice_weight=0.5).train()
    assert net.settings["decoded_dice_weight"] == 0.5 and plain.settings["decoded_dice_weight"] == 0.0
    episode = _episode(query_foreground=True)
    with hand_reference.record_unet(net) as calls:
        loss, parts = net.compute_loss(*episode, return_parts=True)
    query = calls.only("query")
    z_qi = hand_reference.scaled_mean_latent(net.vae, episode[2])
    x0 = hand_reference.v_prediction_x0(query.output, z_qi, 0.0)
    z_qm = hand_reference.scaled_mean_latent(net.vae, hand_reference.mask_image(episode[3]))
    soft, _ = hand_reference.hand_decode(net.vae, x0)
    p, y = (soft + 1) / 2, episode[3]
    dice = 2 * (p * y).sum(dim=(1, 2, 3)) / (p.sum(dim=(1, 2, 3)) + y.sum(dim=(1, 2, 3)))
    expected = F.mse_loss(x0, z_qm) + 0.5 * (1 - dice).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert parts["loss_latent"].item() == pytest.approx(F.mse_loss(x0, z_qm).item(), rel=1e-5)
    assert parts["loss_mean_target"].item() == parts["loss_latent"].item()
    torch.testing.assert_close(plain.compute_loss(*episode), parts["loss_latent"], rtol=1e-5, atol=1e-6)
    loss.backward()
    assert query.live.grad is not None and query.live.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.vae.parameters())
    with pytest.raises(ValueError, match="decoded_dice_weight"):
        SDFSMIS.tiny(seed=0, decoded_dice_weight=-1)
