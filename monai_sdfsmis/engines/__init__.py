"""engines of monai_sdfsmis: episode training, the few-shot protocol evaluator, its metrics and tables."""

from __future__ import annotations

from monai_sdfsmis.utils import atomic_write

from .autoencoder import AutoencoderTrainingStep, build_autoencoder_trainer, freeze_and_calibrate
from .budget import TrainingBudget, attach_budget
from .checkpoints import (
    AtomicCheckpointSaver,
    RandomStates,
    ResumeFromCheckpoint,
    latest_checkpoint,
    remove_stale_temporaries,
)
from .evaluator import (
    PROTOCOL_EXTRA_KEYS,
    ProtocolDataset,
    ProtocolEvaluator,
    ProtocolResultsSaver,
    evaluate_protocol,
    protocol_items,
)
from .metrics import (
    SpacedHausdorffDistance,
    SpacedHausdorffDistanceMetric,
    SpacedSurfaceDistance,
    SpacedSurfaceDistanceMetric,
    empty_prediction_distance,
    spacing_of,
    volume_metrics,
)
from .overlays import OverlaySaver, overlay_png, overlay_slices, save_overlay
from .support_batch import PrepareSupportBatch, support_keys
from .tables import (
    ORGAN_COLUMNS,
    ROW_FIELDS,
    folds_title,
    format_table,
    rows_to_csv,
    summarize,
    write_json,
    write_rows_csv,
)
from .trainer import EPISODE_KEYS, EpisodeTrainer, EpisodeTrainingStep
