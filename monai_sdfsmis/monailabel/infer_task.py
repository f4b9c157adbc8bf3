"""MONAI Label inference task for SD-FSMIS: one annotated support prompts the segmentation of the query.

A MONAI Label infer request carries the query only; :func:`resolve_support_request` turns the ways a
client names the support into file paths before the task runs:

* ``params {"support_image": <datastore id>}``: a labelled study of the datastore (its ``final`` label,
  or ``support_label`` as another id or tag);
* ``support_image`` / ``support_label`` as file paths, or ``support_image`` plus an uploaded ``label``;
* **one-slice support on the query itself**: an uploaded ``label`` and no ``support_image``. The label is
  drawn on one or a few slices of the query; those slices are the support and the rest of the volume is
  segmented from them (the annotated slices come back as drawn);
* **several labelled studies** (k-shot): ``support_image`` as a list of ids or paths (``support_label`` then a
  list of the same length, or each study's own label); their soft masks are averaged.

``organ_id`` may be one id, a label name of the task's ``labels``, or a list of either: several organs come
back as one label map with their ids (a voxel claimed by several goes to the most probable).

:class:`SDFSMISInferTask` builds the network of a model folder (``model.pt``, ``model_config.json``
and, for the weight-free ``no_prior`` network, ``autoencoder/``) with the bundle's own factories
(:mod:`monai_sdfsmis.engines.inference`), so no Stable Diffusion weights are needed to serve it. The
returned mask is uint8 on the query file's own grid and orientation: the bundle works in RAS, and
:class:`RestoreQueryGridd` undoes that reorientation (MONAI Label's ``Restored`` puts back only the
affine, which mirrors LAS volumes).
"""

from __future__ import annotations

__all__ = [
    "SDFSMISInferTask",
    "RestoreQueryGridd",
    "resolve_support_request",
    "run_support_inference",
    "organ_ids_of_request",
    "keep_annotated_slices",
    "SUPPORT_KEYS",
]

import logging
import os
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapLabelValue, MapTransform, Orientation
from monai.utils import OptionalImportError, optional_import

from monai_sdfsmis.data.protocol import organ_id_list
from monai_sdfsmis.engines.support_batch import count_support_keys, support_keys
from monai_sdfsmis.transforms.io import label_map_dtype

BasicInferTask, has_monailabel = optional_import("monailabel.tasks.infer.basic_infer", name="BasicInferTask")
InferType, _ = optional_import("monailabel.interfaces.tasks.infer_v2", name="InferType")

SUPPORT_KEYS = ("support_image", "support_label")
#: Request flag set by :func:`resolve_support_request` when the support is a label drawn on the query itself.
SUPPORT_ON_QUERY = "support_on_query"

_logger = logging.getLogger(__name__)


def _datastore_uri(getter: Callable[..., str], *args: str) -> str:
    try:
        return getter(*args) or ""
    except Exception:  # datastores raise their own error types for unknown ids
        return ""


def resolve_support_request(request: Mapping[str, Any], datastore: Any | None = None) -> dict[str, Any]:
    """Fill the support keys of a MONAI Label infer request with file paths.

    Parameters
    ----------
    request
        The request dict: ``image`` (query path or id), optional ``support_image`` / ``support_label``
        (datastore ids or paths; k-shot: lists), ``support_label_tag`` (default ``"final"``) and ``label`` (the
        path MONAI Label stores an uploaded label file under).
    datastore
        A MONAI Label datastore (``get_image_uri(id)``, ``get_label_uri(id, tag)``); needed for ids.

    Returns
    -------
    dict
        A copy of ``request`` with ``support_image`` and ``support_label`` as paths (``k`` supports:
        also ``support_image_2`` / ``support_label_2`` ... as :func:`~monai_sdfsmis.engines.support_batch.support_keys`
        names them), and ``support_on_query`` True when the uploaded label is drawn on the query itself.

    Raises
    ------
    ValueError
        One line naming the missing or unknown support.
    """
    out = dict(request)
    support = out.get("support_image")
    uploaded = out.get("label") if isinstance(out.get("label"), str) and out.get("label") else None
    if not support:
        if uploaded is None:
            raise ValueError(
                "the request names no support: pass params {'support_image': <datastore id or path>} (a labelled "
                "study), or upload a 'label' drawn on one or a few slices of the query."
            )
        query = out.get("image")
        if datastore is not None and isinstance(query, str) and not os.path.exists(query):
            query = _datastore_uri(datastore.get_image_uri, query) or query
        out["support_image"], out["support_label"], out[SUPPORT_ON_QUERY] = query, uploaded, True
        return out

    supports = list(support) if isinstance(support, (list, tuple)) else [support]
    given = out.get("support_label")
    if isinstance(given, (list, tuple)):
        if len(given) != len(supports):
            raise ValueError(
                f"{len(supports)} support_image(s) but {len(given)} support_label(s): give one label per support, "
                "or none (each study's own label)."
            )
        labels = list(given)
    elif len(supports) > 1:
        if given or uploaded:
            raise ValueError(
                f"{len(supports)} support studies take a list of {len(supports)} support_label(s), or none (each "
                "study's own label), not a single label."
            )
        labels = [None] * len(supports)
    else:
        labels = [given or uploaded]
    tag = str(out.get("support_label_tag") or "final")
    for (image_key, label_key), image, label in zip(support_keys(len(supports)), supports, labels):
        out[image_key], out[label_key] = _resolve_support(image, label, tag, datastore, bool(label))
    out[SUPPORT_ON_QUERY] = False
    return out


def _resolve_support(support: Any, label: Any, tag: str, datastore: Any | None, label_given: bool) -> tuple[Any, Any]:
    """One support study (id or path) and its label (id, path, or ``None`` for the study's own) as paths."""
    image = support
    if isinstance(support, str) and not os.path.exists(support):
        image = _datastore_uri(datastore.get_image_uri, support) if datastore is not None else ""
        if not image:
            raise ValueError(f"support_image {support!r}: no such study in the datastore and no such file.")
        label = label or support  # a datastore study's own label by default
    if not label:
        raise ValueError(f"no support label for support image {support!r}: pass 'support_label' or upload 'label'.")
    if isinstance(label, str) and not os.path.exists(label):
        uri = _datastore_uri(datastore.get_label_uri, label, tag) if datastore is not None else ""
        if not uri and label == support and not label_given:
            raise ValueError(
                f"support study {support!r} has no {tag!r} label: label it first, or pass 'support_label' "
                "(id or file) or upload 'label'."
            )
        if not uri:
            raise ValueError(
                f"support_label {label!r}: the datastore has no {tag!r} label with this id and there is no such file."
            )
        label = uri
    return image, label


def organ_ids_of_request(value: Any, labels: Mapping[str, int]) -> list[int]:
    """The organ ids a request asks for: an id, a label name of ``labels``, or a list of either.

    Raises
    ------
    ValueError
        An id that is not a positive integer, an unknown name, an organ asked for twice, or an empty list.
    """
    return organ_id_list(value, key="organ_id", names=labels, unique=True)


def run_support_inference(
    data: dict[str, Any],
    inferer: Callable[..., torch.Tensor],
    network: torch.nn.Module,
    input_key: str = "image",
    output_key: str = "pred",
    convert_to_batch: bool = True,
    device: str | torch.device = "cpu",
    organ_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run the few-shot inferer on pre-processed data and store the mask under ``output_key``.

    Parameters
    ----------
    data
        Pre-processed dict with ``input_key`` (query ``[C, H, W, D]``), ``support_image`` ``[C, Hs, Ws, Ds]``
        and ``support_label`` ``[K, Hs, Ws, Ds]`` (``K`` organs), and for k-shot ``support_image_2`` /
        ``support_label_2`` ... (batched ``[1, ...]`` when ``convert_to_batch`` is False).
    inferer
        A :class:`~monai_sdfsmis.inferers.SlidingSupportInferer` (``query_range="all"`` for unannotated queries).
    network
        The segmentation network (``SDFSMIS`` or any network with its interface; a network with
        ``uses_support = False``, the supervised mode, reads no support and needs ``organ_ids``).
    organ_ids
        The label ids of the ``K`` organs; the inferer's label map ``1..K`` is written with these ids.

    Returns
    -------
    dict
        ``data`` with ``output_key`` set to the ``[1, H, W, D]`` mask or label map (``[1, 1, H, W, D]`` if not
        converting).
    """
    uses_support = getattr(network, "uses_support", True)
    if not uses_support and not organ_ids:
        raise ValueError("a supervised model segments the organs it was trained on: name them with organ_id.")
    missing = [k for k in (input_key, *(SUPPORT_KEYS if uses_support else ())) if k not in data]
    if missing:
        raise ValueError(
            f"SD-FSMIS inference needs {missing} in the pre-processed data; the bundle's preprocessing must load "
            "the query and the support (see resolve_support_request)."
        )
    device = torch.device(device)

    def batch(x: Any) -> torch.Tensor:
        x = x if torch.is_tensor(x) else torch.as_tensor(x)
        return (x[None] if convert_to_batch else x).to(device)

    pairs = support_keys(count_support_keys(data)) if uses_support else []
    images, labels = [batch(data[i]) for i, _ in pairs], [batch(data[m]) for _, m in pairs]
    with torch.no_grad():
        if uses_support:
            pred = inferer(
                batch(data[input_key]),
                network,
                support_image=images[0] if len(pairs) == 1 else images,
                support_label=labels[0] if len(pairs) == 1 else labels,
            )
        else:  # the supervised mode: each organ from its learned condition, no support
            pred = inferer(batch(data[input_key]), network, organ_id=list(organ_ids))
    if organ_ids is not None and len(organ_ids) > 1:  # as the bundle's postprocessing maps its label map
        pred = MapLabelValue(orig_labels=list(range(1, len(organ_ids) + 1)), target_labels=list(organ_ids))(pred)
    data[output_key] = pred[0] if convert_to_batch else pred
    return data


def keep_annotated_slices(pred: torch.Tensor, annotation: torch.Tensor) -> torch.Tensor:
    """``pred`` with the slices (last axis) where ``annotation`` has foreground replaced by the annotation.

    Parameters
    ----------
    pred, annotation
        ``[1, H, W, D]`` masks on the same grid (the query's).
    """
    if tuple(pred.shape) != tuple(annotation.shape):
        raise ValueError(
            f"the label drawn on the query has shape {tuple(annotation.shape)}, the query {tuple(pred.shape)}."
        )
    drawn = torch.as_tensor(annotation).to(pred.device).flatten(0, 2).any(dim=0)
    out = pred.clone()
    out[..., drawn] = torch.as_tensor(annotation).to(device=pred.device, dtype=pred.dtype)[..., drawn]
    return out


class RestoreQueryGridd(MapTransform):
    """Bring a mask or label map predicted in the loader's orientation back onto the query file's own voxel grid.

    The bundle loads every volume reoriented to RAS (``LoadVolumed``); the query's file may be stored in
    another orientation (CHAOS: LAS). This transform reorients ``key`` (``[1, H, W, D]`` on ``ref_key``'s
    RAS grid) back to the axis codes of the file's ``original_affine``, checks that the result lies exactly
    on that grid, and stores it as ``uint8 [H, W, D]`` (``uint16`` for organ ids above 255) with ``{key}_meta_dict["affine"]`` set to the file's
    affine (what MONAI Label's writer saves).

    Parameters
    ----------
    keys
        Mask keys.
    ref_key
        The loaded query (a ``MetaTensor`` with ``original_affine`` in its metadata).
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "image") -> None:
        super().__init__(keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        if not isinstance(ref, MetaTensor) or ref.meta.get("original_affine") is None:
            raise ValueError(f"RestoreQueryGridd: {self.ref_key!r} carries no original_affine; load it with LoadVolumed.")
        original = np.asarray(ref.meta["original_affine"], dtype=np.float64)
        for key in self.key_iterator(d):
            mask = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            mask = mask.detach().cpu()
            if tuple(mask.shape[-3:]) != tuple(ref.shape[-3:]):
                raise ValueError(f"{key} has shape {tuple(mask.shape)}, the query {tuple(ref.shape)}.")
            mask = MetaTensor(mask.reshape(1, *ref.shape[-3:]).float(), affine=ref.affine.clone())
            restored = Orientation(axcodes="".join(nib.aff2axcodes(original)), labels=None)(mask)
            affine = np.asarray(restored.affine, dtype=np.float64)
            if not np.allclose(affine, original, atol=1e-3 * max(1.0, float(np.abs(original).max()))):
                raise ValueError(f"{key}: could not restore the query's grid (affine {affine.tolist()} vs {original.tolist()}).")
            values = np.rint(np.clip(restored.array[0], 0, None))  # a binary mask, or a label map of organ ids
            d[key] = values.astype(label_map_dtype(values.max(initial=0)))
            d[f"{key}_meta_dict"] = {"affine": original, "spatial_shape": np.asarray(d[key].shape)}
        return d


if has_monailabel:

    class SDFSMISInferTask(BasicInferTask):  # type: ignore[misc, valid-type]
        """MONAI Label infer task serving an SD-FSMIS model folder; the support comes with each request.

        Parameters
        ----------
        model_dir
            Model folder: ``model.pt`` (reloaded whenever its file changes, e.g. after ``/train``),
            ``model_config.json`` and, for ``no_prior``, ``autoencoder/``.
        network_type
            ``"no_prior"`` (default: weight-free), ``"pretrained"``, ``"tiny"`` or ``None`` (the model folder's).
        labels
            Organ names to label ids shown to clients (default CHAOS: liver 1, kidneys 2 and 3, spleen 4).
        organ_id
            Organ selected from the support label when a request gives none (request param ``organ_id``: an id, a
            name of ``labels``, or a list of either for one label map of several organs).
        n_chunks, sw_batch_size, amp
            As :class:`~monai_sdfsmis.inferers.SlidingSupportInferer`.
        spatial_size, intensity
            Slice size and intensity preset; ``None``: the model folder's (``model_config.json``).
        network_kwargs
            Further keyword arguments of :func:`~monai_sdfsmis.engines.model_folder.build_network`
            (e.g. ``sd``/``image_encoder`` weights for ``pretrained``).
        """

        def __init__(
            self,
            model_dir: str | os.PathLike,
            network_type: str | None = "no_prior",
            labels: Mapping[str, int] | None = None,
            organ_id: int = 1,
            n_chunks: int = 3,
            sw_batch_size: int = 16,
            spatial_size: int | None = None,
            intensity: str | None = None,
            amp: bool = True,
            description: str = "SD-FSMIS few-shot segmentation from one annotated support (study id or slices)",
            network_kwargs: Mapping[str, Any] | None = None,
        ) -> None:
            from monai_sdfsmis.data.protocol import CHAOS_ORGANS

            self.model_dir = Path(model_dir)
            self.network_type = network_type
            self.n_chunks, self.sw_batch_size, self.amp = int(n_chunks), int(sw_batch_size), bool(amp)
            self.spatial_size, self.intensity = spatial_size, intensity
            self.network_kwargs = dict(network_kwargs or {})
            if labels is None:
                labels = {name: int(i) for i, name in CHAOS_ORGANS.items()}
            super().__init__(
                path=str(self.model_dir / "model.pt"),
                network=None,
                type=InferType.SEGMENTATION,
                labels=dict(labels),
                dimension=3,
                description=description,
                config={"organ_id": int(organ_id), "support_image": "", "support_label": ""},
            )

        def _model_config(self) -> dict[str, Any]:
            from monai_sdfsmis.engines.model_folder import read_model_config

            return read_model_config(self.model_dir)

        @property
        def uses_support(self) -> bool:
            """``False`` for a supervised model folder (``train --supervised``): requests then name no support."""
            return (self.network_type or self._model_config().get("network_type")) != "supervised"

        def _get_network(self, device: Any, data: Any) -> torch.nn.Module:
            from monai_sdfsmis.engines.model_folder import build_network, load_network_weights

            path = Path(self.get_path(validate=False) or self.model_dir / "model.pt")
            if not path.is_file():
                raise FileNotFoundError(f"model checkpoint {path} not found: train the model first (POST /train).")
            key = str(device)
            mtime = path.stat().st_mtime_ns
            cached = self._networks.get(key)
            if cached is not None and cached[1] == mtime:
                return cached[0]
            from monai_sdfsmis.engines.inference import print_model_warnings

            network = build_network(self.network_type, self.model_dir, **self.network_kwargs)
            load_network_weights(network, path, network_type=self.network_type)
            self._model_warnings = print_model_warnings(self._model_config())
            network = network.to(torch.device(device)).eval()
            self._networks[key] = (network, mtime)
            return network

        def pre_transforms(self, data: Mapping[str, Any] | None = None) -> Sequence[Callable]:
            from monai_sdfsmis.engines.inference import inference_preprocessing
            from monai_sdfsmis.engines.model_folder import resolve_intensity

            data = data or {}
            organs = self._organ_ids(data)
            intensity = resolve_intensity(self.intensity, self._model_config())
            n_supports = max(1, count_support_keys(data)) if self.uses_support else 0
            organ = organs[0] if len(organs) == 1 else organs
            return list(inference_preprocessing(organ, intensity, n_supports=n_supports).transforms)

        def _organ_ids(self, data: Mapping[str, Any]) -> list[int]:
            return organ_ids_of_request(data.get("organ_id", self._config["organ_id"]), self.labels)

        def inferer(self, data: Mapping[str, Any] | None = None) -> Any:
            from monai_sdfsmis.engines.model_folder import (
                resolve_postprocess,
                resolve_spatial_size,
                resolve_support_alignment,
            )
            from monai_sdfsmis.inferers import SlidingSupportInferer

            return SlidingSupportInferer(
                n_chunks=self.n_chunks,
                sw_batch_size=self.sw_batch_size,
                spatial_size=resolve_spatial_size(self.spatial_size, self._model_config()),
                postprocess=resolve_postprocess(None, self._model_config()),
                support_alignment=resolve_support_alignment(None, self._model_config()),
                query_range="all",
                amp=self.amp,
            )

        def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
            network = self._get_network(device, data)
            data = run_support_inference(
                data,
                self.inferer(data),
                network,
                input_key=self.input_key,
                output_key=self.output_label_key,
                convert_to_batch=convert_to_batch,
                device=device,
                organ_ids=self._organ_ids(data),
            )
            if data.get(SUPPORT_ON_QUERY):
                # The support slices were drawn by the user on this very volume: they are the ground truth there.
                drawn = torch.as_tensor(data["support_label"])  # [K, H, W, D], one binary mask per organ
                organs = self._organ_ids(data)
                if len(organs) > 1:  # the prediction is a label map of organ ids: so is the annotation
                    ids = torch.tensor(organs, dtype=torch.float32, device=drawn.device).view(-1, 1, 1, 1)
                    drawn = (drawn.float() * ids).amax(dim=0, keepdim=True)
                data[self.output_label_key] = keep_annotated_slices(data[self.output_label_key], drawn)
            return data

        def post_transforms(self, data: Mapping[str, Any] | None = None) -> Sequence[Callable]:
            return [RestoreQueryGridd(keys=self.output_label_key, ref_key=self.input_key)]

        def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
            organs = self._organ_ids(data)
            mask = np.asarray(data[self.output_label_key])
            voxels = {organ: int(np.count_nonzero(mask == organ if len(organs) > 1 else mask)) for organ in organs}
            warnings = list(getattr(self, "_model_warnings", []))
            for organ, count in voxels.items():
                if count == 0:
                    warnings.append(f"WARNING: empty mask: no voxel of organ {organ} found in {data.get(self.input_key)}")
                    print(warnings[-1], file=sys.stderr, flush=True)
            data[self.output_json_key] = {
                "organ_id": organs[0] if len(organs) == 1 else organs,
                "support_on_query": bool(data.get(SUPPORT_ON_QUERY)),
                "supports": count_support_keys(data) if self.uses_support else 0,
                "foreground_voxels": int(np.count_nonzero(mask)),
                "organ_voxels": {str(organ): count for organ, count in voxels.items()},
                "warnings": warnings,
            }
            return super().writer(data, extension=extension or ".nii.gz", dtype=mask.dtype)

else:

    class SDFSMISInferTask:  # type: ignore[no-redef]
        """Placeholder raising a clear error: MONAI Label is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise OptionalImportError(
                "SDFSMISInferTask needs MONAI Label: build its environment with "
                "`python -m monai_sdfsmis.monailabel.environment` (see README, MONAI Label)."
            )
