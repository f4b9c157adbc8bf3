"""MONAI Label integration: infer and train tasks, a sample app (``app/``) and its server environment."""

from __future__ import annotations

from .infer_task import (
    SUPPORT_KEYS,
    RestoreQueryGridd,
    SDFSMISInferTask,
    keep_annotated_slices,
    organ_ids_of_request,
    resolve_support_request,
    run_support_inference,
)
from .train_task import SDFSMISTrainTask, datastore_records, train_from_records


def app_dir(destination: str | None = None) -> str:
    """Folder of the sample MONAI Label app (``monailabel start_server --app <this>``).

    A MONAI Label server writes ``logs/``, ``model/``, ``bin/`` and ``lib/`` into its app folder, so pass a
    writable ``destination``: the app is copied there (``main.py`` replaced, the server's files kept) and that
    folder is returned. Without one, the packaged folder itself is returned (read-only in most installs).
    """
    import os
    import shutil

    packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app")
    if destination is None:
        return packaged
    os.makedirs(destination, exist_ok=True)
    shutil.copy2(os.path.join(packaged, "main.py"), os.path.join(destination, "main.py"))
    return os.path.abspath(destination)
