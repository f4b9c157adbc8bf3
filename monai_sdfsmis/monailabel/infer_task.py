"""MONAI Label inference task for the SD-FSMIS bundle: one annotated support volume prompts the query.

MONAI Label's ``BundleInferTask`` calls ``inferer(inputs, network)`` with the query alone, so the
support has to be handed over explicitly. :class:`SDFSMISInferTask` overrides ``run_inferer`` to pass
``support_image`` / ``support_label`` (loaded by the bundle's ``preprocessing``) to the
:class:`~monai_sdfsmis.inferers.SlidingSupportInferer`. :func:`resolve_support_request` turns the ways
a client can name the support (datastore ids in ``params``, or an uploaded label) into file paths
before the pre-transforms run.

Use in a MONAI Label app (``main.py``)::

    from monai_sdfsmis.monailabel import SDFSMISInferTask, resolve_support_request

    class MyApp(MONAILabelApp):
        def init_infers(self):
            return {"sd_fsmis": SDFSMISInferTask(path="model/sd_fsmis", conf=self.conf)}

        def infer(self, request, datastore=None):
            request = resolve_support_request(request, datastore or self.datastore())
            return super().infer(request, datastore)
"""

from __future__ import annotations

__all__ = ["SDFSMISInferTask", "resolve_support_request", "run_support_inference", "SUPPORT_KEYS"]

from collections.abc import Callable
from typing import Any

import torch
from monai.utils import OptionalImportError, optional_import

BundleInferTask, has_monailabel = optional_import("monailabel.tasks.infer.bundle", name="BundleInferTask")

SUPPORT_KEYS = ("support_image", "support_label")


def resolve_support_request(request: dict[str, Any], datastore: Any | None = None) -> dict[str, Any]:
    """Fill ``support_image`` / ``support_label`` of a MONAI Label request with file paths.

    Parameters
    ----------
    request
        The request dict. The support may be named as datastore ids (``{"support_image": "case1"}``; the
        label then defaults to that case's final label), as paths, or as an uploaded file whose path MONAI
        Label stores under ``request["label"]``.
    datastore
        A MONAI Label datastore (``get_image_uri(id)``, ``get_label_uri(id, tag)``); needed only for ids.

    Returns
    -------
    dict
        A copy of ``request`` with ``support_image`` and ``support_label`` as paths.
    """
    out = dict(request)
    support = out.get("support_image")
    if not support:
        raise ValueError(
            "the request names no support: pass params {'support_image': <datastore id or path>} and a support "
            "label ('support_label' id/path, or an uploaded 'label' file)."
        )
    if "support_label" not in out and out.get("label"):
        out["support_label"] = out["label"]
    if datastore is not None and _is_datastore_id(datastore, support):
        out["support_image"] = datastore.get_image_uri(support)
        label_id = out.get("support_label", support)
        out["support_label"] = datastore.get_label_uri(label_id, out.get("support_label_tag", "final"))
    if not out.get("support_label"):
        raise ValueError(f"no support label for support image {support!r}: pass 'support_label' or upload 'label'.")
    return out


def _is_datastore_id(datastore: Any, value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return bool(datastore.get_image_uri(value))
    except Exception:  # a datastore raises its own error types for unknown ids
        return False


def run_support_inference(
    data: dict[str, Any],
    inferer: Callable[..., torch.Tensor],
    network: torch.nn.Module,
    input_key: str = "image",
    output_key: str = "pred",
    convert_to_batch: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Run the few-shot inferer on pre-processed data and store the mask under ``output_key``.

    Parameters
    ----------
    data
        Pre-processed dict with ``input_key`` (query ``[C, H, W, D]``), ``support_image`` ``[C, Hs, Ws, Ds]``
        and ``support_label`` ``[1, Hs, Ws, Ds]`` (batched ``[1, ...]`` when ``convert_to_batch`` is False).
    inferer
        A :class:`~monai_sdfsmis.inferers.SlidingSupportInferer` (``query_range="all"`` for unannotated queries).
    network
        The segmentation network (``SDFSMIS`` or any network with its interface).

    Returns
    -------
    dict
        ``data`` with ``output_key`` set to the ``[1, H, W, D]`` mask (``[1, 1, H, W, D]`` if not converting).
    """
    missing = [k for k in (input_key, *SUPPORT_KEYS) if k not in data]
    if missing:
        raise ValueError(
            f"SD-FSMIS inference needs {missing} in the pre-processed data; the bundle's preprocessing must load "
            "the query and the support (see resolve_support_request)."
        )
    device = torch.device(device)

    def batch(x: Any) -> torch.Tensor:
        x = x if torch.is_tensor(x) else torch.as_tensor(x)
        return (x[None] if convert_to_batch else x).to(device)

    with torch.no_grad():
        pred = inferer(
            batch(data[input_key]),
            network,
            support_image=batch(data["support_image"]),
            support_label=batch(data["support_label"]),
        )
    data[output_key] = pred[0] if convert_to_batch else pred
    return data


if has_monailabel:

    class SDFSMISInferTask(BundleInferTask):  # type: ignore[misc, valid-type]
        """``BundleInferTask`` that hands the support volume to the few-shot inferer."""

        def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
            network = self._get_network(device, data)
            return run_support_inference(
                data,
                self.inferer(data),
                network,
                input_key=self.input_key,
                output_key=self.output_label_key,
                convert_to_batch=convert_to_batch,
                device=device,
            )

else:

    class SDFSMISInferTask:  # type: ignore[no-redef]
        """Placeholder raising a clear error: MONAI Label is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise OptionalImportError(
                "SDFSMISInferTask needs MONAI Label: pip install 'monai-sdfsmis[label]' (see README, MONAI Label)."
            )
