"""The MONAI Label task pieces that run without a server: support resolution, grid restoration, inference."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.utils import OptionalImportError

from monai_sdfsmis.inferers import SlidingSupportInferer
from monai_sdfsmis.monailabel import (
    RestoreQueryGridd,
    SDFSMISInferTask,
    SDFSMISTrainTask,
    keep_annotated_slices,
    organ_ids_of_request,
    resolve_support_request,
    run_support_inference,
    train_from_records,
)
from monai_sdfsmis.monailabel.infer_task import has_monailabel
from monai_sdfsmis.networks.support_copy import SupportMaskCopy
from monai_sdfsmis.transforms.io import load_volume
from tests.utils import chaos_dir, requires_chaos


class DictDatastore:
    """The look-ups of a MONAI Label ``LocalDatastore`` the task uses: ``""`` for an unknown id, as it returns."""

    def __init__(self, images: dict[str, str], labels: dict[tuple[str, str], str]):
        self.images, self.labels = images, labels

    def get_image_uri(self, image_id: str) -> str:
        return self.images.get(image_id, "")

    def get_label_uri(self, label_id: str, tag: str) -> str:
        return self.labels.get((label_id, tag), "")


@pytest.fixture
def store(tmp_path):
    names = ("q", "case1", "case1_label", "case1_draft", "case2", "case2_label")
    files = {name: tmp_path / f"{name}.nii.gz" for name in names}
    for f in files.values():
        f.write_bytes(b"")
    images = {"q": str(files["q"]), "case1": str(files["case1"]), "case2": str(files["case2"])}
    labels = {("case1", "final"): str(files["case1_label"]), ("case1", "draft"): str(files["case1_draft"]),
              ("case2", "final"): str(files["case2_label"])}
    return DictDatastore(images, labels), files


def test_resolve_support_from_datastore_id(store):
    ds, files = store
    out = resolve_support_request({"image": "q", "support_image": "case1"}, ds)
    assert out["support_image"] == str(files["case1"])
    assert out["support_label"] == str(files["case1_label"])
    assert out["support_on_query"] is False
    draft = resolve_support_request({"image": "q", "support_image": "case1", "support_label_tag": "draft"}, ds)
    assert draft["support_label"] == str(files["case1_draft"])


def test_resolve_several_labelled_studies_as_k_supports(store):
    ds, files = store
    out = resolve_support_request({"image": "q", "support_image": ["case1", "case2"]}, ds)
    assert (out["support_image"], out["support_label"]) == (str(files["case1"]), str(files["case1_label"]))
    assert (out["support_image_2"], out["support_label_2"]) == (str(files["case2"]), str(files["case2_label"]))
    assert "support_image_3" not in out and out["support_on_query"] is False
    paired = resolve_support_request(
        {"image": "q", "support_image": ["case1", "case2"], "support_label": [str(files["case1_draft"]), "case2"]}, ds
    )
    assert paired["support_label"] == str(files["case1_draft"]) and paired["support_label_2"] == str(files["case2_label"])
    with pytest.raises(ValueError, match="2 support_image\\(s\\) but 1 support_label"):
        resolve_support_request({"image": "q", "support_image": ["case1", "case2"], "support_label": ["case1"]}, ds)
    with pytest.raises(ValueError, match="take a list of 2 support_label"):
        resolve_support_request({"image": "q", "support_image": ["case1", "case2"], "support_label": "case1"}, ds)
    with pytest.raises(ValueError, match="'case9': no such study"):
        resolve_support_request({"image": "q", "support_image": ["case1", "case9"]}, ds)


@pytest.mark.parametrize("value, expected", [
    (2, [2]), ("3", [3]), ("spleen", [4]), (["liver", 3], [1, 3]), ([4, 1, 2, 3], [4, 1, 2, 3]),
])
def test_organ_ids_of_a_request(value, expected):
    assert organ_ids_of_request(value, {"liver": 1, "right kidney": 2, "left kidney": 3, "spleen": 4}) == expected


@pytest.mark.parametrize("value, message", [
    ("pancreas", "'pancreas' is neither a label id nor one of the labels"),
    ([1, "liver"], "lists an organ twice"),
    ([], "non-empty list"),
    (0, "positive integer"),
])
def test_organ_ids_of_a_request_refused(value, message):
    with pytest.raises(ValueError, match=message):
        organ_ids_of_request(value, {"liver": 1})


def test_resolve_support_path_and_uploaded_label(tmp_path):
    sup, upload = tmp_path / "sup.nii.gz", tmp_path / "upload.nii.gz"
    sup.write_bytes(b"")
    upload.write_bytes(b"")
    out = resolve_support_request({"image": "/q.nii.gz", "support_image": str(sup), "label": str(upload)}, None)
    assert (out["support_image"], out["support_label"], out["support_on_query"]) == (str(sup), str(upload), False)


def test_resolve_one_slice_support_on_the_query(store, tmp_path):
    ds, files = store
    drawn = tmp_path / "drawn.nii.gz"
    out = resolve_support_request({"image": "q", "label": str(drawn)}, ds)
    assert out["support_image"] == str(files["q"]) and out["support_label"] == str(drawn)
    assert out["support_on_query"] is True


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"image": "q"}, "names no support"),
        ({"image": "q", "support_image": "nope"}, "'nope': no such study"),
        ({"image": "q", "support_image": "q"}, "support study 'q' has no 'final' label"),
        ({"image": "q", "support_image": "case1", "support_label_tag": "other"}, "no 'other' label"),
        ({"image": "q", "support_image": "case1", "support_label": "case9"}, "support_label 'case9': the datastore"),
    ],
)
def test_resolve_support_errors_name_the_problem(store, request_, message):
    with pytest.raises(ValueError, match=message):
        resolve_support_request(request_, store[0])


@requires_chaos
def test_restore_query_grid_undoes_the_ras_reorientation_of_a_las_file():
    path = chaos_dir() / "label_1.nii.gz"
    file_labels = np.asanyarray(nib.load(path).dataobj)  # the file's own voxel order, read by nibabel alone
    assert nib.aff2axcodes(nib.load(path).affine) == ("L", "A", "S")
    query = load_volume(chaos_dir() / "image_1.nii.gz")  # RAS, as the bundle loads it
    ras_mask = (load_volume(path) == 1).float()
    assert not np.array_equal(ras_mask[0].numpy(), file_labels == 1)  # RAS differs from the file's order
    out = RestoreQueryGridd(keys="pred")({"image": query, "pred": ras_mask})
    assert out["pred"].dtype == np.uint8 and out["pred"].shape == file_labels.shape
    np.testing.assert_array_equal(out["pred"], (file_labels == 1).astype(np.uint8))
    np.testing.assert_allclose(out["pred_meta_dict"]["affine"], nib.load(path).affine, atol=1e-5)


def test_restore_query_grid_on_a_permuted_orientation(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.random((6, 7, 5)) > 0.5).astype(np.float32)
    affine = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 5], [0, 3.0, 0, -7], [0, 0, 0, 1]])  # axes P, S, L
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "q.nii.gz")
    assert nib.aff2axcodes(affine) == ("P", "S", "L")
    query = load_volume(tmp_path / "q.nii.gz")
    out = RestoreQueryGridd(keys="pred")({"image": query, "pred": query.clone()})
    np.testing.assert_array_equal(out["pred"], data.astype(np.uint8))
    np.testing.assert_allclose(out["pred_meta_dict"]["affine"], affine, atol=1e-5)


def test_restore_query_grid_rejects_a_mask_of_another_shape():
    image = MetaTensor(torch.zeros(1, 4, 4, 3), meta={"original_affine": np.eye(4)})
    with pytest.raises(ValueError, match="shape"):
        RestoreQueryGridd(keys="pred")({"image": image, "pred": torch.zeros(1, 4, 4, 2)})
    with pytest.raises(ValueError, match="original_affine"):
        RestoreQueryGridd(keys="pred")({"image": torch.zeros(1, 4, 4, 3), "pred": torch.zeros(1, 4, 4, 3)})


def test_keep_annotated_slices():
    pred = torch.zeros(1, 5, 5, 4)
    pred[..., 0] = 1
    drawn = torch.zeros(1, 5, 5, 4)
    drawn[0, 1:3, 1:3, 2] = 1
    out = keep_annotated_slices(pred, drawn)
    assert torch.equal(out[..., 2], drawn[..., 2])  # the drawn slice comes back as drawn
    assert torch.equal(out[..., [0, 1, 3]], pred[..., [0, 1, 3]])  # the others as predicted
    with pytest.raises(ValueError, match="shape"):
        keep_annotated_slices(pred, drawn[..., :3])


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


def _boxes_volume(depth: int, boxes: dict[int, tuple[slice, slice]]) -> torch.Tensor:
    label = torch.zeros(1, 64, 64, depth)
    for organ, (rows, cols) in boxes.items():
        label[0, rows, cols, 2:7] = organ
    return label


def test_run_support_inference_for_several_organs_equals_separate_calls():
    """One call for organs 4 and 2 gives the label map that two single-organ calls give, with the organs' ids."""
    depth = 9
    query = torch.rand(1, 64, 64, depth) * 2 - 1
    label = _boxes_volume(depth, {2: (slice(5, 20), slice(5, 20)), 4: (slice(30, 50), slice(35, 60))})
    inferer = SlidingSupportInferer(n_chunks=3, spatial_size=64, query_range="all")
    singles = {}
    for organ in (4, 2):
        data = {"image": query, "support_image": query.clone(), "support_label": (label == organ).float()}
        singles[organ] = run_support_inference(data, inferer, SupportMaskCopy())["pred"]
    both = {"image": query, "support_image": query.clone(),
            "support_label": torch.cat([(label == 4).float(), (label == 2).float()])}  # [K, H, W, D], K = 2
    pred = run_support_inference(both, inferer, SupportMaskCopy(), organ_ids=[4, 2])["pred"]
    expected = 4 * singles[4] + 2 * singles[2]  # the two boxes do not overlap
    assert singles[4].any() and singles[2].any() and not (singles[4].bool() & singles[2].bool()).any()
    assert torch.equal(pred, expected)


def test_run_support_inference_with_two_supports_averages_their_soft_masks():
    """k = 2 with the copy: the average of two soft copies in {-1, 1} is 1 where both have the organ and 0 where only
    one has it; the copy's mask is where the soft mask is above 0, i.e. the intersection of the two copied boxes."""
    depth = 9
    query = torch.rand(1, 64, 64, depth) * 2 - 1
    first = _boxes_volume(depth, {1: (slice(10, 40), slice(10, 40))})
    second = _boxes_volume(depth, {1: (slice(20, 50), slice(20, 50))})
    data = {"image": query, "support_image": query.clone(), "support_label": first,
            "support_image_2": query.clone(), "support_label_2": second}
    inferer = SlidingSupportInferer(n_chunks=3, spatial_size=64, query_range="all")
    pred = run_support_inference(data, inferer, SupportMaskCopy())["pred"]
    intersection = first[0, :, :, 4] * second[0, :, :, 4]
    assert torch.equal(pred[0, :, :, depth // 2], intersection)


def test_run_support_inference_serves_a_supervised_model_without_support():
    """A supervised network (no support): organs 4 and 2 in one call give the label map that the inferer's separate
    single-organ calls give, with the organs' ids; asking for no organ is one line."""
    from monai_sdfsmis.engines.autoencoder import freeze_and_calibrate
    from monai_sdfsmis.networks.autoencoder import build_autoencoder
    from monai_sdfsmis.networks.supervised import build_supervised_segmenter

    torch.manual_seed(0)
    vae = freeze_and_calibrate(build_autoencoder("tiny", sample_size=32), torch.rand(8, 3, 32, 32) * 2 - 1)
    net = build_supervised_segmenter(vae, (2, 4), "tiny", seed=0)
    with torch.no_grad():  # a random UNet barely reads its condition; spread the organs' conditions
        net.organ_conditions.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
        net.unet.conv_out.bias.fill_(-0.05)  # some foreground, not all
    net.eval()
    query = torch.rand(1, 32, 32, 5, generator=torch.Generator().manual_seed(2)) * 2 - 1
    inferer = SlidingSupportInferer(spatial_size=32, query_range="all")
    separate = {organ: inferer(query[None], net, organ_id=organ)[0] for organ in (4, 2)}
    pred = run_support_inference({"image": query}, inferer, net, organ_ids=[4, 2])["pred"]
    only_one = (separate[4] > 0) ^ (separate[2] > 0)
    expected = torch.where(separate[4] > 0, 4.0, torch.where(separate[2] > 0, 2.0, 0.0))
    assert only_one.any(), "the check needs voxels claimed by exactly one organ"
    torch.testing.assert_close(pred[only_one], expected[only_one])
    assert torch.equal(pred == 0, (separate[4] == 0) & (separate[2] == 0))
    with pytest.raises(ValueError, match="name them with organ_id"):
        run_support_inference({"image": query}, inferer, net)


@requires_chaos
def test_restore_query_grid_keeps_organ_ids():
    query = load_volume(chaos_dir() / "image_1.nii.gz")
    labels = load_volume(chaos_dir() / "label_1.nii.gz").float()
    file_labels = np.asanyarray(nib.load(chaos_dir() / "label_1.nii.gz").dataobj)
    out = RestoreQueryGridd(keys="pred")({"image": query, "pred": labels})
    np.testing.assert_array_equal(out["pred"], file_labels.astype(np.uint8))
    assert set(np.unique(out["pred"])) == {0, 1, 2, 3, 4}


def test_run_support_inference_names_missing_keys():
    with pytest.raises(ValueError, match="support_label"):
        run_support_inference({"image": torch.zeros(1, 8, 8, 3), "support_image": torch.zeros(1, 8, 8, 3)},
                              SlidingSupportInferer(), SupportMaskCopy())


def test_train_from_records_checks_its_folders(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        train_from_records([], tmp_path, tmp_path / "no_bundle")


@pytest.mark.skipif(has_monailabel, reason="MONAI Label installed: the placeholder is not used")
@pytest.mark.parametrize("task", [SDFSMISInferTask, SDFSMISTrainTask])
def test_task_without_monailabel_says_how_to_install(task):
    with pytest.raises(OptionalImportError, match="monai_sdfsmis.monailabel.environment"):
        task("x", "y")
