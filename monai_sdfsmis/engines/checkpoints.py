"""Atomic checkpoints and resuming from the latest one, as ignite handlers usable from bundle JSON.

MONAI 1.6.1's ``CheckpointSaver`` builds ignite ``DiskSaver`` objects with ``atomic=False``, so an
interrupted save can leave a truncated ``.pt``; ignite's own atomic mode names its temporary files
``tmpXXXXXXXX``, which nothing ever removes after a kill. :class:`AtomicCheckpointSaver` (MONAI's arguments, on
ignite's public ``Checkpoint``) writes each checkpoint with :class:`AtomicDiskSaver` to ``.<name>.<random>.tmp``
in the same folder and renames it, removes such leftovers (and
ignite's) when it is attached, and takes the checkpoints already in the folder into its ``n_saved``
rotation, so that a resumed run keeps ``n_saved`` files instead of leaving the earlier run's behind.
:class:`ResumeFromCheckpoint` loads the newest checkpoint of a folder, if any, when the engine starts,
adds the engine itself to what is restored, so a bundle can resume without a circular reference to its
trainer, and moves a resumable sampler (:class:`~monai_sdfsmis.data.episodes.EpisodeSampler`) past the
samples the interrupted epoch already consumed.
"""

from __future__ import annotations

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "RandomStates",
    "latest_checkpoint",
    "resumable_checkpoints",
    "remove_stale_temporaries",
    "ResumeFromCheckpoint",
]

import logging
import os
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import is_scalar, optional_import

from monai_sdfsmis.utils import atomic_path

Events, _ = optional_import("ignite.engine", name="Events")
Checkpoint, _ = optional_import("ignite.handlers", name="Checkpoint")
DiskSaver, _ = optional_import("ignite.handlers", name="DiskSaver")

_ITERATION = re.compile(r"(?:^|_)(?:final_)?iteration=(\d+)\.pt$")
_EPOCH = re.compile(r"(?:^|_)epoch=(\d+)\.pt$")
# Temporary checkpoint files: ours (``.<name>.<random>.tmp``) and ignite's ``NamedTemporaryFile`` names.
_STALE_TEMP = re.compile(r"^(?:\..+\.pt\.[A-Za-z0-9_]+\.tmp|tmp[a-z0-9_]{8})$")
_logger = logging.getLogger(__name__)


def remove_stale_temporaries(folder: str | PathLike) -> list[Path]:
    """Remove the temporary files an interrupted checkpoint write left in ``folder``; returns those removed.

    Only names no finished checkpoint can have are touched: ``.<checkpoint>.pt.<random>.tmp`` (written by
    :class:`AtomicCheckpointSaver`) and ``tmpXXXXXXXX`` (ignite's ``DiskSaver(atomic=True)``).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if _STALE_TEMP.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RandomStates:
    """The global random number generators (Python, NumPy, torch CPU and CUDA) as a checkpointable object.

    ``state_dict()`` holds only tensors, numbers and tuples, so that it loads with ``torch.load(weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            cuda = [t.cpu() for t in state["cuda"]]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)


class AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` writing ``.<name>.<random>.tmp`` beside the target, flushed to disk, then renamed.

    ignite's own atomic mode names its temporaries ``tmpXXXXXXXX`` and does not sync them before the rename; here a
    killed run leaves a name :func:`remove_stale_temporaries` recognises, and a crash cannot leave a renamed, empty
    checkpoint. With ``filename`` every save goes to that one name and replaces it in place: ``remove`` of it is a
    no-op, so the previous file stays until the new one is complete. A write that fails (a full disk) raises an
    ``OSError`` naming the checkpoint, with the cause's ``errno``.
    """

    def __init__(self, dirname: str | PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if _rank() != self.save_on_rank:
            return
        target = self.dirname / (self.filename or filename)
        try:
            with atomic_path(target, suffix=".tmp") as tmp, open(tmp, "wb") as handle:
                torch.save(checkpoint, handle, **self.kwargs)
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, RuntimeError) as error:
            # torch's writer reports a full disk as "enforce fail ... unexpected pos", the OSError only as its context.
            cause = error if isinstance(error, OSError) else error.__cause__ or error.__context__
            if not isinstance(cause, OSError):
                raise
            raise OSError(cause.errno, f"could not write {target}: {cause.strerror or cause}") from error

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver:
    """Checkpoints as MONAI's ``CheckpointSaver`` writes them (same arguments, names and events), written atomically.

    Built from ignite's public ``Checkpoint`` and :class:`AtomicDiskSaver`. When attached it removes the temporary
    files an earlier run killed while saving left behind (:func:`remove_stale_temporaries`), and at the first
    iteration it counts the interval and key-metric checkpoints already in ``save_dir`` (same file prefix) against
    ``n_saved``/``key_metric_n_saved``: after a resume, the oldest files are removed as new ones are written, as in
    an uninterrupted run.

    Parameters
    ----------
    save_dir, save_dict, name, file_prefix, save_final, final_filename, save_key_metric, key_metric_name,
    key_metric_n_saved, key_metric_filename, key_metric_save_state, key_metric_greater_or_equal,
    key_metric_negative_sign, epoch_level, save_interval, n_saved
        As MONAI's ``CheckpointSaver``: a final checkpoint when the run completes or raises, the best
        ``key_metric_n_saved`` by the engine's key metric after each epoch, and one every ``save_interval`` epochs
        (``epoch_level``) or iterations, keeping the newest ``n_saved``.
    engine_key
        When given, the engine the saver is attached to is saved too under this key (``"trainer"``), which
        :class:`ResumeFromCheckpoint` restores; a bundle then needs no reference from the trainer's handler
        list back to the trainer.
    rng_key
        When given, the global random number generators' states (:class:`RandomStates`) are saved too under this
        key (``"rng"``), which :class:`ResumeFromCheckpoint` restores.
    """

    def __init__(
        self,
        save_dir: str | PathLike,
        save_dict: Mapping[str, Any],
        name: str | None = None,
        file_prefix: str = "",
        save_final: bool = False,
        final_filename: str | None = None,
        save_key_metric: bool = False,
        key_metric_name: str | None = None,
        key_metric_n_saved: int = 1,
        key_metric_filename: str | None = None,
        key_metric_save_state: bool = False,
        key_metric_greater_or_equal: bool = False,
        key_metric_negative_sign: bool = False,
        epoch_level: bool = True,
        save_interval: int = 0,
        n_saved: int | None = None,
        engine_key: str | None = None,
        rng_key: str | None = None,
    ) -> None:
        if save_dir is None:
            raise ValueError("AtomicCheckpointSaver needs save_dir, the folder to write checkpoints to.")
        if not save_dict:
            raise ValueError("AtomicCheckpointSaver needs a non-empty save_dict (the objects to save).")
        if save_key_metric and key_metric_filename is not None and key_metric_n_saved > 1:
            raise ValueError("a fixed key_metric_filename holds one model: key_metric_n_saved must be 1.")
        # One dict shared with the Checkpoint objects, so that the engine can be added to it on attach.
        self.save_dict = dict(save_dict)
        if rng_key is not None:
            self.save_dict.setdefault(rng_key, RandomStates())
        self.save_dir = str(save_dir)
        self.name = name
        self.logger = logging.getLogger(name)
        self.engine_key = engine_key
        self.epoch_level = bool(epoch_level)
        self.save_interval = int(save_interval)
        self.key_metric_name = key_metric_name
        self.key_metric_sign = -1 if key_metric_negative_sign else 1
        self.final_filename = final_filename
        self.final: Any = None
        self.key_metric: Any = None
        self.interval: Any = None
        self.filename_pattern = Checkpoint.setup_filename_pattern(
            with_prefix=bool(file_prefix), with_score=True, with_score_name=True, with_global_step=False
        )
        common = dict(to_save=self.save_dict, filename_prefix=file_prefix, filename_pattern=self.filename_pattern)
        if save_final:
            self.final = Checkpoint(save_handler=AtomicDiskSaver(self.save_dir, final_filename),
                                    score_function=lambda engine: engine.state.iteration,
                                    score_name="final_iteration", **common)
        if save_key_metric:
            self.key_metric = Checkpoint(save_handler=AtomicDiskSaver(self.save_dir, key_metric_filename),
                                         score_function=self._key_metric_score, score_name="key_metric",
                                         n_saved=key_metric_n_saved, include_self=key_metric_save_state,
                                         greater_or_equal=key_metric_greater_or_equal, **common)
        if self.save_interval > 0:
            self.interval = Checkpoint(save_handler=AtomicDiskSaver(self.save_dir),
                                       score_function=self._interval_score,
                                       score_name="epoch" if self.epoch_level else "iteration", n_saved=n_saved,
                                       **common)
        self._adopted = True

    def _key_metric_score(self, engine: Any) -> float:
        metric_name = self.key_metric_name or getattr(engine.state, "key_metric_name", None)
        if metric_name is None:
            raise ValueError("save_key_metric=True needs key_metric_name or an engine with a key metric.")
        metric = engine.state.metrics[metric_name]
        if not is_scalar(metric):
            warnings.warn(f"key metric {metric_name}={metric} is not a scalar: no model saved for it.", stacklevel=2)
            return -1
        return self.key_metric_sign * metric

    def _interval_score(self, engine: Any) -> int:
        return engine.state.epoch if self.epoch_level else engine.state.iteration

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the key-metric ranking saved with ``key_metric_save_state=True`` (as MONAI's saver)."""
        if self.key_metric is None:
            warnings.warn("no key metric checkpoint saver to resume the key metric tracking list.", stacklevel=2)
            return
        self.key_metric.load_state_dict(state_dict)

    def attach(self, engine: Any) -> None:
        if self.name is None:
            self.logger = engine.logger
        if self.engine_key is not None:
            self.save_dict.setdefault(self.engine_key, engine)
        if _rank() == 0:
            for path in remove_stale_temporaries(self.save_dir):
                _logger.warning(f"Removed '{path}', left by a checkpoint write that was interrupted.")
            # At the first iteration, when a ResumeFromCheckpoint (attached in any order) has restored the counters.
            self._adopted = False
            engine.add_event_handler(Events.ITERATION_STARTED, self._adopt_once)
        if self.final is not None:
            engine.add_event_handler(Events.COMPLETED, self.completed)
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        if self.key_metric is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.key_metric)
        if self.interval is not None:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.save_interval), self.interval_completed)

    def _save_final(self, engine: Any) -> str:
        previous = self.final.last_checkpoint
        self.final.reset()  # a later run of the same engine writes its own final checkpoint
        self.final(engine)
        if self.final_filename is not None:
            return str(Path(self.save_dir) / self.final_filename)
        written = self.final.last_checkpoint
        if previous is not None and Path(previous).name != Path(written).name:
            self.final.save_handler.remove(Path(previous).name)
        return str(written)

    def completed(self, engine: Any) -> None:
        self.logger.info(f"Train completed, saved final checkpoint: {self._save_final(engine)}")

    def exception_raised(self, engine: Any, e: Exception) -> None:
        self.logger.info(f"Exception raised, saved the last checkpoint: {self._save_final(engine)}")
        raise e

    def interval_completed(self, engine: Any) -> None:
        self.interval(engine)
        self.logger.info(f"Saved checkpoint at {'epoch' if self.epoch_level else 'iteration'}: "
                         f"{self._interval_score(engine)}")

    def _adopt_once(self, engine: Any) -> None:
        if self._adopted:
            return
        self._adopted = True
        done = self._interval_score(engine) - 1  # the counter of this iteration is counted
        if done <= 0:
            return  # a fresh run: another run's files in the folder are left alone and do not block new saves
        if self.interval is not None:
            self._adopt_existing(self.interval, max_priority=done)
        if self.key_metric is not None:
            self._adopt_existing(self.key_metric)

    def _adopt_existing(self, checkpoint: Any, max_priority: float | None = None) -> None:
        """Put the files ``checkpoint`` would have written that already exist in ``save_dir`` into its rotation.

        ignite keeps the list of saved files in memory only, so a new process never removes the files of the run
        it resumes. Only files up to ``max_priority`` (the resumed iteration or epoch) are taken. Files beyond
        ``n_saved`` (oldest first) are removed now, since the rotation removes only one file per save.
        """
        if checkpoint.save_handler.filename is not None:
            return  # a fixed file name is replaced in place
        folder = Path(self.save_dir)
        name = "checkpoint" if len(checkpoint.to_save) != 1 else next(iter(checkpoint.to_save))
        marker = "\x00"
        head, _, tail = self.filename_pattern.format(
            filename_prefix=checkpoint.filename_prefix, ext=checkpoint.ext, name=name,
            score_name=checkpoint.score_name, score=marker, global_step=None,
        ).partition(marker)
        regex = re.compile(re.escape(head) + r"(-?\d+(?:\.\d+)?)" + re.escape(tail) + "$")
        ((key, saved),) = checkpoint.state_dict().items()  # ignite's public form: [(priority, filename), ...]
        known = {filename for _, filename in saved}
        found = []
        for path in folder.iterdir() if folder.is_dir() else ():
            match = regex.match(path.name)
            if match and path.is_file() and path.name not in known:
                value = float(match.group(1))
                if max_priority is None or value <= max_priority:
                    found.append((int(value) if value.is_integer() else value, path.name))
        saved = sorted([*saved, *found], key=lambda item: item[0])
        n_saved = checkpoint.n_saved
        while n_saved is not None and len(saved) > n_saved:
            _, filename = saved.pop(0)
            checkpoint.save_handler.remove(filename)
            _logger.info(f"Removed checkpoint '{folder / filename}' of an earlier run (n_saved={n_saved}).")
        checkpoint.load_state_dict({key: saved})


def latest_checkpoint(ckpt_dir: str | PathLike, prefix: str = "") -> Path | None:
    """The newest resumable checkpoint written by ``CheckpointSaver`` in ``ckpt_dir``, or ``None``.

    Considers ``<prefix>checkpoint_iteration=N.pt`` / ``..._final_iteration=N.pt`` (largest ``N`` wins;
    at equal ``N`` the final one) and, only when there is none, ``..._epoch=N.pt``. Key-metric files
    (``model.pt``, ``..._key_metric=...``) are ignored: they hold no trainer state.
    """
    found = resumable_checkpoints(ckpt_dir, prefix)
    return found[0] if found else None


def resumable_checkpoints(ckpt_dir: str | PathLike, prefix: str = "") -> list[Path]:
    """Every resumable checkpoint in ``ckpt_dir``, newest first (the order of :func:`latest_checkpoint`)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    by_iteration: list[tuple[int, int, Path]] = []
    by_epoch: list[tuple[int, Path]] = []
    for path in folder.glob(f"{prefix}*.pt"):
        if not path.is_file():
            continue
        match = _ITERATION.search(path.name)
        if match:
            by_iteration.append((int(match.group(1)), int("final_" in path.name), path))
            continue
        match = _EPOCH.search(path.name)
        if match:
            by_epoch.append((int(match.group(1)), path))
    if by_iteration:
        return [path for *_, path in sorted(by_iteration, reverse=True)]
    return [path for _, path in sorted(by_epoch, reverse=True)]


class ResumeFromCheckpoint:
    """Ignite handler: when the engine starts, restore ``load_dict`` (and the engine) from the newest checkpoint.

    Does nothing when ``ckpt_dir`` holds no checkpoint yet (first run).

    Parameters
    ----------
    ckpt_dir
        Folder of the ``CheckpointSaver`` interval/final checkpoints.
    load_dict
        Objects to restore, as saved, e.g. ``{"network": net, "optimizer": opt}``.
    engine_key
        Key under which the engine's own state (iteration, epoch) was saved, added to ``load_dict`` on
        attach; ``None`` to leave the engine's counters alone.
    map_location, strict
        As MONAI's ``CheckpointLoader`` (the file is read with ``weights_only=True``).
    prefix
        ``file_prefix`` of the ``CheckpointSaver``.
    rng_key
        Key of the :class:`RandomStates` saved by ``AtomicCheckpointSaver(rng_key=...)``; when the checkpoint has
        it, the global random number generators are restored as the first resumed iteration starts, so that
        random draws during training (noise, posterior samples) continue as in the uninterrupted run.
    """

    def __init__(
        self,
        ckpt_dir: str | PathLike,
        load_dict: dict,
        engine_key: str | None = "trainer",
        map_location: Any = None,
        strict: bool = True,
        prefix: str = "",
        rng_key: str | None = "rng",
    ) -> None:
        if not load_dict:
            raise ValueError("ResumeFromCheckpoint needs a non-empty load_dict (objects to restore).")
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = dict(load_dict)
        self.engine_key = engine_key
        self.map_location = map_location
        self.strict = strict
        self.prefix = prefix
        self.rng_key = rng_key
        self.loaded_from: Path | None = None

    def attach(self, engine: Any) -> None:
        if self.engine_key is not None:
            self.load_dict.setdefault(self.engine_key, engine)
        engine.add_event_handler(Events.STARTED, self)

    def _load(self, path: Path) -> dict:
        """Read ``path`` and restore ``load_dict`` from it; raises if the file is unreadable or does not fit."""
        checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        if len(self.load_dict) == 1 and next(iter(self.load_dict)) not in checkpoint:
            checkpoint = {next(iter(self.load_dict)): checkpoint}  # a bare state_dict, as CheckpointLoader allows
        missing = [key for key in self.load_dict if key not in checkpoint]
        if missing:
            raise ValueError(f"it holds no {missing} (it has {sorted(checkpoint)})")
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=self.strict)
        return checkpoint

    def __call__(self, engine: Any) -> None:
        candidates = resumable_checkpoints(self.ckpt_dir, self.prefix)
        if not candidates:
            engine.logger.info(f"No checkpoint in '{self.ckpt_dir}' to resume from; starting fresh.")
            return
        prior_max_epochs, planned_length = engine.state.max_epochs, engine.state.epoch_length
        failures: list[str] = []
        for path in candidates:
            try:
                checkpoint = self._load(path)
                break
            except (RuntimeError, EOFError, ValueError, KeyError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
                # A checkpoint truncated by a full disk or a kill, or one of another network: an older one may be whole.
                lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
                reason = " ".join(lines[:2])[:200]  # torch's first line is only "Error(s) in loading state_dict for X:"
                failures.append(f"{path.name} ({reason})")
                warnings.warn(f"cannot resume from {path}: {reason}; trying an older checkpoint", stacklevel=2)
        else:
            raise ValueError(f"no checkpoint in {self.ckpt_dir} can be resumed from: {'; '.join(failures)}")
        if planned_length is not None and engine.state.epoch_length != planned_length:
            self._adopt_planned_length(engine, path, planned_length, prior_max_epochs)
        if prior_max_epochs is not None:
            if engine.state.epoch > prior_max_epochs:
                raise ValueError(
                    f"checkpoint {path} is at epoch {engine.state.epoch}, beyond this run's max_epochs "
                    f"{prior_max_epochs}; raise max_epochs to train on from it"
                )
            engine.state.max_epochs = prior_max_epochs
        engine.logger.info(f"Restored {sorted(self.load_dict)} from {path}")
        self.loaded_from = path
        state = engine.state
        self._skip_consumed(engine)
        if self.rng_key is not None and self.rng_key in checkpoint:
            self._restore_random_states_later(engine, checkpoint[self.rng_key])
        if self.engine_key is not None and state.max_epochs is not None and state.epoch >= state.max_epochs:
            warnings.warn(
                f"'{path}' is the end of a finished run (epoch {state.epoch} of {state.max_epochs}, iteration "
                f"{state.iteration}); nothing is left to train. Plan more iterations (the bundle's 'iterations', or "
                "max_epochs) to train on, or use a new ckpt_dir to start again.",
                stacklevel=2,
            )

    @staticmethod
    def _adopt_planned_length(engine: Any, path: Path, planned_length: int, max_epochs: int | None) -> None:
        """This run's epoch length, not the checkpoint's: the bundle trains one epoch of ``iterations`` episodes, so a
        resume with another ``iterations`` stops at (or extends to) the new count instead of the interrupted run's."""
        iteration, saved_length = int(engine.state.iteration), engine.state.epoch_length
        planned_total = planned_length * (max_epochs or 1)
        if iteration > planned_total:
            raise ValueError(
                f"checkpoint {path} is at iteration {iteration}, beyond the {planned_total} iterations this run plans; "
                f"plan at least {iteration} iterations to resume from it, or start afresh in a new ckpt_dir"
            )
        engine.state.epoch_length = planned_length
        engine.state.epoch = iteration // planned_length
        engine.logger.info(
            f"{path.name} comes from a run of {saved_length} iterations per epoch; this run's {planned_length} apply: "
            f"training goes on from iteration {iteration} to {planned_total}."
        )

    @staticmethod
    def _restore_random_states_later(engine: Any, state: dict) -> None:
        """Restore the global RNGs when the first resumed iteration starts, after the loader's iterator is made.

        Making a DataLoader iterator draws its base seed from torch's global RNG; restoring before it would shift
        every later draw (e.g. the VAE posterior samples) by one with respect to the uninterrupted run.
        """

        pending = [state]

        def restore(engine: Any) -> None:
            # A flag, not remove_event_handler: removing a handler while its event fires skips the next one.
            if pending:
                RandomStates().load_state_dict(pending.pop())

        engine.add_event_handler(Events.ITERATION_STARTED, restore)

    @staticmethod
    def _skip_consumed(engine: Any) -> None:
        """Start the loader's resumable sampler after the batches the restored iteration already consumed."""
        state = engine.state
        if not state.epoch_length or state.iteration % state.epoch_length == 0:
            return
        done = state.iteration % state.epoch_length
        loader = state.dataloader
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if not hasattr(sampler, "set_start") and hasattr(getattr(batch_sampler, "sampler", None), "set_start"):
            sampler = batch_sampler.sampler
        if hasattr(sampler, "set_start"):
            batch_size = getattr(loader, "batch_size", None) or getattr(batch_sampler, "batch_size", 1)
            sampler.set_start(done * int(batch_size))
            engine.logger.info(f"Resuming at iteration {state.iteration}: the loader skips its first {done} batches.")
            return
        warnings.warn(
            f"Resuming in the middle of an epoch (iteration {state.iteration}, {done} of {state.epoch_length} done) "
            f"with a loader whose sampler ({type(sampler).__name__}) cannot skip: the epoch's first {done} batches are "
            "trained again and its last ones never. Use monai_sdfsmis.data.episodes.EpisodeSampler.",
            stacklevel=2,
        )
