"""MONAI Label integration: an inference task that passes the support volume to the few-shot inferer."""

from __future__ import annotations

from .infer_task import SUPPORT_KEYS, SDFSMISInferTask, resolve_support_request, run_support_inference
