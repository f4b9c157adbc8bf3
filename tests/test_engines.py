from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.handlers import CheckpointSaver, StatsHandler, TensorBoardStatsHandler, ValidationHandler, from_engine
from torch import nn
from torch.utils.data import Subset

from monai_sdfsmis.data.layouts import find_alpnet_volumes
from monai_sdfsmis.data.volumes import VolumeStore
from monai_sdfsmis.engines import (
    AtomicCheckpointSaver,
    EpisodeTrainer,
    EpisodeTrainingStep,
    ProtocolDataset,
    ProtocolEvaluator,
    ResumeFromCheckpoint,
    latest_checkpoint,
)
from monai_sdfsmis.inferers import SlidingSupportInferer
from tests.utils import chaos_dir, requires_chaos

Events = pytest.importorskip("ignite.engine").Events


class SmallFewShotNet(nn.Module):
    """A real (small) trainable few-shot segmenter with the SDFSMIS interface, for engine wiring tests.

    Predicts the query mask from the query image and the support's masked mean intensity.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 1, kernel_size=3, padding=1)
        self.scale = scale

    def _logits(self, query: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        features = torch.cat([query, prototype.expand(query.shape[0], 1, *query.shape[-2:])], dim=1)
        return self.conv(features) * self.scale

    @staticmethod
    def _prototype(image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        weight = label.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
        return (image.mean(dim=1, keepdim=True) * label).sum(dim=(1, 2, 3), keepdim=True) / weight

    def compute_loss(self, support_image, support_label, query_image, query_label) -> torch.Tensor:
        logits = self._logits(query_image, self._prototype(support_image, support_label))
        return nn.functional.binary_cross_entropy_with_logits(logits, query_label)

    def encode_support(self, support_image, support_label):
        return self._prototype(support_image, support_label)

    def segment(self, query_image, context):
        return torch.tanh(self._logits(query_image, context))

    def binarize(self, soft):
        return soft > 0


def _episodes(n: int, size: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        label = (torch.rand(1, size, size, generator=g) > 0.7).float()
        image = (label * 1.6 - 0.8).repeat(3, 1, 1) + 0.1 * torch.randn(3, size, size, generator=g)
        items.append(
            {"support_image": image.clamp(-1, 1), "support_label": label, "query_image": image.clamp(-1, 1), "query_label": label}
        )
    return items


def _params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@requires_chaos
def test_tiny_sdfsmis_trains_on_chaos_episodes_checkpoints_and_resumes(tmp_path, capsys):
    sdfsmis = pytest.importorskip("monai_sdfsmis.networks.sdfsmis")
    episodes_mod = pytest.importorskip("monai_sdfsmis.data.episodes")
    records = [r for r in find_alpnet_volumes(chaos_dir()) if r.id in ("1", "2")]
    store = VolumeStore(records, intensity="minmax", spatial_size=256)
    loader = DataLoader(episodes_mod.EpisodeDataset(store, length=1, seed=0), batch_size=1, num_workers=0)
    ckpt_dir = tmp_path / "ckpt"

    def make(seed: int, max_epochs: int, resume: bool):
        net = sdfsmis.SDFSMIS.tiny(seed=seed)
        optimizer = torch.optim.AdamW(net.parameter_groups(lr_unet=1e-3, lr_new=1e-3))
        losses: list[float] = []
        handlers = [
            StatsHandler(name="train_stats", tag_name="train_loss", output_transform=from_engine(["loss"], first=True)),
            TensorBoardStatsHandler(log_dir=str(tmp_path / "tb"), tag_name="train_loss", output_transform=from_engine(["loss"], first=True)),
            AtomicCheckpointSaver(
                save_dir=str(ckpt_dir), save_dict={"network": net, "optimizer": optimizer},
                engine_key="trainer",
                save_interval=1,
                epoch_level=False,
                n_saved=1,
            ),
        ]
        if resume:
            handlers.insert(0, ResumeFromCheckpoint(ckpt_dir, {"network": net, "optimizer": optimizer}))
        trainer = EpisodeTrainer(
            device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=net, optimizer=optimizer, train_handlers=handlers
        )
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
        return net, trainer, losses, handlers

    net, trainer, losses, _ = make(seed=0, max_epochs=2, resume=False)
    before = _params(net)
    trainer.run()
    assert trainer.state.iteration == 2 and len(losses) == 2
    assert all(torch.isfinite(torch.tensor(losses)))
    logged = capsys.readouterr()
    assert logged.out.count("train_loss: ") == 2  # StatsHandler read the loss with from_engine(["loss"], first=True)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    after = _params(net)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the optimizer stepped
    saved = latest_checkpoint(ckpt_dir)
    assert saved is not None and saved.name == "checkpoint_iteration=2.pt"
    assert not [p for p in ckpt_dir.iterdir() if not p.name.endswith(".pt")]  # no temporary file left

    # a new process: fresh weights (another seed), resumes from iteration 2 with the trained weights
    net2, trainer2, losses2, handlers2 = make(seed=1, max_epochs=3, resume=True)
    seen: dict[str, torch.Tensor] = {}
    trainer2.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.setdefault("w", _params(net2)))
    trainer2.run()
    assert handlers2[0].loaded_from == saved
    assert trainer2.state.iteration == 3 and len(losses2) == 1
    for k in after:
        assert torch.equal(seen["w"][k], after[k])
    assert latest_checkpoint(ckpt_dir).name == "checkpoint_iteration=3.pt"


def test_validation_handler_runs_protocol_evaluator_and_keeps_best_model(tmp_path):
    torch.manual_seed(0)
    net = SmallFewShotNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    # a validation "volume": 6 slices of the same synthetic pattern, the support being the query itself
    vol = _episodes(6, seed=3)
    image = torch.stack([e["query_image"][:1] for e in vol], dim=-1)  # [1, H, W, 6]
    label = torch.stack([e["query_label"] for e in vol], dim=-1)
    item = {"image": image, "label": label, "support_image": image, "support_label": label, "fold": 0, "organ": "x", "query_id": "q"}
    evaluator = ProtocolEvaluator(
        device="cpu",
        val_data_loader=DataLoader([item], batch_size=1),
        network=net,
        inferer=SlidingSupportInferer(spatial_size=32),
        surface_metrics=False,
        val_handlers=[
            AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"network": net}, save_key_metric=True, key_metric_filename="model.pt")
        ],
    )
    trainer = EpisodeTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=4,
        train_data_loader=DataLoader(_episodes(4), batch_size=2),
        network=net,
        optimizer=optimizer,
        train_handlers=[ValidationHandler(validator=evaluator, interval=2, epoch_level=False)],
    )
    runs: list[float] = []
    evaluator.add_event_handler(Events.COMPLETED, lambda e: runs.append(e.state.metrics["val_mean_dice"]))
    trainer.run()
    assert len(runs) == 2  # validated at iterations 2 and 4
    assert evaluator.state.key_metric_name == "val_mean_dice"
    assert 0.0 <= evaluator.state.best_metric <= 1.0 and evaluator.state.best_metric == pytest.approx(max(runs))
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(saved) == set(net.state_dict())


def test_gradient_clipping_bounds_the_step():
    net = SmallFewShotNet(scale=1000.0)  # huge logits -> huge gradients
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    batch = {k: torch.stack([e[k] for e in _episodes(2)]) for k in _episodes(1)[0]}
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    trainer = EpisodeTrainer(device="cpu", max_epochs=1, train_data_loader=[batch], network=net, optimizer=optimizer, grad_clip=1.0)
    trainer.run()
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert 0 < float((after - before).norm()) <= 1.0 + 1e-5
    assert len(trainer.state.output) == 2 and set(trainer.state.output[0]) == {"loss"}  # one per episode
    assert float(from_engine(["loss"], first=True)(trainer.state.output)) > 0


def test_non_finite_loss_skips_the_step():
    class NaNLoss(SmallFewShotNet):
        def compute_loss(self, *args):
            return super().compute_loss(*args) * float("nan")

    net = NaNLoss()
    before = _params(net)
    batch = {k: torch.stack([e[k] for e in _episodes(1)]) for k in _episodes(1)[0]}
    trainer = EpisodeTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch], network=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0)
    )
    with pytest.warns(UserWarning, match="Non-finite loss"):
        trainer.run()
    assert trainer.state.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_training_step_rejects_bad_batches_and_networks():
    batch = {k: torch.stack([e[k] for e in _episodes(1)]) for k in _episodes(1)[0]}
    net = SmallFewShotNet()
    incomplete = {k: v for k, v in batch.items() if k != "query_label"}
    trainer = EpisodeTrainer(device="cpu", max_epochs=1, train_data_loader=[incomplete], network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="lacks"):
        trainer.run()
    plain = nn.Conv2d(1, 1, 1)
    trainer = EpisodeTrainer(device="cpu", max_epochs=1, train_data_loader=[batch], network=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no compute_loss"):
        trainer.run()
    with pytest.raises(ValueError, match="grad_clip"):
        EpisodeTrainingStep(grad_clip=-1.0)


def test_atomic_checkpoint_saver_never_leaves_a_partial_file(tmp_path):
    class Unpicklable:
        def state_dict(self):
            return {"f": lambda: 0}  # pickling a lambda fails half-way through torch.save

    net = nn.Linear(2, 2)
    good = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"net": net}, save_final=True, final_filename="model.pt")
    bad = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"net": net, "x": Unpicklable()}, save_final=True, final_filename="model.pt")
    engine = pytest.importorskip("ignite.engine").Engine(lambda e, b: None)
    engine.state.iteration, engine.state.epoch = 1, 1
    good.completed(engine)
    first = (tmp_path / "model.pt").read_bytes()
    with pytest.raises(Exception):
        bad.completed(engine)
    assert (tmp_path / "model.pt").read_bytes() == first  # the previous checkpoint survived intact
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    torch.load(tmp_path / "model.pt", weights_only=True)
    # and a plain MONAI saver is what this class fixes: it writes in place, so the same failure ruins the old file
    plain_dir = tmp_path.parent / f"{tmp_path.name}_plain"
    CheckpointSaver(save_dir=str(plain_dir), save_dict={"net": net}, save_final=True,
                    final_filename="model.pt").completed(engine)
    intact = (plain_dir / "model.pt").read_bytes()
    with pytest.raises(Exception):
        CheckpointSaver(save_dir=str(plain_dir), save_dict={"net": net, "x": Unpicklable()}, save_final=True,
                        final_filename="model.pt").completed(engine)
    assert not (plain_dir / "model.pt").exists() or (plain_dir / "model.pt").read_bytes() != intact


def test_latest_checkpoint_picks_highest_iteration(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for name in ["checkpoint_iteration=8.pt", "checkpoint_iteration=12.pt", "model.pt", "checkpoint_key_metric=0.9.pt", "checkpoint_epoch=40.pt"]:
        (tmp_path / name).write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "checkpoint_iteration=12.pt"
    (tmp_path / "checkpoint_final_iteration=12.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "checkpoint_final_iteration=12.pt"
    (tmp_path / "run2_checkpoint_iteration=99.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path, prefix="run2_").name == "run2_checkpoint_iteration=99.pt"
    for p in tmp_path.glob("*iteration*"):
        p.unlink()
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=40.pt"


def test_resume_handler_needs_objects_and_starts_fresh_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="load_dict"):
        ResumeFromCheckpoint(tmp_path, {})
    net = SmallFewShotNet()
    resume = ResumeFromCheckpoint(tmp_path, {"network": net})
    batch = {k: torch.stack([e[k] for e in _episodes(1)]) for k in _episodes(1)[0]}
    trainer = EpisodeTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch], network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), train_handlers=[resume]
    )
    trainer.run()
    assert resume.loaded_from is None and trainer.state.iteration == 1


def test_resuming_a_finished_run_trains_nothing_and_says_so(tmp_path):
    batch = {k: torch.stack([e[k] for e in _episodes(1)]) for k in _episodes(1)[0]}

    def run() -> tuple[EpisodeTrainer, list[int]]:
        net = SmallFewShotNet()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        saver = AtomicCheckpointSaver(tmp_path, {"network": net, "optimizer": optimizer}, engine_key="trainer",
                                      save_final=True, final_filename=None)
        trainer = EpisodeTrainer(device="cpu", max_epochs=2, train_data_loader=[batch, batch], network=net,
                                 optimizer=optimizer,
                                 train_handlers=[ResumeFromCheckpoint(tmp_path, {"network": net, "optimizer": optimizer}), saver])
        iterations: list[int] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: iterations.append(engine.state.iteration))
        trainer.run()
        return trainer, iterations

    first, iterations = run()
    assert iterations == [1, 2, 3, 4]
    with pytest.warns(UserWarning, match="finished run .*epoch 2 of 2, iteration 4.*nothing is left to train"):
        second, iterations = run()
    assert iterations == [] and second.state.iteration == 4


@requires_chaos
def test_protocol_dataset_subset_feeds_evaluator_with_copy(tmp_path):
    # guard for the evaluator's batch contract: PrepareBatchExtraInput must hand support + query mask to the inferer
    from monai_sdfsmis.networks.support_copy import SupportMaskCopy

    ds = ProtocolDataset(chaos_dir(), fold_ids=[0], organ_ids=[2])
    evaluator = ProtocolEvaluator(
        device="cpu", val_data_loader=DataLoader(Subset(ds, [0]), batch_size=1), network=SupportMaskCopy(), surface_metrics=False
    )
    evaluator.run()
    assert 0.3 < evaluator.state.metrics["val_mean_dice"] < 0.8


@requires_chaos
def test_k_shot_protocol_copy_is_the_majority_vote_of_the_support_masks(tmp_path):
    """3-shot copy baseline on fold 0, right kidney, recomputed by hand: chunk j of the query's kidney slices gets
    the majority of slice j of the three supports' masks (all CHAOS slices are 256 x 256: no resizing)."""
    import nibabel as nib

    from monai_sdfsmis.engines import evaluate_protocol

    chaos = chaos_dir()
    result = evaluate_protocol(None, chaos, fold_ids=[0], organ_ids=[2], shots=3, output_dir=tmp_path,
                               surface_metrics=False, overlays=0, progress=False)
    rows = result["methods"]["support-mask copy"]["rows"]
    kidney = {i: np.asarray(nib.load(str(chaos / f"label_{i}.nii.gz")).dataobj) == 2 for i in (1, 2, 3, 5, 8)}

    def organ_slices(mask):
        return np.flatnonzero(mask.any(axis=(0, 1)))

    supports_of = {"1": ("3", "5", "8"), "2": ("3", "5", "8"), "5": ("3", "8", "1"), "8": ("3", "5", "1")}
    for row in rows:
        query = kidney[int(row["query_id"])]
        assert row["support_id"] == "+".join(supports_of[row["query_id"]])
        present = organ_slices(query)
        edges = np.linspace(0, len(present), 4).astype(int)  # RPT's chunks
        predicted = np.zeros_like(query)
        for j in range(3):
            copies = []
            for sid in supports_of[row["query_id"]]:
                s_present = organ_slices(kidney[int(sid)])
                pick = s_present[int((1 / 6 + (1 - 1 / 3) / 2 * j) * len(s_present))]  # RPT get_support_index
                copies.append(kidney[int(sid)][:, :, pick])
            vote = np.mean(copies, axis=0) > 0.5
            for d in present[edges[j]:edges[j + 1]]:
                predicted[:, :, d] = vote
        dice = 2 * (predicted & query).sum() / (predicted.sum() + query.sum())
        assert row["dice"] == pytest.approx(dice, abs=1e-6)
    saved = json.loads((tmp_path / "protocol_results.json").read_text())
    assert saved["inference"]["shots"] == 3
