"""The no-prior training recipe's moving parts: one clock, stage 1, scheduled evaluations and the training report.

``bundles/sd_fsmis/configs/no_prior.json`` (layered on ``train.json``) wires these into one run: stage 1 trains,
calibrates and saves the autoencoder (:class:`AutoencoderStage`), stage 2 trains the segmenter on MONAI's
trainer with a budget (:func:`~monai_sdfsmis.engines.budget.attach_budget`), both under one wall-clock budget
(:class:`TrainingClock`), the protocol is evaluated at set minutes with the clocks paused
(:class:`ScheduledEvaluation`) and at the end when the test volumes have labels, and :class:`TrainingReport`
writes the model folder's provenance, ``results.json`` and the one summary line. ``python -m monai_sdfsmis train``
runs the same config; ``benchmarks/no_prior_protocol.py`` runs that command fold by fold.
"""

from __future__ import annotations

__all__ = [
    "TrainingClock",
    "AutoencoderStage",
    "ProtocolCheck",
    "ScheduledEvaluation",
    "TrainingReport",
    "choose_preset",
    "loss_curve",
    "LossRecorder",
]

import datetime
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_sdfsmis.engines.tables import write_json

RESULTS_NAME = "results.json"


def choose_preset(presets: Mapping[str, Mapping[str, Any]], preset: str) -> Mapping[str, Any]:
    """The settings of ``preset`` (the recipe's ``preset`` key); an unknown name is one line listing the known ones."""
    if preset not in presets:
        raise ValueError(f"preset {preset!r} is not one of {sorted(presets)} (bundle key 'preset', --preset)")
    return presets[preset]


class TrainingClock:
    """One wall-clock budget shared by the stages of a run; evaluations inside :meth:`paused` do not count.

    Parameters
    ----------
    total_minutes
        Minutes for all stages together (``None``: no time budget; iteration counts stop the stages).
    """

    def __init__(self, total_minutes: float | None = None) -> None:
        if total_minutes is not None and not float(total_minutes) > 0:
            raise ValueError(f"total_minutes must be positive or null, got {total_minutes!r} (bundle key 'total_minutes', --minutes)")
        self.total_seconds = None if total_minutes is None else 60.0 * float(total_minutes)
        self._start: float | None = None
        self._paused = 0.0

    def start(self) -> None:
        """Start counting (the first call only)."""
        if self._start is None:
            self._start = time.perf_counter()

    def seconds(self) -> float:
        """Training seconds so far (pauses excluded)."""
        return 0.0 if self._start is None else time.perf_counter() - self._start - self._paused

    def minutes(self) -> float:
        return self.seconds() / 60.0

    def share_seconds(self, share: float) -> float | None:
        """``share`` of the whole budget in seconds (``None`` without a time budget)."""
        return None if self.total_seconds is None else float(share) * self.total_seconds

    def remaining_seconds(self) -> float | None:
        """What is left of the budget (``None`` without one); a spent budget is a ``ValueError``."""
        if self.total_seconds is None:
            return None
        left = self.total_seconds - self.seconds()
        if left < 1.0:
            raise ValueError(
                f"total_minutes {self.total_seconds / 60:g}: stage 1 used the whole budget ({self.seconds():.0f} s); "
                "give more minutes or fewer autoencoder iterations (ae_iterations, ae_time_share)"
            )
        return left

    @contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0


def loss_curve(losses: Sequence[float], points: int = 10) -> list[float]:
    """Mean loss over each of ``points`` equal parts of training (fewer when there are fewer iterations)."""
    if not len(losses):
        return []
    parts = np.array_split(np.asarray(losses, dtype=np.float64), min(points, len(losses)))
    return [round(float(part.mean()), 6) for part in parts if len(part)]


class LossRecorder:
    """Ignite handler: keeps every iteration's loss (``engine.state.output["loss"]``, or the first item's)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        output = engine.state.output
        if isinstance(output, (list, tuple)):
            output = output[0]
        self.losses.append(float(output["loss"]))


class AutoencoderStage:
    """Stage 1: train the autoencoder, freeze it, measure its latent scale and save it into the model folder.

    Parameters
    ----------
    network
        The autoencoder (``build_autoencoder``).
    dataloader, calibration_dataloader
        Training slices and masks; the slices the latent scale is measured on.
    output_dir
        ``<model folder>/autoencoder``.
    device, lr, warmup, kl_weight, amp, amp_on_cpu
        Training settings (:func:`~monai_sdfsmis.engines.autoencoder.build_autoencoder_trainer`).
    iterations, seconds
        Budget: iterations set the cosine schedule, seconds are a hard stop; either may be ``None``.
    clock
        The run's :class:`TrainingClock` (started here if it has not been).
    handlers
        More handlers (``StatsHandler``, TensorBoard).
    progress
        Progress lines.
    metadata
        Stored with the autoencoder (e.g. the fold).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataloader: Any,
        calibration_dataloader: Any,
        output_dir: str | PathLike,
        device: torch.device | str,
        lr: float,
        iterations: int | None,
        seconds: float | None,
        clock: TrainingClock,
        warmup: int = 20,
        kl_weight: float = 1e-6,
        amp: bool = True,
        handlers: Sequence[Any] = (),
        progress: bool = True,
        metadata: Mapping[str, Any] | None = None,
        amp_on_cpu: bool = False,
    ) -> None:
        if iterations is None and seconds is None:
            raise ValueError("stage 1 needs a budget: set ae_iterations or total_minutes (bundle keys)")
        self.network, self.dataloader, self.calibration_dataloader = network, dataloader, calibration_dataloader
        self.output_dir = Path(output_dir)
        self.device, self.lr, self.iterations, self.seconds = device, lr, iterations, seconds
        self.clock, self.warmup, self.kl_weight, self.amp = clock, warmup, kl_weight, amp
        self.handlers, self.progress, self.metadata = list(handlers), progress, dict(metadata or {})
        self.amp_on_cpu = bool(amp_on_cpu)

    def run(self) -> dict[str, Any]:
        """Train, calibrate and save; returns the stage's record (iterations done and planned, seconds, scale)."""
        from monai_sdfsmis.engines.autoencoder import build_autoencoder_trainer, freeze_and_calibrate, save_autoencoder

        self.clock.start()
        t0 = self.clock.seconds()
        warmup = self.warmup if self.iterations is None else min(self.warmup, int(self.iterations) // 5)
        trainer, budget = build_autoencoder_trainer(
            self.network, self.dataloader, device=self.device, lr=self.lr, max_iterations=self.iterations,
            max_seconds=self.seconds, schedule="cosine", warmup_iterations=warmup, kl_weight=self.kl_weight,
            amp=self.amp, train_handlers=self.handlers, progress=self.progress, amp_on_cpu=self.amp_on_cpu,
        )
        losses = LossRecorder()
        losses.attach(trainer)
        trainer.run()
        freeze_and_calibrate(self.network, self.calibration_dataloader)
        record = {
            "iterations": budget.iterations,
            "planned_iterations": self.iterations,
            "stopped_by": budget.stopped_by,
            "seconds": self.clock.seconds() - t0,
            "loop_seconds": budget.elapsed,
            "batch": getattr(self.dataloader, "batch_size", None),
            "scaling_factor": float(self.network.config.scaling_factor),
            "parameters": sum(p.numel() for p in self.network.parameters()),
            "loss_curve": loss_curve(losses.losses),
        }
        save_autoencoder(self.network, self.output_dir, metadata={**self.metadata, "iterations": budget.iterations})
        print(f"stage 1 (autoencoder): {budget.iterations} iterations in {record['seconds']:.0f} s "
              f"(stopped by {budget.stopped_by or 'end of data'}), latent scale {record['scaling_factor']:.4f}, "
              f"saved to {self.output_dir}", flush=True)
        return record


class ProtocolCheck:
    """The few-shot protocol on the run's test volumes, with the support-mask copy beside it, when they have labels.

    Parameters
    ----------
    store
        The test volumes' :class:`~monai_sdfsmis.data.VolumeStore` at the network's resolution (labels needed):
        the autoencoder's round trip is measured on its slices.
    protocol_store
        The same volumes on their own grid (``spatial_size=None``), where the protocol measures the masks, as
        ``python -m monai_sdfsmis protocol`` and the paper do; ``None`` uses ``store`` (masks and labels resized).
    fold, folds, organ_ids, organ_names, support_position, inferer
        The protocol's cases (:func:`~monai_sdfsmis.engines.evaluate_protocol`).
    output_dir
        ``<output_dir>/evaluation``: each evaluation writes a sub-folder.
    method
        Row name of the trained network.
    surface_metrics, overlays, device, progress
        As :func:`~monai_sdfsmis.engines.evaluate_protocol` (``overlays`` for the final evaluation only).
    """

    def __init__(
        self,
        store: Any,
        fold: int,
        folds: Sequence[Sequence[int]] | None,
        organ_ids: Sequence[int],
        organ_names: Mapping[int, str],
        support_position: int,
        inferer: Any,
        output_dir: str | PathLike,
        method: str = "SD-FSMIS no-prior",
        surface_metrics: bool = True,
        overlays: int = 1,
        device: torch.device | str | None = None,
        progress: bool = True,
        protocol_store: Any = None,
    ) -> None:
        self.store, self.fold, self.folds = store, int(fold), folds
        self.protocol_store = store if protocol_store is None else protocol_store
        self.organ_ids, self.organ_names, self.support_position = list(organ_ids), organ_names, support_position
        self.inferer, self.output_dir, self.method = inferer, Path(output_dir), method
        self.surface_metrics, self.overlays, self.device, self.progress = surface_metrics, overlays, device, progress

    def test_volumes(self) -> list[str]:
        from monai_sdfsmis.data.protocol import fold_split

        return [r.id for r in fold_split(self.store.records, self.fold, self.folds)[1]]

    def possible(self) -> tuple[bool, str]:
        """Whether the protocol can run, and why not: it needs two labelled test volumes (a support and a query)."""
        ids = self.test_volumes()
        if len(ids) < 2:
            return False, f"{len(ids)} test volume(s) held out; the protocol needs a support and a query"
        unlabelled = [v for v in ids if not self.store.has_label(v)]
        if unlabelled:
            return False, f"test volumes {unlabelled} have no label file"
        return True, ""

    def autoencoder_check(self, vae: torch.nn.Module, n_slices: int = 32) -> dict[str, float]:
        """The frozen autoencoder on the test volumes: image PSNR, supervoxel-mask and organ-mask Dice of its round trip.

        The organ-mask Dice bounds what stage 2 can reach (the segmenter cannot draw what its decoder cannot).
        """
        from monai_sdfsmis.data.slices import holdout_slices, organ_mask_slices
        from monai_sdfsmis.networks.autoencoder import reconstruction_metrics

        ids = self.test_volumes()
        held_out = holdout_slices(self.store, ids, num_slices=n_slices, seed=self.fold)
        metrics = reconstruction_metrics(vae, held_out["images"], held_out["masks"], batch_size=32)
        organs = organ_mask_slices(self.store, ids, self.organ_ids, n_slices, seed=self.fold)
        metrics["organ_mask_dice"] = reconstruction_metrics(vae, masks=organs, batch_size=32)["mask_dice"]
        return {k: float(v) for k, v in metrics.items()}

    def __call__(self, network: torch.nn.Module, name: str, baseline: bool = True, final: bool = True) -> dict[str, Any]:
        from monai_sdfsmis.engines.evaluator import evaluate_protocol

        was_training = network.training
        network.eval()
        try:
            return evaluate_protocol(
                network, self.protocol_store, fold_ids=[self.fold], organ_ids=self.organ_ids, inferer=self.inferer,
                output_dir=self.output_dir / name, baseline=baseline, overlays=self.overlays if final else 0,
                method=self.method, support_position=self.support_position, folds=self.folds,
                organ_names=self.organ_names, surface_metrics=self.surface_metrics and final, device=self.device,
                progress=self.progress,
            )
        finally:
            network.train(was_training)


class ScheduledEvaluation:
    """Ignite handler: evaluate the protocol when training (all stages, pauses excluded) reaches set minutes.

    The run's clock and the stage's budget are paused while it evaluates, so evaluations cost no training time.

    Parameters
    ----------
    minutes
        Training minutes to evaluate at (those already passed when stage 2 starts are evaluated at its first
        iteration).
    clock, budget
        The run's :class:`TrainingClock` and stage 2's :class:`~monai_sdfsmis.engines.budget.TrainingBudget`.
    check
        The :class:`ProtocolCheck` (nothing is scheduled when it cannot run).
    network
        The network being trained.
    """

    def __init__(self, minutes: Sequence[float], clock: TrainingClock, budget: Any, check: ProtocolCheck,
                 network: torch.nn.Module) -> None:
        self.pending = sorted(float(m) for m in (minutes or []) if float(m) > 0)
        self.clock, self.budget, self.check, self.network = clock, budget, check, network
        self.curve: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.pending and self.check.possible()[0]:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        minutes = self.clock.minutes()
        while self.pending and minutes >= self.pending[0]:
            target = self.pending.pop(0)
            with self.clock.paused(), self.budget.paused():
                t0 = time.perf_counter()
                result = self.check(self.network, f"at_{target:g}min", baseline=False, final=False)
                point = _curve_point(result, self.check.method, self.check.fold, minutes, self.budget.iterations)
                point["evaluation_seconds"] = time.perf_counter() - t0
                self.curve.append(point)
            print(f"evaluation at {minutes:.1f} training minutes ({self.budget.iterations} segmenter iterations): "
                  f"mean Dice {100 * point['dice']['mean']:.2f}", flush=True)


def _curve_point(result: Mapping[str, Any], method: str, fold: int, minutes: float, iterations: int) -> dict[str, Any]:
    summary = result["methods"][method]["summary"]
    return {"minutes": round(minutes, 2), "segmenter_iterations": iterations,
            "dice": summary["dice"]["per_fold"].get(str(fold), summary["dice"])}


def cpu_model_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, e.g. "AMD EPYC 9B14"), else the architecture: timings
    of runs on different machines must be told apart."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: torch.device | str) -> dict[str, Any]:
    import diffusers
    import monai

    from monai_sdfsmis import __version__

    device = torch.device(device)
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "monai_sdfsmis": __version__,
    }


class TrainingReport:
    """The end of a recipe run: provenance into ``model_config.json``, the protocol, ``results.json``, one summary line.

    Parameters
    ----------
    model_dir
        The model folder (``ckpt_dir``).
    output_dir
        Where ``results.json`` and ``evaluation/`` go.
    dataset_dir, records, train_records, fold, folds
        What the model was trained on (recorded as provenance).
    clock
        The run's :class:`TrainingClock`.
    device
        Training device (recorded with the machine's facts).
    settings
        The recipe's settings worth recording (preset, widths, batch sizes, learning rate...).
    min_useful_iterations
        Stage-2 iterations below which the recipe's own measurements found only empty masks; fewer are recorded and
        warned about.
    """

    def __init__(
        self,
        model_dir: str | PathLike,
        output_dir: str | PathLike,
        dataset_dir: str | PathLike | None,
        records: Sequence[Any],
        train_records: Sequence[Any],
        fold: int,
        folds: Sequence[Sequence[int]] | None,
        clock: TrainingClock,
        device: torch.device | str,
        settings: Mapping[str, Any] | None = None,
        min_useful_iterations: int | None = None,
    ) -> None:
        self.model_dir, self.output_dir = Path(model_dir), Path(output_dir)
        self.dataset_dir = None if dataset_dir in (None, "") else str(Path(dataset_dir).expanduser().resolve())
        self.records, self.train_records, self.fold, self.folds = list(records), list(train_records), int(fold), folds
        self.clock, self.device, self.settings = clock, device, dict(settings or {})
        self.min_useful_iterations = min_useful_iterations
        self.autoencoder: dict[str, Any] | None = None

    def stage1(self, record: Mapping[str, Any] | None) -> None:
        self.autoencoder = None if record is None else dict(record)

    def finish(self, network: torch.nn.Module, budget: Any, losses: LossRecorder, batch_size: int,
               check: ProtocolCheck | None = None, scheduled: ScheduledEvaluation | None = None) -> dict[str, Any]:
        """Record, evaluate (when the test volumes have labels), write ``results.json``; returns its content."""
        from monai_sdfsmis.engines.model_folder import model_warnings, record_training

        training_seconds = self.clock.seconds()
        segmenter = {
            "iterations": budget.start_iteration + budget.iterations,  # a resumed run's count goes on from its checkpoint
            "planned_iterations": budget.max_iterations,
            "stopped_by": budget.stopped_by,
            "seconds": budget.elapsed,
            "batch": int(batch_size),
            "episodes": budget.iterations * int(batch_size),
            "episodes_per_second": budget.iterations * int(batch_size) / max(budget.elapsed, 1e-9),
            "min_useful_iterations": self.min_useful_iterations,
            "loss_curve": loss_curve(losses.losses),
            "trainable_parameters": sum(p.numel() for p in network.parameters() if p.requires_grad),
        }
        provenance = self._provenance(training_seconds, segmenter)
        record_training(self.model_dir, provenance)
        results: dict[str, Any] = {"fold": self.fold, "training": provenance, "environment": _environment(self.device),
                                   "learning_curve": list(scheduled.curve) if scheduled is not None else []}
        if check is not None:
            ok, why = check.possible()
            if ok:
                t0 = time.perf_counter()
                evaluation = check(network, "final", baseline=True, final=True)
                results["rows"] = {name: r["rows"] for name, r in evaluation["methods"].items()}
                results["test_ids"] = check.test_volumes()
                point = _curve_point(evaluation, check.method, self.fold, training_seconds / 60.0, budget.iterations)
                point["evaluation_seconds"] = time.perf_counter() - t0
                results["learning_curve"].append(point)
                vae = getattr(network, "vae", None)
                if vae is not None and self.autoencoder is not None:
                    results["autoencoder_check"] = check.autoencoder_check(vae)
                    print("autoencoder on the test volumes: image PSNR {image_psnr:.2f} dB, supervoxel-mask Dice "
                          "{mask_dice:.4f}, organ-mask Dice {organ_mask_dice:.4f}".format(**results["autoencoder_check"]),
                          flush=True)
                results["table"] = evaluation["table"]
                print(evaluation["table"], flush=True)
            else:
                print(f"evaluation skipped: {why}", flush=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.output_dir / RESULTS_NAME, results)  # strict JSON: NaN -> null
        for line in model_warnings({"training": provenance}):
            print(line, flush=True)
        ae = self.autoencoder
        ae_text = "" if ae is None else f"stage 1 {ae['iterations']}" + (
            f"/{ae['planned_iterations']}" if ae.get("planned_iterations") else "") + " iterations, "
        planned = f"/{segmenter['planned_iterations']}" if segmenter["planned_iterations"] else ""
        print(f"training done: {ae_text}stage 2 {segmenter['iterations']}{planned} iterations "
              f"(stopped by {segmenter['stopped_by'] or 'end of data'}), {segmenter['episodes_per_second']:.2f} "
              f"episodes/s, {training_seconds / 60:.1f} training minutes; model folder {self.model_dir}", flush=True)
        return results

    def _provenance(self, training_seconds: float, segmenter: Mapping[str, Any]) -> dict[str, Any]:
        from monai_sdfsmis import __version__

        phantoms = self.dataset_dir is not None and (Path(self.dataset_dir) / "phantom.json").is_file()
        if not phantoms and self.records:
            phantoms = (Path(self.records[0].image).parent / "phantom.json").is_file()
        return {
            "dataset": {
                "path": self.dataset_dir or (str(Path(self.records[0].image).parent) if self.records else None),
                "volumes": len(self.records),
                "training_volumes": [r.id for r in self.train_records],
                "phantoms": bool(phantoms),
            },
            "fold": self.fold,
            "folds": self.folds,
            "autoencoder": self.autoencoder,
            "segmenter": dict(segmenter),
            "training_minutes": round(training_seconds / 60.0, 2),
            "budget_minutes": None if self.clock.total_seconds is None else self.clock.total_seconds / 60.0,
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "settings": self.settings,
            "monai_sdfsmis_version": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
