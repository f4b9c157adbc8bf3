"""LatentCache: frozen-VAE posteriors served by key, the episode keys that feed it, and cached training."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader

from monai_sdfsmis.data.episodes import LATENT_KEY_SUFFIX, EpisodeDataset
from monai_sdfsmis.data.phantoms import make_phantom_dataset
from monai_sdfsmis.data.volumes import VolumeStore
from monai_sdfsmis.engines.trainer import EPISODE_KEYS, EpisodeTrainer
from monai_sdfsmis.networks.latent_cache import LatentCache
from monai_sdfsmis.networks.sdfsmis import SDFSMIS
from monai_sdfsmis.transforms.augmentation import RPTAugmentd

SIZE = 64  # in-plane size of the episodes (latent 8x8)
KEYS = tuple(f"{k}{LATENT_KEY_SUFFIX}" for k in EPISODE_KEYS)

Events = pytest.importorskip("ignite.engine").Events


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    records = make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_volumes=2, shape=(48, 48, 12), seed=0)
    return VolumeStore(records, spatial_size=SIZE)


def _dataset(store, augment=None, length=8, seed=0):
    return EpisodeDataset(store, length=length, seed=seed, min_size=20, augment=augment)


class _CountingNet:
    """Delegates ``encode_posterior`` to a network and counts the images it was asked to encode."""

    def __init__(self, net):
        self.net, self.encoded = net, 0

    def encode_posterior(self, images):
        self.encoded += images.shape[0]
        return self.net.encode_posterior(images)


@pytest.fixture(scope="module")
def model():
    return SDFSMIS.tiny(seed=0, vae_sample_in_training=False).eval()


def _distinct_support_episodes(store, n):
    """The first ``n`` episodes with different support slices (so that their ``2n`` keys are all different)."""
    dataset, chosen = _dataset(store, length=64), {}
    for i in range(len(dataset)):
        episode = dataset[i]
        chosen.setdefault(episode["support_image_key"], episode)
        if len(chosen) == n:
            return list(chosen.values())
    raise AssertionError("not enough distinct support slices")


def _images(episodes):
    """Support images and support masks (as the VAE sees them) of a list of episodes, with their keys."""
    masks = [SDFSMIS.mask_to_image(e["support_label"][None])[0] for e in episodes]
    images = torch.stack([e["support_image"] for e in episodes] + masks)
    keys = [e["support_image_key"] for e in episodes] + [e["support_label_key"] for e in episodes]
    return images, keys


def test_cache_serves_the_fresh_encoder_posteriors(store, model):
    images, keys = _images(_distinct_support_episodes(store, 4))
    assert all(keys) and len(set(keys)) == len(keys)
    direct = torch.stack([model.vae.encode(img[None]).latent_dist.parameters[0] for img in images])  # one by one
    net, cache = _CountingNet(model), LatentCache()

    first = cache.posteriors(net, images, keys)
    assert first.shape == (8, 8, SIZE // 8, SIZE // 8) and first.dtype == torch.float32
    torch.testing.assert_close(first, direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first, model.encode_posterior(images), rtol=1e-5, atol=1e-6)
    assert (net.encoded, cache.misses, cache.hits, len(cache)) == (8, 8, 0, 8) and all(k in cache for k in keys)

    # Repeated keys are served from the cache: nothing is encoded, and what comes back is what was stored, even
    # for a (wrong) image that the key does not describe: the key, not the pixels, names the content.
    again = cache.posteriors(net, torch.zeros_like(images), keys)
    assert torch.equal(again, first) and net.encoded == 8 and (cache.hits, cache.misses) == (8, 8)
    assert cache.hit_rate == pytest.approx(0.5)

    # "" (and None) keys are encoded every time and never stored; a key repeated inside a batch is encoded once.
    mixed_images = torch.cat([images[:2], images[:2], images[5:6]])
    fresh = ["", None, keys[0], keys[0], "new"]
    out = cache.posteriors(net, mixed_images, fresh)
    assert net.encoded == 8 + 3 and len(cache) == 9 and "" not in cache and "new" in cache
    torch.testing.assert_close(out, torch.cat([direct[:2], direct[:1], direct[:1], direct[5:6]]), rtol=1e-5, atol=1e-6)
    out = cache.posteriors(net, images[:2], ["", ""])
    assert net.encoded == 13 and len(cache) == 9
    torch.testing.assert_close(out, direct[:2], rtol=1e-5, atol=1e-6)

    cache.clear()
    assert len(cache) == 0 and cache.hits == cache.misses == 0
    with pytest.raises(ValueError, match="one key per image"):
        cache.posteriors(net, images, keys[:3])


def test_cache_limits_and_storage_dtype(store, model):
    images, keys = _images(_distinct_support_episodes(store, 2))
    direct = model.encode_posterior(images)
    net, cache = _CountingNet(model), LatentCache(max_items=2)
    out = cache.posteriors(net, images, keys)
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-6)
    assert len(cache) == 2 and [k in cache for k in keys] == [True, True, False, False]
    cache.posteriors(net, images, keys)
    assert net.encoded == 4 + 2  # only the two that did not fit are encoded again
    half = LatentCache(dtype=torch.bfloat16)
    half.posteriors(model, images, keys)
    served = half.posteriors(model, images, keys)
    assert served.dtype == torch.float32  # everything cached: served as float32
    torch.testing.assert_close(served, direct.bfloat16().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_items"):
        LatentCache(max_items=0)


def test_episode_keys_are_empty_exactly_where_augmentation_changed_the_tensor(store):
    plain_ds, augmented_ds = _dataset(store, length=24), _dataset(store, RPTAugmentd(), length=24)
    changed = kept = 0
    content: dict[str, torch.Tensor] = {}
    for i in range(24):
        plain, augmented = plain_ds[i], augmented_ds[i]
        for name in ("volume_id", "supervoxel_id", "support_slice", "query_slice"):
            assert plain[name] == augmented[name]
        vid, sv = plain["volume_id"], plain["supervoxel_id"]
        s, q = plain["support_slice"], plain["query_slice"]
        expected = {
            "support_image_key": f"{vid}/{s}", "support_label_key": f"{vid}/{s}/{sv}",
            "query_image_key": f"{vid}/{q}", "query_label_key": f"{vid}/{q}/{sv}",
        }
        assert {k: plain[k] for k in KEYS} == expected  # without augmentation every tensor is the stored slice
        for tensor_key, key in zip(EPISODE_KEYS, KEYS):
            same = torch.equal(augmented[tensor_key], plain[tensor_key])
            assert augmented[key] == (expected[key] if same else ""), (i, tensor_key)
            changed += not same
            kept += same
            for episode in (plain, augmented):
                if episode[key]:  # a key names one content, wherever it appears
                    if episode[key] in content:
                        assert torch.equal(content[episode[key]], episode[tensor_key]), episode[key]
                    content[episode[key]] = episode[tensor_key]
    assert changed > 10 and kept > 10  # both cases were exercised (measured: about half each)


@pytest.mark.parametrize("augment", [None, "rpt"])
def test_cached_training_gives_the_uncached_losses(store, augment):
    """Two epochs of EpisodeTrainer over the same 4 episodes, with and without a LatentCache, from the same weights:
    the same losses (the second epoch served from the cache except for augmented tensors)."""
    dataset = _dataset(store, RPTAugmentd() if augment else None, length=4)
    batches = list(DataLoader(dataset, batch_size=2, num_workers=0))
    empty = sum(k == "" for b in batches for name in KEYS for k in b[name])
    distinct = len({k for b in batches for name in KEYS for k in b[name] if k})

    def run(cache):
        net = SDFSMIS.tiny(seed=0, vae_sample_in_training=False)
        optimizer = torch.optim.AdamW(net.parameter_groups(lr_unet=1e-3, lr_new=1e-3))
        trainer = EpisodeTrainer(
            device="cpu", max_epochs=2, train_data_loader=batches, network=net, optimizer=optimizer, latent_cache=cache
        )
        losses: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
        trainer.run()
        return losses

    cache = LatentCache()
    cached, uncached = run(cache), run(None)
    assert len(cached) == 4
    # The cache encodes its misses in batches of another size than the uncached run, and oneDNN picks its fp32
    # convolution kernels by batch size: on the AMD EPYC sandbox the losses then differ by up to 2.6e-5 relative.
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(uncached), rtol=1e-4, atol=1e-6)
    assert len(cache) == distinct and cache.misses == distinct + 2 * empty
    assert cache.hits == 2 * 4 * 4 - cache.misses  # 2 epochs x 4 episodes x 4 tensors
    if augment:
        assert empty > 0
    else:
        assert empty == 0 and cache.hits >= 16  # the whole second epoch
