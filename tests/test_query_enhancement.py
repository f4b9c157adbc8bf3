from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_sdfsmis.networks.query_enhancement import QueryEnhancement, downsample_mask, masked_average_pool


def _hand_prototype(latent: np.ndarray, mask_full: np.ndarray) -> np.ndarray:
    """MAP with the mask averaged over each latent cell (area downsampling), written with loops."""
    c, h, w = latent.shape
    fh, fw = mask_full.shape[0] // h, mask_full.shape[1] // w
    num, den = np.zeros(c), 0.0
    for i in range(h):
        for j in range(w):
            weight = mask_full[i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean()
            num += weight * latent[:, i, j]
            den += weight
    return num / den


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_shapes_dtype_and_layout():
    qe = QueryEnhancement()
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 10:40, 20:50] = 1
    out = qe(support, mask, query)
    assert out.shape == (2, 8, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out[:, :4], query)
    # the prototype half is constant over the grid
    assert torch.equal(out[:, 4:], out[:, 4:, :1, :1].expand(-1, -1, 8, 8))
    # cacheable support side gives the same
    assert torch.equal(qe.enhance(query, qe.support_prototype(support, mask)), out)
    out16 = qe(support.bfloat16(), mask, query.bfloat16())
    assert out16.dtype == torch.bfloat16 and out16.shape == (2, 8, 8, 8)


def test_area_downsampling_is_soft():
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 0:4, 0:8] = 1  # half of the first 8x8 cell, nothing else
    small = downsample_mask(mask, (2, 2), "area")
    assert torch.allclose(small, torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]]))
    feats = torch.arange(16.0).view(1, 4, 2, 2)
    assert torch.allclose(masked_average_pool(feats, small), feats[:, :, 0, 0])


def test_cosine_path_matches_hand_computation():
    rng = np.random.default_rng(1)
    support = rng.normal(size=(4, 8, 8))
    mask = np.zeros((64, 64))
    mask[5:37, 11:30] = 1  # not aligned with the 8x8 cells -> soft weights at the border
    p_s = _hand_prototype(support, mask)
    query = rng.normal(size=(4, 8, 8))
    # plant positions clearly similar to p_s so that some (but not all) pass 0.7
    for i, j in [(0, 0), (3, 4), (7, 7)]:
        query[:, i, j] = 2.0 * p_s + 0.05 * rng.normal(size=4)
    cos = np.array([[_cos(query[:, i, j], p_s) for j in range(8)] for i in range(8)])
    chosen = cos > 0.7
    assert 3 <= chosen.sum() < 64
    expected = query[:, chosen].mean(axis=1)

    qe = QueryEnhancement(threshold=0.7, mode="cosine")
    t = lambda a: torch.tensor(a, dtype=torch.float32)[None]  # noqa: E731
    proto = qe.support_prototype(t(support), t(mask)[None])
    assert proto.shape == (1, 1, 4)
    np.testing.assert_allclose(proto[0, 0].numpy(), p_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(qe.scores(t(query), proto)[0].view(8, 8).numpy(), cos, rtol=1e-5, atol=1e-6)
    p_q = qe.query_prototype(t(query), proto)[0]
    np.testing.assert_allclose(p_q.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_spatial_enhancement_places_p_q_by_each_positions_cosine():
    rng = np.random.default_rng(7)
    support = rng.normal(size=(4, 8, 8))
    mask = np.zeros((64, 64))
    mask[8:40, 16:48] = 1
    p_s = _hand_prototype(support, mask)
    query = rng.normal(size=(4, 8, 8))
    for i, j in [(1, 2), (5, 5)]:
        query[:, i, j] = 3.0 * p_s + 0.05 * rng.normal(size=4)
    cos = np.array([[_cos(query[:, i, j], p_s) for j in range(8)] for i in range(8)])
    chosen = cos > 0.7
    p_q = query[:, chosen].mean(axis=1)
    # by hand: p_q at every position, scaled by that position's cosine, negative cosines as 0
    expected = p_q[:, None, None] * np.maximum(cos, 0.0)[None]

    t = lambda a: torch.tensor(a, dtype=torch.float32)[None]  # noqa: E731
    spatial = QueryEnhancement(spatial=True)
    out = spatial(t(support), t(mask)[None], t(query))[0]
    assert out.shape == (8, 8, 8)
    np.testing.assert_allclose(out[:4].numpy(), query, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[4:].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert (np.maximum(cos, 0.0) == 0).any() and not np.allclose(expected, p_q[:, None, None])
    # the paper's QE (the default) broadcasts the same p_q everywhere
    broadcast = QueryEnhancement()(t(support), t(mask)[None], t(query))[0]
    np.testing.assert_allclose(broadcast[4:].numpy(), np.broadcast_to(p_q[:, None, None], (4, 8, 8)), rtol=1e-5, atol=1e-5)


def test_fallback_to_top_k_when_nothing_passes():
    rng = np.random.default_rng(2)
    support = rng.normal(size=(4, 4, 4)) + np.array([3.0, 0, 0, 0])[:, None, None]
    mask = np.ones((32, 32))
    p_s = _hand_prototype(support, mask)
    # every query vector points away from p_s: cosine < 0.7 everywhere
    query = -p_s[:, None, None] + 0.8 * rng.normal(size=(4, 4, 4)) * np.linalg.norm(p_s)
    cos = np.array([[_cos(query[:, i, j], p_s) for j in range(4)] for i in range(4)]).ravel()
    assert cos.max() < 0.7
    top = np.argsort(-cos)[:12]
    expected = query.reshape(4, -1)[:, top].mean(axis=1)

    qe = QueryEnhancement(threshold=0.7, fallback_k=12)
    t = lambda a: torch.tensor(a, dtype=torch.float32)[None]  # noqa: E731
    out = qe(t(support), t(mask)[None], t(query))
    np.testing.assert_allclose(out[0, 4:, 0, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    # fallback_k larger than the grid uses every position
    out_all = QueryEnhancement(fallback_k=100)(t(support), t(mask)[None], t(query))
    np.testing.assert_allclose(out_all[0, 4:, 0, 0].numpy(), query.reshape(4, -1).mean(axis=1), rtol=1e-5, atol=1e-6)


def test_ssp_mode_matches_hand_computation_and_differs_from_cosine():
    rng = np.random.default_rng(3)
    support = rng.normal(size=(4, 4, 4))
    mask = np.zeros((32, 32))
    mask[0:16, 0:16] = 1  # four full cells
    fg = _hand_prototype(support, mask)
    bg = _hand_prototype(support, 1 - mask)
    query = rng.normal(size=(4, 4, 4))
    query[:, 1, 1] = fg
    scores = []
    for i in range(4):
        for j in range(4):
            v = query[:, i, j]
            logits = np.array([_cos(v, bg), _cos(v, fg)]) * 10
            scores.append(np.exp(logits[1]) / np.exp(logits).sum())
    scores = np.array(scores)
    chosen = scores > 0.7
    assert chosen.any()
    expected = query.reshape(4, -1)[:, chosen].mean(axis=1)

    t = lambda a: torch.tensor(a, dtype=torch.float32)[None]  # noqa: E731
    ssp = QueryEnhancement(mode="ssp")
    proto = ssp.support_prototype(t(support), t(mask)[None])
    assert proto.shape == (1, 2, 4)
    np.testing.assert_allclose(ssp.scores(t(query), proto)[0].numpy(), scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ssp.query_prototype(t(query), proto)[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    cosine = QueryEnhancement(mode="cosine")(t(support), t(mask)[None], t(query))
    assert not torch.allclose(cosine, ssp(t(support), t(mask)[None], t(query)))


def test_one_support_broadcasts_to_many_queries():
    qe = QueryEnhancement()
    g = torch.Generator().manual_seed(4)
    support, queries = torch.randn(1, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:30, 8:30] = 1
    proto = qe.support_prototype(support, mask)
    batched = qe.enhance(queries, proto)
    for i in range(3):
        assert torch.allclose(batched[i:i + 1], qe.enhance(queries[i:i + 1], proto), atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        qe.enhance(queries, torch.cat([proto, proto]))


def test_bad_inputs_raise_clear_errors():
    qe = QueryEnhancement()
    latent = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, :10, :10] = 1  # item 1 empty
    with pytest.raises(ValueError, match=r"support mask is empty \(batch items \[1\]\)"):
        qe.support_prototype(latent, mask)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        qe.support_prototype(latent, torch.ones(2, 64, 64))
    tiny_mask = torch.zeros(1, 1, 64, 64)
    tiny_mask[0, 0, 3, 3] = 1  # lost by nearest downsampling to 8x8
    with pytest.raises(ValueError, match="vanishes"):
        QueryEnhancement(mask_downsample="nearest").support_prototype(latent[:1], tiny_mask)
    with pytest.raises(ValueError, match="QE mode"):
        QueryEnhancement(mode="softmax")
    with pytest.raises(ValueError, match="mask_downsample"):
        QueryEnhancement(mask_downsample="cubic")
    with pytest.raises(ValueError, match="prototype"):
        qe.enhance(latent, torch.randn(2, 4))
