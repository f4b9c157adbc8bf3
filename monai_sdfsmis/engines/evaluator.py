"""The few-shot evaluation protocol (RPT's within-domain protocol) as a MONAI ``SupervisedEvaluator``.

One item per (fold, organ, query volume) case: the query volume (``image``), its organ mask
(``label``), the fold's support volume and its organ mask. The evaluator hands the support and the
query mask to :class:`~monai_sdfsmis.inferers.SlidingSupportInferer` through
:class:`~monai_sdfsmis.engines.support_batch.PrepareSupportBatch`; Dice, HD95 and ASSD are computed per query volume (HD95/ASSD in mm from
the items' affines). In protocol mode the prediction and the ground truth are both zero outside the
query's organ slices, so the Dice over the whole volume is the Dice over the stacked organ slices.
An empty prediction is scored (Dice 0, HD95/ASSD the volume's diagonal,
:func:`~monai_sdfsmis.engines.metrics.empty_prediction_distance`) and flagged in its row
(``empty_prediction``), so the summaries and tables count it.
"""

from __future__ import annotations

__all__ = [
    "PROTOCOL_EXTRA_KEYS",
    "protocol_items",
    "ProtocolDataset",
    "ProtocolEvaluator",
    "ProtocolResultsSaver",
    "evaluate_protocol",
    "MethodEvaluator",
    "protocol_evaluators",
    "run_protocol_evaluators",
    "inference_settings",
    "protocol_tables",
    "write_protocol_results",
]

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.utils import optional_import
from torch.utils.data import Dataset

from monai_sdfsmis.data.layouts import VolumeRecord, find_alpnet_volumes
from monai_sdfsmis.data.protocol import CHAOS_ORGANS, protocol_cases
from monai_sdfsmis.data.volumes import VolumeStore
from monai_sdfsmis.engines.metrics import SpacedHausdorffDistance, SpacedSurfaceDistance
from monai_sdfsmis.engines.overlays import OverlaySaver, path_slug
from monai_sdfsmis.engines.support_batch import PrepareSupportBatch, support_keys
from monai_sdfsmis.engines.tables import folds_title, format_table, summarize, write_json, write_rows_csv
from monai_sdfsmis.inferers.sliding_support import SlidingSupportInferer, network_device
from monai_sdfsmis.networks.support_copy import SupportMaskCopy
from monai_sdfsmis.progress import progress_bar
from monai_sdfsmis.transforms.postprocess import OrganMaskPostprocess
from monai_sdfsmis.utils import atomic_write

Events, _ = optional_import("ignite.engine", name="Events")

#: Inferer keyword -> batch key of the protocol's batches (``PrepareBatchExtraInput`` style; the supports go through ``PrepareSupportBatch``).
PROTOCOL_EXTRA_KEYS: dict[str, str] = {
    "support_image": "support_image",
    "support_label": "support_label",
    "query_label": "label",
    "organ_id": "organ_id",
}
#: Metric names the evaluator registers by default (key metric first).
DEFAULT_METRIC_NAMES: dict[str, str] = {"dice": "val_mean_dice", "hd95": "val_hd95", "assd": "val_assd"}
_CASE_FIELDS = ("fold", "organ_id", "organ", "support_id", "query_id")
#: Joins the support volume ids of a k-shot case in its ``support_id``.
SUPPORT_ID_SEPARATOR = "+"


def protocol_items(
    records: Sequence[VolumeRecord],
    fold_ids: Sequence[int] | None = None,
    organ_ids: Sequence[int] = (1, 2, 3, 4),
    support_position: int = 2,
    folds: Sequence[Sequence[int]] | None = None,
    organ_names: Mapping[int, str] = CHAOS_ORGANS,
    shots: int = 1,
) -> list[dict[str, Any]]:
    """The protocol's cases as light dicts (ids only; :class:`ProtocolDataset` loads the volumes).

    Returns
    -------
    list[dict]
        ``{"fold", "organ_id", "organ", "support_id", "query_id"}`` ordered by fold, organ, query
        (:func:`monai_sdfsmis.data.protocol.protocol_cases`); k-shot (``shots > 1``): ``support_id`` joins the
        support ids with ``+`` (``"3+5+2"``, :func:`~monai_sdfsmis.data.protocol.k_shot_supports`).
    """
    cases = protocol_cases(
        records,
        folds=folds,
        fold_ids=fold_ids,
        organ_ids=organ_ids,
        organ_names=organ_names,
        support_position=support_position,
        shots=shots,
    )
    return [
        {
            "fold": int(c.fold),
            "organ_id": int(c.organ_id),
            "organ": c.organ_name,
            "support_id": SUPPORT_ID_SEPARATOR.join(r.id for r in (c.support, *c.extra_supports)),
            "query_id": c.query.id,
        }
        for c in cases
    ]


class ProtocolDataset(Dataset):
    """Dataset of protocol cases, each loaded on access from a shared :class:`~monai_sdfsmis.data.volumes.VolumeStore`.

    Item keys: ``image`` (query volume) ``[1, H, W, D]`` float32 in ``[-1, 1]``; ``label`` (query organ mask)
    ``[1, H, W, D]`` float32 in ``{0, 1}``; ``support_image`` / ``support_label`` likewise for the fold's support
    volume (k-shot: also ``support_image_2`` ... for the others, :func:`~monai_sdfsmis.engines.support_batch.
    support_keys`); all are ``MetaTensor`` whose affine is ``diag(spacing)`` in mm; plus ``fold``, ``organ_id``,
    ``organ``, ``support_id``, ``query_id``.

    Parameters
    ----------
    source
        Dataset folder in the ALPNet layout, a list of :class:`~monai_sdfsmis.data.layouts.VolumeRecord`
        (fold order), or a ``VolumeStore`` (its records, and its already-loaded volumes, are used).
    fold_ids, organ_ids, support_position, folds, organ_names, shots
        As :func:`protocol_items` (CHAOS organ ids by default; SABS: ``organ_ids=(1, 2, 3, 6)``,
        ``organ_names=SABS_ORGANS``).
    intensity, spatial_size
        ``VolumeStore`` settings when ``source`` is not a store. ``spatial_size=None`` (default) keeps every volume on
        its own grid, so masks are measured against the labels as stored (the inferer resizes to the network's size
        and back).
    """

    def __init__(
        self,
        source: str | PathLike | Sequence[VolumeRecord] | VolumeStore,
        fold_ids: Sequence[int] | None = None,
        organ_ids: Sequence[int] = (1, 2, 3, 4),
        support_position: int = 2,
        folds: Sequence[Sequence[int]] | None = None,
        organ_names: Mapping[int, str] = CHAOS_ORGANS,
        intensity: str = "minmax",
        spatial_size: int | None = None,
        shots: int = 1,
    ) -> None:
        if isinstance(source, VolumeStore):
            self.store = source
        else:
            records = find_alpnet_volumes(source) if isinstance(source, (str, PathLike)) else list(source)
            self.store = VolumeStore(records, intensity=intensity, spatial_size=spatial_size)
        self.items = protocol_items(
            self.store.records,
            fold_ids=fold_ids,
            organ_ids=organ_ids,
            support_position=support_position,
            folds=folds,
            organ_names=organ_names,
            shots=shots,
        )

    def __len__(self) -> int:
        return len(self.items)

    def _volume(self, volume_id: str, organ_id: int) -> tuple[MetaTensor, MetaTensor]:
        spacing = self.store.spacing(volume_id)
        affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
        record = self.store.record(volume_id)
        meta = {"filename_or_obj": str(record.image)}
        image = np.asarray(self.store.image(volume_id), dtype=np.float32)
        labels = np.asarray(self.store.label(volume_id))
        mask = labels == organ_id
        if not mask.any():
            raise ValueError(f"Label file '{record.label}' has no voxel of organ label {organ_id}; the protocol needs it.")
        image_t = MetaTensor(torch.tensor(image)[None], affine=affine, meta=dict(meta))
        label_t = MetaTensor(torch.tensor(mask, dtype=torch.float32)[None], affine=affine.clone(), meta=dict(meta))
        return image_t, label_t

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.items[index]
        image, label = self._volume(case["query_id"], case["organ_id"])
        supports = case["support_id"].split(SUPPORT_ID_SEPARATOR)
        item = {"image": image, "label": label, **case}
        for (image_key, label_key), volume_id in zip(support_keys(len(supports)), supports):
            item[image_key], item[label_key] = self._volume(volume_id, case["organ_id"])
        return item


class ProtocolEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` preset for the protocol: support-aware batches, per-volume Dice/HD95/ASSD.

    Defaults: ``prepare_batch = PrepareSupportBatch(shots, {"query_label": "label"})``, ``inferer =
    SlidingSupportInferer()`` (protocol mode), key metric ``val_mean_dice`` (MONAI ``MeanDice``, one value
    per query volume) and, when ``surface_metrics``, ``val_hd95`` / ``val_assd`` in mm. Any argument of
    ``SupervisedEvaluator`` can be given; explicit ``key_val_metric``/``additional_metrics`` replace the defaults.

    Parameters
    ----------
    device
        Device the batches are moved to (the inferer computes on the network's device).
    val_data_loader
        Loader over a :class:`ProtocolDataset` (batch size 1).
    network
        A network with the ``SDFSMIS`` inference interface, or ``SupportMaskCopy``.
    surface_metrics
        Also compute HD95 and ASSD (about 0.2 s per case on CPU).
    shots
        Support volumes per case (the loader's :class:`ProtocolDataset` ``shots``).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        network: torch.nn.Module,
        inferer: SlidingSupportInferer | None = None,
        surface_metrics: bool = True,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        shots: int = 1,
        **kwargs: Any,
    ) -> None:
        transform = from_engine(["pred", "label"])
        if key_val_metric is None:
            key_val_metric = {
                DEFAULT_METRIC_NAMES["dice"]: MeanDice(include_background=True, output_transform=transform)
            }
        if additional_metrics is None and surface_metrics:
            additional_metrics = {
                DEFAULT_METRIC_NAMES["hd95"]: SpacedHausdorffDistance(percentile=95, output_transform=transform),
                DEFAULT_METRIC_NAMES["assd"]: SpacedSurfaceDistance(symmetric=True, output_transform=transform),
            }
        kwargs.setdefault("prepare_batch", PrepareSupportBatch(
            shots, {"query_label": PROTOCOL_EXTRA_KEYS["query_label"]}, {"organ_id": PROTOCOL_EXTRA_KEYS["organ_id"]}
        ))
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            network=network,
            inferer=SlidingSupportInferer() if inferer is None else inferer,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            **kwargs,
        )


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item()
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _scalar(value[0])
    return value


class ProtocolResultsSaver:
    """Ignite handler turning an evaluator run into per-case rows and the protocol summary.

    Records each case's ``fold``/``organ``/ids from ``engine.state.batch`` and ``empty_prediction`` (the
    prediction is empty while the ground truth is not) from ``engine.state.output``, and, when the epoch
    completes, reads the per-case values of the metrics from ``engine.state.metric_details`` (MONAI metric
    handlers with ``save_details=True``). Under ``torch.distributed`` (a ``DistributedSampler`` per process) the
    case records of all processes are gathered in rank order, the order in which MONAI gathers the metric
    details, so every process holds all rows; only rank 0 writes files. The result is stored in
    ``engine.state.protocol = {"rows": [...], "summary": {...}}`` and, when ``output_dir`` is given, written
    atomically to ``<output_dir>/<prefix>_<method>_cases.csv`` and ``<prefix>_<method>.json``.

    Parameters
    ----------
    output_dir
        Folder for the files; ``None`` writes nothing.
    method
        Method name written in each row and in the file names.
    metric_names
        Row field -> metric name in the evaluator (defaults: ``val_mean_dice``, ``val_hd95``, ``val_assd``);
        metrics the evaluator lacks are written as NaN.
    prefix
        File name prefix.
    """

    def __init__(
        self,
        output_dir: str | PathLike | None = None,
        method: str = "SD-FSMIS",
        metric_names: Mapping[str, str] | None = None,
        prefix: str = "protocol",
    ) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.method = method
        self.metric_names = dict(DEFAULT_METRIC_NAMES if metric_names is None else metric_names)
        self.prefix = prefix
        self._cases: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Any) -> None:
        self._cases = []

    def _record(self, engine: Any) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        empty = _empty_predictions(engine.state.output, len(items))
        for item, flag in zip(items, empty):
            case = {k: _scalar(item[k]) for k in _CASE_FIELDS if k in item}
            if flag is not None:
                case["empty_prediction"] = flag
            self._cases.append(case)

    def _complete(self, engine: Any) -> None:
        details = getattr(engine.state, "metric_details", {}) or {}
        cases, rank = _gather_cases(self._cases)
        rows = []
        for i, case in enumerate(cases):
            row: dict[str, Any] = {"method": self.method, **case}
            for field, name in self.metric_names.items():
                values = details.get(name)
                row[field] = float(values[i].reshape(-1)[0]) if values is not None and i < len(values) else float("nan")
            rows.append(row)
        self.rows = rows
        self.summary = summarize(rows) if rows else {}
        engine.state.protocol = {"rows": rows, "summary": self.summary}
        if self.output_dir is not None and rows and rank == 0:
            stem = f"{self.prefix}_{path_slug(self.method)}"
            write_rows_csv(self.output_dir / f"{stem}_cases.csv", rows)
            write_json(self.output_dir / f"{stem}.json", {"method": self.method, "rows": rows, "summary": self.summary})


def _empty_predictions(output: Any, n_items: int) -> list[bool | None]:
    """Per item of an iteration: is ``pred`` empty while ``label`` is not (``None`` if the output lacks them)?

    ``output`` is the evaluator's ``engine.state.output``: a list of per-item dicts (decollated) or one dict
    of batch-first ``[B, C, H, W, D]`` tensors.
    """
    if isinstance(output, Mapping):
        if "pred" not in output or "label" not in output:
            return [None] * n_items
        preds, labels = list(torch.as_tensor(output["pred"])), list(torch.as_tensor(output["label"]))
    elif isinstance(output, list) and all(isinstance(o, Mapping) and "pred" in o and "label" in o for o in output):
        preds, labels = [o["pred"] for o in output], [o["label"] for o in output]
    else:
        return [None] * n_items
    flags: list[bool | None] = [bool(torch.as_tensor(y).any()) and not bool(torch.as_tensor(p).any())
                                for p, y in zip(preds, labels)]
    return flags + [None] * (n_items - len(flags))


def _gather_cases(cases: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """All processes' case records in rank order (MONAI's order for gathered metric details), and this rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return cases, 0
    world = torch.distributed.get_world_size()
    if world == 1:
        return cases, 0
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, cases)
    return [case for part in parts for case in part], torch.distributed.get_rank()


class _CaseProgress:
    """Progress over the evaluator's cases (:func:`~monai_sdfsmis.progress.progress_bar`)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.bar = total, desc, None

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._close)

    def _start(self, engine: Any) -> None:
        self.bar = progress_bar(total=self.total, desc=self.desc, unit="case")

    def _step(self, engine: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _close(self, engine: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _no_model_selection(current: float, best: float) -> bool:
    """A protocol run evaluates one model once: no "best metric" to track (nor to log, for the baseline least of all)."""
    return False


def evaluate_protocol(
    network: torch.nn.Module | None,
    records: str | PathLike | Sequence[VolumeRecord] | VolumeStore,
    fold_ids: Sequence[int] | None = None,
    organ_ids: Sequence[int] = (1, 2, 3, 4),
    inferer: SlidingSupportInferer | None = None,
    output_dir: str | PathLike | None = "protocol_results",
    baseline: bool = True,
    overlays: int = 2,
    method: str = "SD-FSMIS",
    baseline_name: str = "support-mask copy",
    support_position: int = 2,
    folds: Sequence[Sequence[int]] | None = None,
    organ_names: Mapping[int, str] = CHAOS_ORGANS,
    surface_metrics: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    intensity: str = "minmax",
    extra_handlers: Sequence[Callable] | None = None,
    shots: int = 1,
) -> dict[str, Any]:
    """Run the protocol for a network (and the support-mask copy baseline) and write the results.

    The ``protocol`` command, the training recipe's evaluations, the quick start and the benchmarks call it; the
    bundle's ``configs/evaluate.json`` runs the same evaluators (:func:`protocol_evaluators`,
    :func:`run_protocol_evaluators`) under its own ``dataset`` and ``evaluator`` ids, which MONAI's ``eval`` requires.

    Parameters
    ----------
    network
        Network with the ``SDFSMIS`` interface, already on its device; ``None`` evaluates only the baseline.
    records
        Dataset folder, volume records (fold order), or a ``VolumeStore``.
    fold_ids, organ_ids, support_position, folds, organ_names
        Which cases (:func:`protocol_items`).
    inferer
        Default ``SlidingSupportInferer()`` (protocol mode, 3 chunks). Its ``postprocess``, ``flip_axes`` and
        ``support_fusion`` apply to ``network`` only: the baseline is always the raw support-mask copy (k-shot: the
        average of the supports' copies, a majority vote). With ``support_alignment`` or the ``"nearest"`` fusion a
        second copy row uses them as the network does.
    output_dir
        Where ``protocol_cases.csv`` (one row per method and case), ``protocol_results.json`` (rows + summaries),
        ``protocol_table.md`` and ``overlays/<method>/*.png`` are written (atomically); ``None`` writes nothing.
    baseline
        Also evaluate :class:`~monai_sdfsmis.networks.support_copy.SupportMaskCopy` (first table row).
    overlays
        PNG overlays per query volume and method (0 for none).
    method, baseline_name
        Row names in the table.
    surface_metrics
        Compute HD95 and ASSD (mm) besides Dice.
    device
        Device batches are moved to; default the network's device.
    progress
        Progress over the cases (a bar in a terminal, plain lines in a log).
    intensity
        ``VolumeStore`` intensity preset when ``records`` is not a store.
    extra_handlers
        More ignite handlers attached to each evaluator run (e.g. ``StatsHandler``).
    shots
        Support volumes per query (k-shot, :func:`~monai_sdfsmis.data.protocol.k_shot_supports`): each query chunk is
        segmented with every support and the soft masks averaged (the copy baseline: a majority vote).

    Returns
    -------
    dict
        ``{"methods": {name: {"rows": [...], "summary": {...}}}, "table": str, "files": {...}}``;
        Dice values are fractions, distances in mm.
    """
    if network is None and not baseline:
        raise ValueError("Nothing to evaluate: network is None and baseline is False.")
    loader = _protocol_loader(records, fold_ids, organ_ids, support_position, folds, organ_names, intensity, shots)
    inferer = SlidingSupportInferer() if inferer is None else inferer
    evaluators = protocol_evaluators(
        network, loader, inferer, baseline=baseline, method=method, baseline_name=baseline_name, n_overlays=overlays,
        overlays_dir=None if output_dir is None else Path(output_dir) / "overlays", surface_metrics=surface_metrics,
        device=device, shots=shots, handlers=extra_handlers, progress_cases=len(loader.dataset) if progress else None,
    )
    results = run_protocol_evaluators(evaluators, surface_metrics)
    return {**results, "files": _protocol_files(output_dir, results, evaluators, fold_ids, organ_ids, inferer, shots)}


def _protocol_loader(
    records: str | PathLike | Sequence[VolumeRecord] | VolumeStore,
    fold_ids: Sequence[int] | None,
    organ_ids: Sequence[int],
    support_position: int,
    folds: Sequence[Sequence[int]] | None,
    organ_names: Mapping[int, str],
    intensity: str,
    shots: int,
) -> DataLoader:
    """A loader over the :class:`ProtocolDataset` of the selected cases, one case at a time and in order; an empty
    selection is an error."""
    dataset = ProtocolDataset(
        records,
        fold_ids=fold_ids,
        organ_ids=organ_ids,
        support_position=support_position,
        folds=folds,
        organ_names=organ_names,
        intensity=intensity,
        shots=shots,
    )
    if len(dataset) == 0:
        raise ValueError("The protocol selection (fold_ids, organ_ids) has no case.")
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)


def _protocol_files(
    output_dir: str | PathLike | None,
    results: Mapping[str, Any],
    evaluators: Sequence[MethodEvaluator],
    fold_ids: Sequence[int] | None,
    organ_ids: Sequence[int],
    inferer: SlidingSupportInferer,
    shots: int,
) -> dict[str, Any]:
    """Write a run's results into ``output_dir`` (:func:`write_protocol_results`, with the selection and the inferer's
    settings as provenance); the written files by kind, the evaluators' overlays included (none when ``output_dir``
    is ``None``)."""
    if output_dir is None:
        return {}
    provenance = {"fold_ids": fold_ids, "organ_ids": list(organ_ids), "inference": inference_settings(inferer, shots)}
    overlay_files = [str(p) for e in evaluators if e.overlays is not None for p in e.overlays.written]
    return {**write_protocol_results(Path(output_dir), results, provenance), "overlays": overlay_files}


def _methods(
    network: torch.nn.Module | None, inferer: SlidingSupportInferer, baseline: bool, method: str, baseline_name: str
) -> list[tuple[str, torch.nn.Module, SlidingSupportInferer]]:
    """The ``(row name, network, inferer)`` of each method: the copy baseline first, then ``network``."""
    runs: list[tuple[str, torch.nn.Module, SlidingSupportInferer]] = []
    if baseline:
        anchor = network_device(network) if network is not None else torch.device("cpu")
        # The copy is the paper's baseline as published: raw, whatever clean-up the method's masks get.
        raw = copy.copy(inferer)
        raw.postprocess, raw.flip_axes, raw.support_fusion = OrganMaskPostprocess(None), (), "average"
        raw.support_alignment = "none"
        runs.append((baseline_name, SupportMaskCopy().to(anchor), raw))
        if inferer.support_alignment != "none" or inferer.support_fusion == "nearest":
            # The copy of the supports the network sees, chosen as it chooses them: what alignment and choice are worth.
            like_network = copy.copy(raw)
            like_network.support_alignment, like_network.support_fusion = inferer.support_alignment, inferer.support_fusion
            how = [inferer.support_alignment] if inferer.support_alignment != "none" else []
            how += ["nearest"] if inferer.support_fusion == "nearest" else []
            runs.append((f"{baseline_name} ({', '.join(how)})", SupportMaskCopy().to(anchor), like_network))
    if network is not None:
        runs.append((method, network, inferer))
    return runs


@dataclass
class MethodEvaluator:
    """One row of the protocol: its name, its evaluator and the handlers that keep its results."""

    name: str
    evaluator: ProtocolEvaluator
    saver: ProtocolResultsSaver
    overlays: OverlaySaver | None = None


def protocol_evaluators(
    network: torch.nn.Module | None,
    loader: Any,
    inferer: SlidingSupportInferer,
    *,
    baseline: bool = True,
    method: str = "SD-FSMIS",
    baseline_name: str = "support-mask copy",
    overlays_dir: str | PathLike | None = None,
    n_overlays: int = 0,
    surface_metrics: bool = True,
    device: str | torch.device | None = None,
    shots: int = 1,
    handlers: Sequence[Callable] | None = None,
    method_handlers: Sequence[Callable] | None = None,
    progress_cases: int | None = None,
) -> list[MethodEvaluator]:
    """The protocol's evaluators, the copy baseline's first (:func:`_methods`): what :func:`evaluate_protocol` runs
    and the bundle's ``configs/evaluate.json`` wires (its ``evaluator`` is the last one, the network's).

    Parameters
    ----------
    network, inferer, baseline, method, baseline_name, surface_metrics, device, shots
        As :func:`evaluate_protocol`.
    loader
        Loader over a :class:`ProtocolDataset` (batch size 1).
    overlays_dir, n_overlays
        PNG overlays per query volume under ``overlays_dir/<method>`` (none when ``None`` or 0).
    handlers
        More ignite handlers attached to every evaluator (e.g. ``StatsHandler``).
    method_handlers
        Handlers attached to the network's evaluator only (e.g. a weights loader that runs at its start).
    progress_cases
        Show progress over this many cases per evaluator (``None``: no progress).
    """
    built = []
    for name, net, run_inferer in _methods(network, inferer, baseline, method, baseline_name):
        saver = ProtocolResultsSaver(output_dir=None, method=name)
        run_handlers: list[Any] = [saver]
        overlay = None
        if overlays_dir is not None and n_overlays > 0:
            overlay = OverlaySaver(overlays_dir, method=name, n_slices=n_overlays)
            run_handlers.append(overlay)
        if progress_cases is not None:
            run_handlers.append(_CaseProgress(progress_cases, desc=f"protocol: {name}"))
        run_handlers.extend(handlers or [])
        if net is network:
            run_handlers = [*(method_handlers or []), *run_handlers]
        evaluator = ProtocolEvaluator(
            device=device if device is not None else network_device(net),
            val_data_loader=loader,
            network=net,
            inferer=run_inferer,
            surface_metrics=surface_metrics,
            val_handlers=run_handlers,
            metric_cmp_fn=_no_model_selection,
            shots=shots,
        )
        built.append(MethodEvaluator(name, evaluator, saver, overlay))
    return built


def run_protocol_evaluators(evaluators: Sequence[MethodEvaluator], surface_metrics: bool = True) -> dict[str, Any]:
    """Run each evaluator in turn -> ``{"methods": {name: {"rows", "summary"}}, "table": markdown}``."""
    methods: dict[str, Any] = {}
    for entry in evaluators:
        entry.evaluator.run()
        methods[entry.name] = {"rows": entry.saver.rows, "summary": entry.saver.summary}
    return {"methods": methods, "table": protocol_tables({n: r["summary"] for n, r in methods.items()}, surface_metrics)}


def inference_settings(inferer: SlidingSupportInferer, shots: int = 1) -> dict[str, Any]:
    """The inferer's settings a protocol run records in ``protocol_results.json`` (``"inference"``)."""
    return {
        "spatial_size": inferer.spatial_size, "n_chunks": inferer.n_chunks,
        "postprocess": list(inferer.postprocess.steps), "flip_axes": list(inferer.flip_axes),
        "shots": int(shots), "support_fusion": inferer.support_fusion, "support_alignment": inferer.support_alignment,
    }


def protocol_tables(summaries: Mapping[str, Any], surface_metrics: bool = True) -> str:
    """The markdown tables of a protocol run: Dice (%), and HD95 and ASSD (mm) with ``surface_metrics``."""
    table = format_table(summaries, metric="dice", title=folds_title("Dice (%)", summaries))
    if surface_metrics:
        table += "\n" + format_table(summaries, metric="hd95", title=folds_title("HD95 (mm)", summaries))
        table += "\n" + format_table(summaries, metric="assd", title=folds_title("ASSD (mm)", summaries))
    return table


def write_protocol_results(
    output_dir: str | PathLike, results: Mapping[str, Any], provenance: Mapping[str, Any]
) -> dict[str, str]:
    """Write ``protocol_cases.csv``, ``protocol_results.json`` (methods and ``provenance``) and ``protocol_table.md``
    atomically into ``output_dir``; their paths by kind (``csv``, ``json``, ``table``)."""
    out_dir = Path(output_dir)
    all_rows = [row for r in results["methods"].values() for row in r["rows"]]
    return {
        "csv": str(write_rows_csv(out_dir / "protocol_cases.csv", all_rows)),
        "json": str(write_json(out_dir / "protocol_results.json", {"methods": results["methods"], **provenance})),
        "table": str(atomic_write(out_dir / "protocol_table.md", results["table"])),
    }
