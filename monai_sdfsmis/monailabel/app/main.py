"""MONAI Label sample app serving the SD-FSMIS bundle (weight-free ``no_prior`` network by default).

Start it with the environment of :mod:`monai_sdfsmis.monailabel.environment`::

    monailabel start_server --app <this folder> --studies <studies folder> \
        --conf models <model folder> [--conf bundle <bundles/sd_fsmis>] [--conf network_type <the folder's>] \
        [--conf organ_id 1]

``<model folder>`` holds ``model.pt``, ``model_config.json`` and ``autoencoder/`` (a no-prior training
run's ``ckpt_dir``). Infer task ``sd_fsmis``: the support is a labelled study (``support_image`` id; a list of
them for k-shot), an uploaded image + label, or a label drawn on a few slices of the query itself; ``organ_id``
per request (an id, a label name or a list). A supervised model folder (``train --supervised``) takes no
support: ``organ_id`` names the trained organs to segment.
Train task ``sd_fsmis``: fine-tunes the model on the datastore's studies (no labels needed).
A bad request (no support, unknown id, shapes that do not match) is an HTTP 400 with a one-line message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.utils.others.generic import strtobool

import monai_sdfsmis
from monai_sdfsmis.monailabel import SDFSMISInferTask, SDFSMISTrainTask, resolve_support_request

logger = logging.getLogger(__name__)

MODEL_NAME = "sd_fsmis"


def _default_bundle() -> str:
    return str(Path(monai_sdfsmis.__file__).resolve().parents[1] / "bundles" / "sd_fsmis")


class SDFSMISApp(MONAILabelApp):
    """One infer task and one train task over a model folder (``--conf models``)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        models = conf.get("models") or os.environ.get("SDFSMIS_MODEL_DIR")
        if not models:
            raise ValueError("the SD-FSMIS app needs its model folder: start the server with --conf models <folder>")
        self.model_dir = Path(models).expanduser().resolve()
        if not (self.model_dir / "model.pt").is_file():
            raise ValueError(f"--conf models {self.model_dir}: no model.pt in it (a no-prior training run's ckpt_dir)")
        self.bundle_dir = Path(conf.get("bundle") or _default_bundle()).expanduser().resolve()
        network_type = conf.get("network_type", "")  # default: the model folder's model_config.json
        self.network_type = None if network_type in ("", "none", "None") else network_type
        self.organ_id = int(conf.get("organ_id", 1))
        self.amp = bool(strtobool(conf.get("amp", "true")))
        # Built before MONAI Label's own initialisation, which asks for the infer and train tasks.
        self.infer_task = SDFSMISInferTask(
            self.model_dir, network_type=self.network_type, organ_id=self.organ_id, amp=self.amp
        )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SD-FSMIS",
            description="Few-shot segmentation from one annotated support (SD-FSMIS, weight-free no-prior network)",
            version=monai_sdfsmis.__version__,
        )

    def init_infers(self) -> dict[str, Any]:
        return {MODEL_NAME: self.infer_task}

    def init_trainers(self) -> dict[str, Any]:
        if not self.infer_task.uses_support:
            logger.info("a supervised model folder: no /train task (train it with python -m monai_sdfsmis train "
                        "--supervised on labelled scans)")
            return {}
        return {MODEL_NAME: SDFSMISTrainTask(self.model_dir, self.bundle_dir)}

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        datastore = datastore or self.datastore()
        query = request.get("image")
        if isinstance(query, str) and not os.path.exists(query) and not datastore.get_image_uri(query):
            raise HTTPException(status_code=400, detail=f"image {query!r}: no such study in the datastore")
        try:
            if not self.infer_task.uses_support:
                named = [k for k in ("support_image", "support_label", "label") if request.get(k)]
                if named:
                    raise ValueError(
                        f"this model is supervised (train --supervised): it segments its trained organs without a "
                        f"support; drop {', '.join(named)}"
                    )
                return super().infer(request, datastore)
            return super().infer(resolve_support_request(request, datastore), datastore)
        except (ValueError, FileNotFoundError) as err:
            # The project's input checks raise one-line ValueErrors that name the file and the problem.
            logger.error("SD-FSMIS infer request rejected: %s", err)
            raise HTTPException(status_code=400, detail=str(err)) from err
