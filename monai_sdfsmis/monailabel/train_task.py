"""MONAI Label train task: fine-tune the served SD-FSMIS model on the datastore's own studies.

SD-FSMIS trains on supervoxel pseudo-labels (no ground truth), so unlabelled studies suffice. The
task lists the datastore's images, computes the supervoxels of those that have none yet into a cache
folder (once per study), and runs the bundle's own training recipe (``train.json`` + ``no_prior.json``,
stage 2 only: the served autoencoder stays) on episodes built from them, starting from the model folder's
current ``model.pt``. The final model is written atomically to ``<model_dir>/model.pt``,
where :class:`~monai_sdfsmis.monailabel.infer_task.SDFSMISInferTask` loads it (it reloads on change).
"""

from __future__ import annotations

__all__ = ["SDFSMISTrainTask", "datastore_records", "train_from_records"]

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.utils import OptionalImportError, optional_import

from monai_sdfsmis.bundle_files import NO_PRIOR_RECIPE
from monai_sdfsmis.data.layouts import VolumeRecord

TrainTask, has_monailabel = optional_import("monailabel.interfaces.tasks.train", name="TrainTask")

#: Bundle configs merged for training, in order (weight-free: the no-prior network of the model folder).
TRAIN_CONFIGS = NO_PRIOR_RECIPE

_logger = logging.getLogger(__name__)


def datastore_records(
    image_paths: Mapping[str, str | os.PathLike], cache_dir: str | os.PathLike, min_size: int = 5000, progress: bool = True
) -> list[VolumeRecord]:
    """Training records of studies, with supervoxels computed into ``cache_dir`` for those that lack them.

    Parameters
    ----------
    image_paths
        Study id to image file (NIfTI).
    cache_dir
        Supervoxel cache folder (``superpix-MIDDLE_<N>.nii.gz`` per study, see
        :func:`~monai_sdfsmis.data.supervoxels.write_supervoxels`); existing files are reused.
    min_size
        Felzenszwalb minimum supervoxel size in voxels.

    Returns
    -------
    list[VolumeRecord]
        One record per study, in the order given, without labels.
    """
    from monai_sdfsmis.data.supervoxels import write_supervoxels

    if not image_paths:
        raise ValueError("the datastore has no studies to train on.")
    ids = [str(i) for i in image_paths]
    paths = [Path(image_paths[i]) for i in image_paths]
    for vid, path in zip(ids, paths):
        if not path.is_file():
            raise ValueError(f"study {vid!r}: image file {path} not found.")
    supervoxels = write_supervoxels(paths, cache_dir, min_size=min_size, progress=progress, overwrite=False)
    return [VolumeRecord(id=vid, image=img, supervoxel=sv) for vid, img, sv in zip(ids, paths, supervoxels)]


def _last_loss(output: Any) -> float | None:
    """The loss of the trainer's last iteration (its output is one dict, or a list of one dict per item)."""
    if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        output = output[0]
    return float(output["loss"]) if isinstance(output, Mapping) and "loss" in output else None


def _fine_tuning_settings(
    model_dir: Path, bundle_dir: Path, config: Mapping[str, Any], device: Any, iterations: int, batch_size: int
) -> dict[str, Any]:
    """The bundle keys that turn the training recipe into fine-tuning of the served model (``config``: its
    ``model_config.json``): the served autoencoder and network, no time budget, nothing held out."""
    values: dict[str, Any] = {
        "bundle_root": str(bundle_dir),
        "ckpt_dir": str(model_dir),
        "output_dir": str(model_dir / "train_logs"),
        "device": device,
        "amp": device.type == "cuda",
        "num_workers": 0,
        "num_threads": None,
        "resume": False,
        "setting": 1,
        "iterations": int(iterations),
        "batch_size": int(batch_size),
        # fine-tuning: the served autoencoder stays, no time budget, nothing held out to evaluate
        "train_autoencoder": False,
        "total_minutes": None,
        "fold": 0,
        "folds": [[]],
        "min_useful_iterations": None,
        "progress": False,
        "supervoxel_dir": "supervoxels_5000",
        "warmup": min(int(iterations) // 5, 100),
        "ckpt_interval": 10**9,
        # The network the infer task serves: the model folder's own no-prior network and widths.
        "network_def": "$monai_sdfsmis.engines.model_folder.build_network('no_prior', @ckpt_dir)",
        "train::records": "@records",
    }
    if config.get("spatial_size"):
        values["spatial_size"] = int(config["spatial_size"])
    if config.get("intensity"):
        values["intensity"] = str(config["intensity"])
    return values


def train_from_records(
    records: Sequence[VolumeRecord],
    model_dir: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    iterations: int = 20,
    batch_size: int = 4,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune the no-prior model of ``model_dir`` on episodes of ``records`` with the bundle's training configs.

    Parameters
    ----------
    records
        Training volumes with supervoxels (:func:`datastore_records`).
    model_dir
        Model folder with ``autoencoder/``, ``model_config.json`` and (optionally) ``model.pt`` to start from;
        ``model.pt`` is replaced atomically by the trained model.
    bundle_dir
        The ``sd_fsmis`` bundle folder (holds :data:`TRAIN_CONFIGS`).
    iterations, batch_size
        Optimiser steps and episodes per step.
    overrides
        Further bundle keys (e.g. ``{"lr_unet": 1e-4, "device": "cpu"}``).

    Returns
    -------
    dict
        ``iterations`` run, final ``loss``, ``seconds`` and the ``model`` path.
    """
    import torch
    from monai.bundle import ConfigParser

    from monai_sdfsmis.engines.model_folder import load_network_weights, read_model_config

    model_dir, bundle_dir = Path(model_dir), Path(bundle_dir)
    missing = [c for c in TRAIN_CONFIGS if not (bundle_dir / c).is_file()]
    if missing:
        raise ValueError(f"bundle folder {bundle_dir}: missing {missing} (conf 'bundle' must name bundles/sd_fsmis).")
    if not (model_dir / "autoencoder").is_dir():
        raise ValueError(f"model folder {model_dir}: no autoencoder/ (stage 1 of the no-prior model) to train with.")
    if int(iterations) < 1 or int(batch_size) < 1:
        raise ValueError(f"iterations and batch_size must be at least 1, got {iterations} and {batch_size}.")
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    values = _fine_tuning_settings(model_dir, bundle_dir, read_model_config(model_dir), device, iterations, batch_size)
    parser = ConfigParser()
    parser.read_config([str(bundle_dir / c) for c in TRAIN_CONFIGS])
    values.update(dict(overrides or {}))
    for key, value in values.items():
        parser[key] = value
    parser["records"] = list(records)
    # Validation needs ground-truth labels, which a datastore's studies need not have.
    parser["train::handlers"] = [
        h for h in parser["train::handlers"] if not str(h.get("_target_", "")).endswith("ValidationHandler")
    ]

    parser.get_parsed_content("initialize")
    network = parser.get_parsed_content("network")
    ckpt = model_dir / "model.pt"
    if ckpt.is_file():
        load_network_weights(network, ckpt, network_type="no_prior")
    trainer = parser.get_parsed_content("train::trainer")
    start = time.monotonic()
    parser.get_parsed_content("training")
    if not ckpt.is_file():
        raise RuntimeError(f"training finished but wrote no {ckpt}.")
    return {
        "iterations": int(trainer.state.iteration),
        "loss": _last_loss(trainer.state.output),
        "seconds": round(time.monotonic() - start, 2),
        "model": str(ckpt),
        "studies": [r.id for r in records],
    }


if has_monailabel:

    class SDFSMISTrainTask(TrainTask):  # type: ignore[misc, valid-type]
        """MONAI Label train task: supervoxels for new studies, then a few fine-tuning steps from the datastore.

        Parameters
        ----------
        model_dir
            The served model folder (see :func:`train_from_records`).
        bundle_dir
            The ``sd_fsmis`` bundle folder.
        cache_dir
            Supervoxel cache (default ``<model_dir>/supervoxels``).
        iterations, batch_size
            Defaults of the request keys ``max_iterations`` / ``batch_size``.
        """

        def __init__(
            self,
            model_dir: str | os.PathLike,
            bundle_dir: str | os.PathLike,
            cache_dir: str | os.PathLike | None = None,
            iterations: int = 20,
            batch_size: int = 4,
            description: str = "Fine-tune SD-FSMIS on the datastore's studies (supervoxel pseudo-labels, no labels needed)",
        ) -> None:
            super().__init__(description)
            self.model_dir = Path(model_dir)
            self.bundle_dir = Path(bundle_dir)
            self.cache_dir = Path(cache_dir) if cache_dir else self.model_dir / "supervoxels"
            self.iterations, self.batch_size = int(iterations), int(batch_size)

        def config(self) -> dict[str, Any]:
            return {"max_iterations": self.iterations, "batch_size": self.batch_size}

        def __call__(self, request: Mapping[str, Any], datastore: Any) -> dict[str, Any]:
            ids = list(datastore.list_images())
            records = datastore_records({i: datastore.get_image_uri(i) for i in ids}, self.cache_dir)
            overrides = {k: request[k] for k in ("lr_unet", "lr_new", "seed") if k in request}
            stats = train_from_records(
                records,
                self.model_dir,
                self.bundle_dir,
                iterations=int(request.get("max_iterations", self.iterations)),
                batch_size=int(request.get("batch_size", self.batch_size)),
                overrides=overrides,
            )
            _logger.info("SD-FSMIS training done: %s", stats)
            return stats

else:

    class SDFSMISTrainTask:  # type: ignore[no-redef]
        """Placeholder raising a clear error: MONAI Label is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise OptionalImportError(
                "SDFSMISTrainTask needs MONAI Label: build its environment with "
                "`python -m monai_sdfsmis.monailabel.environment` (see README, MONAI Label)."
            )
