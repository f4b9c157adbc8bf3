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
A DICOMweb server as ``--studies`` (e.g. Orthanc's ``http://host:8042/dicom-web``) works as with any MONAI Label
app: studies are fetched and converted by MONAI Label, and ``output=dicom_seg`` (with ``label_info`` in the
params) returns the mask as a DICOM-SEG of the query series, written by dcmqi's ``itkimage2segimage``, which the
environment installs (``dcmqi``) and this app hands to MONAI Label instead of letting it download one.
A bad request (no support, unknown id, shapes that do not match) is an HTTP 400 with a one-line message.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.utils.others.generic import strtobool

import monai_sdfsmis
from monai_sdfsmis.monailabel import SDFSMISInferTask, SDFSMISTrainTask, resolve_support_request

logger = logging.getLogger(__name__)

MODEL_NAME = "sd_fsmis"


#: The dcmqi tool MONAI Label runs for output=dicom_seg; without it on PATH or in <app>/bin it downloads one.
DICOM_SEG_TOOL = "itkimage2segimage"


def provide_dicom_seg_tool(app_dir: str | os.PathLike) -> Path | None:
    """Link dcmqi's ``itkimage2segimage`` (beside this interpreter or on PATH) into ``<app_dir>/bin``.

    MONAI Label puts ``<app_dir>/bin`` on PATH, and a DICOMweb datastore downloads dcmqi from the internet when the
    tool is in neither place; with the ``dcmqi`` package installed nothing needs to be downloaded. Returns the link
    (or the existing file), or ``None`` when dcmqi is not installed.
    """
    target = Path(app_dir) / "bin" / DICOM_SEG_TOOL
    if target.exists():
        return target
    beside = Path(sys.executable).parent / DICOM_SEG_TOOL
    found = str(beside) if beside.is_file() else shutil.which(DICOM_SEG_TOOL)
    if found is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(Path(found).resolve())
    return target


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
        if str(studies).startswith(("http://", "https://")) and provide_dicom_seg_tool(app_dir) is None:
            raise ValueError(
                f"a DICOMweb datastore ({studies}) needs dcmqi's {DICOM_SEG_TOOL} for output=dicom_seg, and MONAI Label "
                "would try to download it: pip install dcmqi into the server's environment"
            )
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
