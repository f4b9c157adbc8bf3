"""Every bad input, one case each, through the bundle's inference pipeline (``configs/inference.json``): each gives
one clear message naming the file or key and the problem, no input is modified, and nothing half-written is left.

The cases run the bundle in this process (``monai.bundle.run``, the support-mask copy as the network, so no weights
are involved) and assert on the message of the first error of the project in the raised chain, which is the line
:mod:`monai_sdfsmis.errors` prints on the command line; one case runs the real command line in a subprocess and
checks what the user sees: a single ``sd_fsmis error:`` line as the last line of stderr, exit status 1.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_sdfsmis.errors import expected_error, format_error
from tests.test_transforms_io import two_series_folder, write_dicom_series
from tests.utils import REPO_ROOT, chaos_dir, requires_chaos

pytestmark = requires_chaos

BUNDLE = REPO_ROOT / "bundles" / "sd_fsmis"
INFERENCE = str(BUNDLE / "configs" / "inference.json")
COPY = {"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"}


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of real and broken inputs, built once; its checksums are compared after all cases."""
    folder = tmp_path_factory.mktemp("inputs")
    for name in ("image_2.nii.gz", "label_2.nii.gz", "image_3.nii.gz", "label_3.nii.gz"):
        shutil.copy(chaos_dir() / name, folder / name)
    image, label = nib.load(str(folder / "image_3.nii.gz")), nib.load(str(folder / "label_3.nii.gz"))
    data, affine = np.asarray(image.dataobj).astype(np.float32), image.affine
    labels = np.asarray(label.dataobj)

    def save(name, array, aff=affine):
        nib.save(nib.Nifti1Image(array, aff), str(folder / name))

    raw = (folder / "image_3.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (folder / "not_nifti.nii.gz").write_bytes(b"this is no image\n" * 20)
    save("slice_2d.nii.gz", data[:, :, 10])
    save("series_4d.nii.gz", np.stack([data, data], axis=-1))
    with_nan = data.copy()
    with_nan[100, 100, 5] = np.nan
    save("nan.nii.gz", with_nan)
    save("constant.nii.gz", np.full_like(data, 7.0))
    save("empty_label.nii.gz", np.zeros_like(labels))
    shifted = affine.copy()
    shifted[:3, 3] += (0.0, 0.0, 51.0)
    save("label_other_grid.nii.gz", labels, shifted)
    fractional = labels.astype(np.float32)
    fractional[labels == 1] = 0.5
    save("label_fractional.nii.gz", fractional)
    two_series_folder(folder / "dicom_two_series")
    slices = np.random.default_rng(4).integers(0, 500, size=(12, 10, 5)).astype(np.int16)
    write_dicom_series(folder / "dicom_missing_slice", slices, "1.2.826.0.1.3680043.99.5", "gap",
                       offsets=[0.0, 4.0, 12.0, 16.0, 20.0])
    # slices 2 and 3 at one position, file names in reverse slice order: ITK would stack them by file name
    write_dicom_series(folder / "dicom_repeated_slice", slices, "1.2.826.0.1.3680043.99.6", "repeat",
                       offsets=[0.0, 4.0, 8.0, 8.0, 12.0], file_numbers=[4, 3, 2, 1, 0])
    before = _digest(folder)
    yield folder
    assert _digest(folder) == before, "an input file was modified"


def _infer(out: Path, query: Path, support_image: Path, support_label: Path, organ_id=1, **overrides):
    from monai.bundle import run

    run(
        config_file=INFERENCE, logging_file=False, bundle_root=str(BUNDLE), output_dir=str(out), network_def=COPY,
        load_checkpoint=False, query_image=[str(q) for q in query] if isinstance(query, (list, tuple)) else str(query), support_image=str(support_image),
        support_label=str(support_label), organ_id=organ_id, spatial_size=64, progress=False, **overrides,
    )


def _message(out: Path, query: Path, image: Path, label: Path, organ_id=1, **overrides) -> str:
    """The one line the command line would print for this bad input (and check nothing was written)."""
    before = _digest(out) if out.is_dir() else {}
    with pytest.raises(Exception) as info:
        _infer(out, query, image, label, organ_id, **overrides)
    line = format_error(info.value)
    assert line is not None, f"not reported as an expected error: {info.value!r}"
    assert "\n" not in line and line.startswith("sd_fsmis error: ")
    assert (_digest(out) if out.is_dir() else {}) == before, "the output folder changed"
    return line


def _case(inputs, tmp_path, query="image_3.nii.gz", image="image_3.nii.gz", label="label_3.nii.gz", **kw) -> str:
    return _message(tmp_path / "out", inputs / query, inputs / image, inputs / label, **kw)


def test_missing_file(inputs, tmp_path):
    line = _case(inputs, tmp_path, query="no_such_image.nii.gz")
    assert re.search(rf"{re.escape(str(inputs / 'no_such_image.nii.gz'))} (does not exist|not found)", line)


@pytest.mark.parametrize("name", ["truncated.nii.gz", "not_nifti.nii.gz"])
def test_unreadable_or_truncated_nifti(inputs, tmp_path, name):
    line = _case(inputs, tmp_path, query=name)
    assert f"cannot read file {inputs / name}" in line and "corrupt or unsupported" in line


def test_two_dicom_series_in_one_folder(inputs, tmp_path):
    line = _case(inputs, tmp_path, query="dicom_two_series")
    assert f"folder {inputs / 'dicom_two_series'} holds 2 DICOM series" in line
    assert "(T2 SPIR, 8 slices)" in line and "(T1 in-phase, 5 slices)" in line and "series_uid" in line


def test_dicom_series_with_a_missing_slice(inputs, tmp_path):
    line = _case(inputs, tmp_path, query="dicom_missing_slice")
    assert f"DICOM series in {inputs / 'dicom_missing_slice'} is not evenly spaced" in line
    assert "from IM00001.dcm to IM00002.dcm" in line and "1 slice(s) missing?" in line


def test_dicom_series_with_two_slices_at_one_position(inputs, tmp_path):
    line = _case(inputs, tmp_path, query="dicom_repeated_slice")
    assert f"DICOM series in {inputs / 'dicom_repeated_slice'} has two slices at one position (3.000 mm" in line
    assert "IM00002.dcm and IM00001.dcm" in line


def test_2d_where_3d_is_needed(inputs, tmp_path):
    line = _case(inputs, tmp_path, query="slice_2d.nii.gz")
    assert f"{inputs / 'slice_2d.nii.gz'} holds 2D data" in line and "3D volume" in line


def test_4d(inputs, tmp_path):
    line = _case(inputs, tmp_path, query="series_4d.nii.gz")
    assert f"{inputs / 'series_4d.nii.gz'} holds 2 channels or time points" in line


def test_nan_or_inf(inputs, tmp_path):
    line = _case(inputs, tmp_path, query="nan.nii.gz")
    assert f"{inputs / 'nan.nii.gz'} contains 1 NaN voxels" in line


def test_constant_volume(inputs, tmp_path):
    line = _case(inputs, tmp_path, query="constant.nii.gz")
    assert "constant intensity 7" in line and "'image'" in line  # the key; the file is named by the loader's meta
    assert "constant.nii.gz" in line


def test_empty_support_label(inputs, tmp_path):
    line = _case(inputs, tmp_path, label="empty_label.nii.gz")
    assert f"label file {inputs / 'empty_label.nii.gz'} contains no foreground" in line


def test_absent_label_id(inputs, tmp_path):
    line = _case(inputs, tmp_path, organ_id=9)
    assert f"organ id 9 absent from {inputs / 'label_3.nii.gz'}; present ids: [0, 1, 2, 3, 4]" in line


@pytest.mark.parametrize("organ_id, message", [
    (1.5, "organ_id: 1.5 is not a label id"),
    ("liver", "organ_id: 'liver' is not a label id"),
    ([1, 1], "organ_id lists an organ twice: [1, 1]"),  # a list of distinct ids is a label map of several organs
    ([1, "liver"], "organ_id: 'liver' is not a label id"),
    (10**12, "organ id 1000000000000 absent from"),
])
def test_organ_id_that_is_not_a_label_id(inputs, tmp_path, organ_id, message):
    line = _case(inputs, tmp_path, organ_id=organ_id)
    assert message in line


def test_complex_query(inputs, tmp_path):
    image = nib.load(str(inputs / "image_2.nii.gz"))
    data = np.asarray(image.dataobj).astype(np.float32)
    folder = tmp_path / "complex"
    folder.mkdir()
    nib.save(nib.Nifti1Image((data + 1j * data).astype(np.complex64), image.affine), str(folder / "query.nii.gz"))
    line = _message(tmp_path / "out", folder / "query.nii.gz", inputs / "image_3.nii.gz", inputs / "label_3.nii.gz")
    assert f"{folder / 'query.nii.gz'} holds complex values" in line


def test_label_of_another_grid(inputs, tmp_path):
    line = _case(inputs, tmp_path, label="label_other_grid.nii.gz")
    assert str(inputs / "label_other_grid.nii.gz") in line and str(inputs / "image_3.nii.gz") in line
    assert "origins 51 mm apart" in line


def test_non_integer_label(inputs, tmp_path):
    line = _case(inputs, tmp_path, label="label_fractional.nii.gz")
    assert f"{inputs / 'label_fractional.nii.gz'} contains non-integer values (e.g. 0.5)" in line


def test_label_ids_that_an_integer_cast_would_wrap_are_refused(inputs, tmp_path):
    """A uint64 id of 2**32 + 1 becomes 1 (the liver) in an int32 cast, silently: refused, naming the file."""
    label = nib.load(str(inputs / "label_3.nii.gz"))
    ids = np.asarray(label.dataobj).astype(np.uint64)
    ids[ids == 2] = 2**32 + 1
    path = tmp_path / "label_u64.nii.gz"
    nib.save(nib.Nifti1Image(ids, label.affine, dtype=np.uint64), str(path))
    line = _message(tmp_path / "out", inputs / "image_3.nii.gz", inputs / "image_3.nii.gz", path)
    assert f"{path} holds values from 0 to {2**32 + 1}, outside the torch.int32 range of label ids" in line


def test_detached_nrrd_header_without_its_data_file(inputs, tmp_path):
    nrrd = pytest.importorskip("nrrd")
    data = np.asarray(nib.load(str(inputs / "image_3.nii.gz")).dataobj).astype(np.float32)
    header = tmp_path / "query.nhdr"
    nrrd.write(str(header), data, {"space": "left-posterior-superior", "space directions": np.diag([1.25, 1.25, 7.7]),
                                   "space origin": [0.0, 0.0, 0.0]}, detached_header=True)
    (data_file,) = [p for p in tmp_path.iterdir() if p.name.startswith("query.raw")]
    data_file.unlink()
    line = _message(tmp_path / "out", header, inputs / "image_3.nii.gz", inputs / "label_3.nii.gz")
    assert f"NRRD header {header} names the data file {data_file}, which does not exist" in line


def test_gzip_stream_named_nii(inputs, tmp_path):
    query = tmp_path / "query.nii"
    query.write_bytes((inputs / "image_3.nii.gz").read_bytes())
    line = _message(tmp_path / "out", query, inputs / "image_3.nii.gz", inputs / "label_3.nii.gz")
    assert f"{query} is gzip-compressed but named .nii: rename it to query.nii.gz" in line


def test_a_label_stored_with_swapped_axes_gives_the_same_mask(inputs, tmp_path):
    """The label's array is transposed and its header says so (the affine's columns swapped): same world, same mask."""
    label = nib.load(str(inputs / "label_3.nii.gz"))
    ids = np.asarray(label.dataobj)
    swapped_affine = label.affine.copy()
    swapped_affine[:, [0, 1]] = label.affine[:, [1, 0]]
    swapped = tmp_path / "label_swapped.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.swapaxes(ids, 0, 1)), swapped_affine), str(swapped))
    for name, support_label in (("plain", inputs / "label_3.nii.gz"), ("swapped", swapped)):
        _infer(tmp_path / name, inputs / "image_3.nii.gz", inputs / "image_3.nii.gz", support_label)
    plain, other = (np.asarray(nib.load(str(tmp_path / n / "image_3_seg.nii.gz")).dataobj) for n in ("plain", "swapped"))
    assert plain.any()
    np.testing.assert_array_equal(other, plain)


def test_a_query_given_twice_is_one_line(inputs, tmp_path):
    line = _message(tmp_path / "out", [inputs / "image_2.nii.gz", inputs / "image_2.nii.gz"],
                    inputs / "image_3.nii.gz", inputs / "label_3.nii.gz")
    target = tmp_path / "out" / "image_2_seg.nii.gz"
    assert f"queries {inputs / 'image_2.nii.gz'} and {inputs / 'image_2.nii.gz'} would both be written to {target}" in line


def test_output_that_would_replace_an_input(inputs, tmp_path):
    # The query's output name, <query>_seg.nii.gz, is an input (say, an earlier annotation) in the output folder.
    folder = tmp_path / "data"
    folder.mkdir()
    query = folder / "image_3.nii.gz"
    shutil.copy(inputs / "image_3.nii.gz", query)
    annotation = folder / "image_3_seg.nii.gz"
    shutil.copy(inputs / "label_3.nii.gz", annotation)
    digest = hashlib.sha256(annotation.read_bytes()).hexdigest()
    line = _message(folder, query, inputs / "image_3.nii.gz", annotation)
    assert f"refusing to write {annotation}: it is an input file (support_label)" in line
    # Even when overwriting is asked for, an input is never written over; both are refused before inference.
    line = _message(folder, query, inputs / "image_3.nii.gz", annotation, overwrite=True)
    assert f"refusing to write {annotation}: it is an input file (support_label)" in line
    assert "config 'run::0'" in line  # check_outputs, the first step of the run, not the writer at the end
    assert hashlib.sha256(annotation.read_bytes()).hexdigest() == digest


def test_unwritable_output_folder(inputs, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = _message(blocker / "out", inputs / "image_3.nii.gz", inputs / "image_3.nii.gz", inputs / "label_3.nii.gz")
    assert f"output folder {blocker / 'out'} is not writable" in line


def test_output_folder_that_is_a_broken_link(inputs, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    line = _message(link, inputs / "image_3.nii.gz", inputs / "image_3.nii.gz", inputs / "label_3.nii.gz")
    assert f"output folder {link} is a broken symbolic link (to {tmp_path / 'gone'})" in line


def test_in_plane_size_not_256_is_resized_not_refused(inputs, tmp_path):
    """Slices of another in-plane size are legitimate: resized to the network's size and the mask resized back."""
    image, label = nib.load(str(inputs / "image_3.nii.gz")), nib.load(str(inputs / "label_3.nii.gz"))
    crop = (slice(30, 230), slice(40, 220), slice(None))  # 200 x 180 in-plane
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([30, 40, 0]) + image.affine[:3, 3]
    folder = tmp_path / "cropped"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[crop], affine), str(folder / "image_c.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[crop], affine), str(folder / "label_c.nii.gz"))
    out = tmp_path / "out"
    _infer(out, folder / "image_c.nii.gz", folder / "image_c.nii.gz", folder / "label_c.nii.gz")
    written = nib.load(str(out / "image_c_seg.nii.gz"))
    assert written.shape == (200, 180, image.shape[2])
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    assert np.asarray(written.dataobj).any()


def test_inference_twice_gives_identical_files(inputs, tmp_path):
    for run in ("first", "second"):
        _infer(tmp_path / run, inputs / "image_2.nii.gz", inputs / "image_3.nii.gz", inputs / "label_3.nii.gz")
    first, second = (tmp_path / run / "image_2_seg.nii.gz" for run in ("first", "second"))
    if first.read_bytes() != second.read_bytes():
        # gzip stores a time stamp; the NIfTI inside must be byte for byte the same.
        assert gzip.decompress(first.read_bytes()) == gzip.decompress(second.read_bytes())
    assert [p.name for p in (tmp_path / "first").iterdir()] == ["image_2_seg.nii.gz"]  # no temporary file left


@pytest.mark.parametrize("entry, message", [
    ({"image": 123}, "entry 0: 'image' must be a file path, got 123."),
    ({"image": "image_2.nii.gz", "support_label": None}, "entry 0: 'support_label' must be a file path, got None."),
])
def test_datalist_entry_that_is_not_a_path(inputs, tmp_path, entry, message):
    import json

    from monai_sdfsmis.engines.inference import query_datalist

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [entry]}))
    with pytest.raises(ValueError, match=re.escape(f"Datalist '{datalist}' {message}")):
        query_datalist(datalist, inputs / "image_3.nii.gz", inputs / "label_3.nii.gz")


@pytest.mark.parametrize("device, message", [
    ("gpu0", "--device 'gpu0' is not a torch device (e.g. cpu, cuda, cuda:1)"),
    ("cuda", "--device cuda: CUDA is not available here"),
])
def test_device_that_is_not_there_is_one_line(inputs, tmp_path, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [sys.executable, "-m", "monai_sdfsmis", "infer", "--query", str(inputs / "image_2.nii.gz"),
         "--support", str(inputs / "image_3.nii.gz"), "--support_label", str(inputs / "label_3.nii.gz"),
         "--organ_id", "1", "--model", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--device", device],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_the_command_line_ends_in_one_readable_line(inputs, tmp_path):
    """What a user sees: no traceback, the message last, exit status 1; ``SDFSMIS_DEBUG=1`` gives the traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", SDFSMIS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    args = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--network_def", '{"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"}',
        "--load_checkpoint", "False", "--query_image", str(inputs / "image_2.nii.gz"),
        "--support_image", str(inputs / "image_3.nii.gz"), "--support_label", str(inputs / "label_3.nii.gz"),
        "--organ_id", "9", "--output_dir", str(tmp_path / "out"), "--progress", "False",
    ]
    proc = subprocess.run(args, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1
    # The logs (stdout) keep one line per logged exception but no traceback: the message is not buried.
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert len(proc.stdout.splitlines()) < 40 and "Failed to" not in lines[-1]
    assert lines[-1].startswith("sd_fsmis error: organ id 9 absent from ") and "label_3.nii.gz" in lines[-1]
    assert sum("organ id 9" in line for line in lines) <= 2, proc.stderr[-3000:]  # ignite's one-line log at most


def test_debug_setting_keeps_the_full_traceback(inputs, tmp_path):
    from monai_sdfsmis import errors

    with pytest.raises(Exception) as info:
        _infer(tmp_path / "out", inputs / "image_2.nii.gz", inputs / "image_3.nii.gz", inputs / "label_3.nii.gz", 9)
    buffer = io.StringIO()
    old = sys.stderr
    try:
        sys.stderr = buffer
        os.environ[errors.DEBUG_ENV] = "1"
        errors._excepthook(type(info.value), info.value, info.value.__traceback__)
    finally:
        sys.stderr = old
        os.environ.pop(errors.DEBUG_ENV, None)
    text = buffer.getvalue()
    assert "Traceback (most recent call last)" in text and "organ id 9 absent" in text
    assert "sd_fsmis error:" not in text


def test_bugs_are_not_reported_as_expected_errors():
    try:
        raise ValueError("a library's value error")
    except ValueError as error:
        assert expected_error(error) is None  # raised outside monai_sdfsmis: a bug, keep the traceback
    try:
        raise RuntimeError("wrapper") from OSError(28, "No space left on device")
    except RuntimeError as error:
        assert format_error(error).startswith("sd_fsmis error: [Errno 28] No space left on device")
