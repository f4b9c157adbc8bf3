from __future__ import annotations

import pytest
import torch
from monai.utils import OptionalImportError

from monai_sdfsmis.inferers import SlidingSupportInferer
from monai_sdfsmis.monailabel import SDFSMISInferTask, resolve_support_request, run_support_inference
from monai_sdfsmis.monailabel.infer_task import has_monailabel
from monai_sdfsmis.networks.support_copy import SupportMaskCopy


class DictDatastore:
    """The two look-ups of a MONAI Label datastore that the task uses, backed by a dict."""

    def __init__(self, images: dict[str, str], labels: dict[str, str]):
        self.images, self.labels = images, labels

    def get_image_uri(self, image_id: str) -> str:
        return self.images[image_id]

    def get_label_uri(self, label_id: str, tag: str) -> str:
        assert tag == "final"
        return self.labels[label_id]


def test_resolve_support_from_datastore_id():
    store = DictDatastore({"case1": "/s/case1.nii.gz"}, {"case1": "/s/labels/final/case1.nii.gz"})
    out = resolve_support_request({"image": "/s/q.nii.gz", "support_image": "case1"}, store)
    assert out["support_image"] == "/s/case1.nii.gz"
    assert out["support_label"] == "/s/labels/final/case1.nii.gz"


def test_resolve_support_from_uploaded_label_and_path():
    out = resolve_support_request({"support_image": "/a/sup.nii.gz", "label": "/tmp/upload.nii.gz"}, None)
    assert out == {"support_image": "/a/sup.nii.gz", "label": "/tmp/upload.nii.gz", "support_label": "/tmp/upload.nii.gz"}


@pytest.mark.parametrize("request_", [{"image": "q"}, {"support_image": "/a/sup.nii.gz"}])
def test_resolve_support_errors(request_):
    with pytest.raises(ValueError, match="support"):
        resolve_support_request(request_, None)


def test_run_support_inference_with_support_copy():
    depth = 9
    query = torch.rand(1, 64, 64, depth) * 2 - 1
    support_label = torch.zeros(1, 64, 64, depth)
    support_label[:, 20:40, 10:30, 2:7] = 1
    data = {"image": query, "support_image": query.clone(), "support_label": support_label}
    out = run_support_inference(
        data, SlidingSupportInferer(n_chunks=3, spatial_size=64, query_range="all"), SupportMaskCopy()
    )
    pred = out["pred"]
    assert pred.shape == (1, 64, 64, depth)
    # the copy baseline predicts the support's box on every slice of the range it finds
    assert torch.equal(pred[0, :, :, depth // 2], support_label[0, :, :, 4])


def test_run_support_inference_names_missing_keys():
    with pytest.raises(ValueError, match="support_label"):
        run_support_inference({"image": torch.zeros(1, 8, 8, 3), "support_image": torch.zeros(1, 8, 8, 3)},
                              SlidingSupportInferer(), SupportMaskCopy())


@pytest.mark.skipif(has_monailabel, reason="MONAI Label installed: the placeholder is not used")
def test_task_without_monailabel_says_how_to_install():
    with pytest.raises(OptionalImportError, match="monai-sdfsmis\\[label\\]"):
        SDFSMISInferTask(path="x", conf={})
