"""MONAI Label integration: infer and train tasks, a sample app (``app/``) and its server environment."""

from __future__ import annotations

from .infer_task import (
    SUPPORT_KEYS,
    RestoreQueryGridd,
    SDFSMISInferTask,
    keep_annotated_slices,
    resolve_support_request,
    run_support_inference,
)
from .train_task import SDFSMISTrainTask, datastore_records, train_from_records


def app_dir() -> str:
    """Folder of the sample MONAI Label app (``monailabel start_server --app <this>``)."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "app")
