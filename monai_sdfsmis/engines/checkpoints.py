"""Atomic checkpoints and resuming from the latest one, as ignite handlers usable from bundle JSON.

MONAI 1.6.1's ``CheckpointSaver`` builds ignite ``DiskSaver`` objects with ``atomic=False`` (the
comment there says atomic files lacked group/other read permission; ignite 0.5 now adds it), so an
interrupted save can leave a truncated ``.pt``. :class:`AtomicCheckpointSaver` switches them to
ignite's atomic mode (temporary file in the same folder, then ``os.replace``).
:class:`ResumeFromCheckpoint` loads the newest checkpoint of a folder, if any, when the engine starts,
and adds the engine itself to what is restored, so a bundle can resume without a circular reference
to its trainer.
"""

from __future__ import annotations

__all__ = ["AtomicCheckpointSaver", "latest_checkpoint", "ResumeFromCheckpoint"]

import re
import warnings
from os import PathLike
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import optional_import

Events, _ = optional_import("ignite.engine", name="Events")

_ITERATION = re.compile(r"(?:^|_)(?:final_)?iteration=(\d+)\.pt$")
_EPOCH = re.compile(r"(?:^|_)epoch=(\d+)\.pt$")


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically, and which can save its own engine.

    Every checkpoint is serialised to a temporary file in ``save_dir`` and moved over the target with
    ``os.replace``, so a crash during saving never leaves a truncated checkpoint (the previous one stays).

    Parameters
    ----------
    save_dir, save_dict, kwargs
        As MONAI's ``CheckpointSaver``.
    engine_key
        When given, the engine the saver is attached to is saved too under this key (``"trainer"``), which
        :class:`ResumeFromCheckpoint` restores; a bundle then needs no reference from the trainer's handler
        list back to the trainer.
    """

    def __init__(self, save_dir: str, save_dict: dict, engine_key: str | None = None, **kwargs: Any) -> None:
        # One dict object shared with ignite's Checkpoint objects, so the engine can be added on attach.
        save_dict = dict(save_dict)
        self.engine_key = engine_key
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is None:
                continue
            handler = checkpoint.save_handler
            if not hasattr(handler, "_atomic"):
                raise RuntimeError(
                    f"ignite's DiskSaver no longer has the '_atomic' switch ({type(handler).__name__}); "
                    "AtomicCheckpointSaver needs updating for this ignite version."
                )
            handler._atomic = True

    def attach(self, engine: Any) -> None:
        if self.engine_key is not None:
            self.save_dict.setdefault(self.engine_key, engine)
        super().attach(engine)


def latest_checkpoint(ckpt_dir: str | PathLike, prefix: str = "") -> Path | None:
    """The newest resumable checkpoint written by ``CheckpointSaver`` in ``ckpt_dir``, or ``None``.

    Considers ``<prefix>checkpoint_iteration=N.pt`` / ``..._final_iteration=N.pt`` (largest ``N`` wins;
    at equal ``N`` the final one) and, only when there is none, ``..._epoch=N.pt``. Key-metric files
    (``model.pt``, ``..._key_metric=...``) are ignored: they hold no trainer state.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
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
        return max(by_iteration)[2]
    if by_epoch:
        return max(by_epoch)[1]
    return None


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
        As MONAI's ``CheckpointLoader``.
    prefix
        ``file_prefix`` of the ``CheckpointSaver``.
    """

    def __init__(
        self,
        ckpt_dir: str | PathLike,
        load_dict: dict,
        engine_key: str | None = "trainer",
        map_location: Any = None,
        strict: bool = True,
        prefix: str = "",
    ) -> None:
        if not load_dict:
            raise ValueError("ResumeFromCheckpoint needs a non-empty load_dict (objects to restore).")
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = dict(load_dict)
        self.engine_key = engine_key
        self.map_location = map_location
        self.strict = strict
        self.prefix = prefix
        self.loaded_from: Path | None = None

    def attach(self, engine: Any) -> None:
        if self.engine_key is not None:
            self.load_dict.setdefault(self.engine_key, engine)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        path = latest_checkpoint(self.ckpt_dir, self.prefix)
        if path is None:
            engine.logger.info(f"No checkpoint in '{self.ckpt_dir}' to resume from; starting fresh.")
            return
        CheckpointLoader(
            load_path=str(path), load_dict=self.load_dict, map_location=self.map_location, strict=self.strict
        )(engine)
        self.loaded_from = path
        state = engine.state
        if self.engine_key is not None and state.max_epochs is not None and state.epoch >= state.max_epochs:
            warnings.warn(
                f"'{path}' is the end of a finished run (epoch {state.epoch} of {state.max_epochs}, iteration "
                f"{state.iteration}); nothing is left to train. Raise max_epochs to train on, or use a new ckpt_dir "
                "to start again.",
                stacklevel=2,
            )
