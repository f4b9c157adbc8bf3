"""A real MONAI Label 0.8.5 server with the sample app, on 127.0.0.1, over real CHAOS (LAS) volumes.

The server runs in the cached environment of :mod:`monai_sdfsmis.monailabel.environment` (built on first
use, a few minutes; skipped only when the package index cannot be reached). Every returned mask is
checked voxel for voxel against the standalone bundle inference (``configs/inference.json``) run on the
same LAS files with the same model folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from monai_sdfsmis.monailabel import app_dir
from monai_sdfsmis.monailabel.environment import _is_ready, default_env_dir, ensure_monailabel_env, env_executable
from tests.utils import REPO_ROOT, chaos_dir, requires_chaos, stop_process, wait_until_serving

pytestmark = [requires_chaos, pytest.mark.timeout(1500)]

BUNDLE = REPO_ROOT / "bundles" / "sd_fsmis"
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SDFSMIS_NUM_THREADS": "1"}
QUERY, SUPPORT, UNLABELLED = 1, 2, 3


def _index_reachable() -> bool:
    """Whether pip can fetch a small package (the environment's build needs the package index)."""
    with tempfile.TemporaryDirectory() as dest:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", dest, "--quiet",
                            "timeloop==1.0.2"], check=True, timeout=120, capture_output=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return False
    return True


@pytest.fixture(scope="module")
def env_python() -> Path:
    if not _is_ready(default_env_dir()) and not _index_reachable():
        pytest.skip("the MONAI Label environment is not built and the package index is unreachable")
    return env_executable(ensure_monailabel_env(), "python")


def make_model_dir(folder: Path, spatial_size: int = 64) -> Path:
    """A tiny no-prior model folder in the on-disk format of a training run (autoencoder/, model.pt, model_config)."""
    from monai_sdfsmis.engines.autoencoder import freeze_and_calibrate
    from monai_sdfsmis.engines.model_folder import write_model_config
    from monai_sdfsmis.networks.autoencoder import build_autoencoder, save_autoencoder
    from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis
    from monai_sdfsmis.transforms.io import load_volume

    torch.manual_seed(0)
    vae = build_autoencoder("tiny", sample_size=spatial_size)
    image = load_volume(chaos_dir() / f"image_{SUPPORT}.nii.gz")[0]
    slices = image[..., :: max(1, image.shape[-1] // 8)].permute(2, 0, 1)[:, None]
    slices = torch.nn.functional.interpolate(slices, size=(spatial_size, spatial_size), mode="bilinear")
    slices = (slices - slices.min()) / (slices.max() - slices.min()) * 2 - 1
    freeze_and_calibrate(vae, slices.expand(-1, 3, -1, -1).contiguous())
    save_autoencoder(vae, folder / "autoencoder")
    net = build_no_prior_sdfsmis(folder / "autoencoder", "tiny", seed=0)
    torch.save(net.state_dict(), folder / "model.pt")
    write_model_config(folder, net, "no_prior", spatial_size, "minmax")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _running_server(env_python: Path, root: Path, studies: Path, model: Path):
    """A MONAI Label server on 127.0.0.1 serving ``model`` over ``studies``; stopped by its PID on exit."""
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(env_python), "-m", "monailabel.main", "start_server", "--app", app_dir(str(root / "app")), "--studies", str(studies),
         "--host", "127.0.0.1", "--port", str(port), "--conf", "models", str(model)],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, env={**os.environ, **THREADS},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url + "/info/", root / "server.log", "server", 180)
        yield {"url": url, "root": root, "studies": studies, "model": model, "log": root / "server.log"}
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture(scope="module")
def server(env_python, tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for n in (QUERY, SUPPORT, UNLABELLED):
        shutil.copy(chaos_dir() / f"image_{n}.nii.gz", studies / f"image_{n}.nii.gz")
    shutil.copy(chaos_dir() / f"label_{SUPPORT}.nii.gz", studies / "labels" / "final" / f"image_{SUPPORT}.nii.gz")
    model = make_model_dir(root / "model")
    # Two studies already have cached supervoxels; the third has none, so /train must compute it.
    (model / "supervoxels").mkdir()
    for n in (QUERY, SUPPORT):
        shutil.copy(chaos_dir() / "supervoxels_5000" / f"superpix-MIDDLE_{n}.nii.gz", model / "supervoxels")
    with _running_server(env_python, root, studies, model) as running:
        yield running


def make_supervised_model_dir(folder: Path, spatial_size: int = 64) -> Path:
    """A tiny supervised model folder (organs 1 and 4) in the on-disk format of ``train --supervised``."""
    from monai_sdfsmis.engines.autoencoder import freeze_and_calibrate
    from monai_sdfsmis.engines.model_folder import write_model_config
    from monai_sdfsmis.networks.autoencoder import build_autoencoder, save_autoencoder
    from monai_sdfsmis.networks.supervised import build_supervised_segmenter

    torch.manual_seed(0)
    vae = freeze_and_calibrate(build_autoencoder("tiny", sample_size=spatial_size),
                               torch.rand(8, 3, spatial_size, spatial_size) * 2 - 1)
    save_autoencoder(vae, folder / "autoencoder")
    net = build_supervised_segmenter(folder / "autoencoder", (1, 4), "tiny", seed=0)
    torch.save(net.state_dict(), folder / "model.pt")
    write_model_config(folder, net, "supervised", spatial_size, "minmax")
    return folder


def test_a_supervised_model_is_served_without_support(env_python, tmp_path):
    """``train --supervised``'s folder: a request names only organs; the label map equals the bundle's own run on
    the original file; a request that names a support is an HTTP 400 saying why; the app offers no /train."""
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(chaos_dir() / f"image_{QUERY}.nii.gz", studies / f"image_{QUERY}.nii.gz")
    model = make_supervised_model_dir(tmp_path / "model")
    with _running_server(env_python, tmp_path, studies, model) as running:
        mask, img = _returned_mask(_infer(running, {"organ_id": ["liver", 4]}), tmp_path / "m.nii.gz")
        _check_query_grid(img)
        refused = _infer(running, {"organ_id": 1, "support_image": f"image_{QUERY}"})
        assert refused.status_code == 400 and "this model is supervised" in refused.text
        trainers = requests.get(running["url"] + "/info/", timeout=30).json().get("trainers", {})
        assert "sd_fsmis" not in trainers
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--model_dir", str(model), "--query_image", str(studies / f"image_{QUERY}.nii.gz"),
           "--organ_id", "[1, 4]", "--output_dir", str(tmp_path / "ref"), "--progress", "false"]
    subprocess.run(cmd, cwd=BUNDLE, check=True, env={**os.environ, **THREADS}, capture_output=True, timeout=600)
    ref = np.asanyarray(nib.load(tmp_path / "ref" / f"image_{QUERY}_seg.nii.gz").dataobj)
    assert set(np.unique(mask)) == {0, 1, 4}, "the check needs both organs in the map (seed 0 gives both)"
    np.testing.assert_array_equal(mask, ref)


def _infer(server, params: dict, files: dict | None = None, image: str = f"image_{QUERY}") -> requests.Response:
    return requests.post(
        f"{server['url']}/infer/sd_fsmis", params={"image": image, "output": "image"},
        data={"params": json.dumps(params)}, files=files, timeout=600,
    )


def _bundle_mask(server, out: Path, support_image: Path, support_label: Path, organ_id: int = 1) -> np.ndarray:
    """The standalone bundle inference on the original files: the independent reference."""
    query = server["studies"] / f"image_{QUERY}.nii.gz"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--network_type", "no_prior", "--model_dir", str(server["model"]), "--query_image", str(query),
           "--support_image", str(support_image), "--support_label", str(support_label),
           "--organ_id", str(organ_id), "--output_dir", str(out), "--progress", "false"]
    subprocess.run(cmd, cwd=BUNDLE, check=True, env={**os.environ, **THREADS}, capture_output=True, timeout=600)
    return np.asanyarray(nib.load(out / f"image_{QUERY}_seg.nii.gz").dataobj)


def _returned_mask(response: requests.Response, path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


def _check_query_grid(img: nib.Nifti1Image) -> None:
    query = nib.load(chaos_dir() / f"image_{QUERY}.nii.gz")
    assert nib.aff2axcodes(query.affine) == ("L", "A", "S")  # the case MONAI Label's Restored mirrors
    assert img.shape == query.shape
    np.testing.assert_allclose(img.affine, query.affine, atol=1e-4)
    assert img.get_data_dtype() == np.uint8


def test_infer_support_by_datastore_id_matches_bundle(server, tmp_path):
    mask, img = _returned_mask(_infer(server, {"support_image": f"image_{SUPPORT}", "organ_id": 1}), tmp_path / "m.nii.gz")
    _check_query_grid(img)
    studies = server["studies"]
    ref = _bundle_mask(server, tmp_path / "ref", studies / f"image_{SUPPORT}.nii.gz",
                       studies / "labels" / "final" / f"image_{SUPPORT}.nii.gz")
    assert mask.any() and not np.array_equal(mask, mask[::-1]), "the check needs a mask a mirror would change"
    np.testing.assert_array_equal(mask, ref)


def test_infer_one_slice_support_on_the_query(server, tmp_path):
    label = nib.load(chaos_dir() / f"label_{QUERY}.nii.gz")
    full = np.asanyarray(label.dataobj)
    k = int(np.argmax((full == 1).sum(axis=(0, 1))))
    drawn = np.zeros_like(full)
    drawn[..., k] = full[..., k]  # the user annotated the liver on one slice of the query
    upload = tmp_path / "drawn.nii.gz"
    nib.save(nib.Nifti1Image(drawn, label.affine, label.header), upload)
    with open(upload, "rb") as f:
        response = _infer(server, {"organ_id": 1}, files={"label": ("drawn.nii.gz", f)})
    mask, img = _returned_mask(response, tmp_path / "m.nii.gz")
    _check_query_grid(img)
    np.testing.assert_array_equal(mask[..., k], (drawn[..., k] == 1).astype(np.uint8))
    ref = _bundle_mask(server, tmp_path / "ref", server["studies"] / f"image_{QUERY}.nii.gz", upload)
    others = [i for i in range(mask.shape[-1]) if i != k]
    np.testing.assert_array_equal(mask[..., others], ref[..., others])
    assert mask[..., others].any()


def test_infer_two_organs_from_two_labelled_studies_matches_bundle(server, tmp_path):
    """k = 2 supports (a datastore study and a file) and two organs by name and id: one label map, equal to the
    bundle's own k-shot, several-organ run on the original files."""
    studies, other = server["studies"], 5
    params = {"support_image": [f"image_{SUPPORT}", str(chaos_dir() / f"image_{other}.nii.gz")],
              "support_label": [f"image_{SUPPORT}", str(chaos_dir() / f"label_{other}.nii.gz")],
              "organ_id": ["liver", 4]}
    response = _infer(server, params)
    mask, img = _returned_mask(response, tmp_path / "m.nii.gz")
    _check_query_grid(img)
    query = studies / f"image_{QUERY}.nii.gz"
    supports = [str(studies / f"image_{SUPPORT}.nii.gz"), str(chaos_dir() / f"image_{other}.nii.gz")]
    labels = [str(studies / "labels" / "final" / f"image_{SUPPORT}.nii.gz"), str(chaos_dir() / f"label_{other}.nii.gz")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--network_type", "no_prior", "--model_dir", str(server["model"]), "--query_image", str(query),
           "--support_image", json.dumps(supports), "--support_label", json.dumps(labels),
           "--organ_id", "[1, 4]", "--output_dir", str(tmp_path / "ref"), "--progress", "false"]
    subprocess.run(cmd, cwd=BUNDLE, check=True, env={**os.environ, **THREADS}, capture_output=True, timeout=600)
    ref = np.asanyarray(nib.load(tmp_path / "ref" / f"image_{QUERY}_seg.nii.gz").dataobj)
    assert set(np.unique(mask)) <= {0, 1, 4} and (mask == 1).any()
    np.testing.assert_array_equal(mask, ref)


@pytest.mark.parametrize(
    "params, upload, message",
    [
        ({}, None, "names no support"),
        ({"support_image": "image_99"}, None, "'image_99': no such study"),
        ({"support_image": f"image_{UNLABELLED}"}, None, "no 'final' label"),
        ({"support_image": f"image_{SUPPORT}", "organ_id": 9}, None, "organ id 9 absent"),
        ({"support_image": f"image_{SUPPORT}", "organ_id": "pancreas"}, None, "neither a label id nor one of the labels"),
        ({"support_image": f"image_{SUPPORT}", "organ_id": 1.5}, None, "organ_id: 1.5 is not a label id"),
        ({}, f"label_{SUPPORT}.nii.gz", "grid"),  # a label drawn on another study's grid
    ],
)
def test_bad_requests_are_http_400_with_one_line(server, params, upload, message):
    if upload:
        with open(chaos_dir() / upload, "rb") as f:
            response = _infer(server, params, files={"label": (upload, f)})
    else:
        response = _infer(server, params)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail


def test_unknown_query_is_http_400(server):
    response = _infer(server, {"support_image": f"image_{SUPPORT}"}, image="image_404")
    assert response.status_code == 400 and "image_404" in response.json()["detail"]


def test_train_from_datastore_then_infer_serves_the_new_model(server, tmp_path):
    model = server["model"] / "model.pt"
    before = torch.load(model, weights_only=True)
    response = requests.post(f"{server['url']}/train/sd_fsmis", params={"run_sync": "true"},
                             json={"max_iterations": 3, "batch_size": 2}, timeout=900)
    assert response.status_code == 200, response.text + server["log"].read_text()[-3000:]
    stats = response.json()
    assert stats["iterations"] == 3 and np.isfinite(stats["loss"])
    assert sorted(stats["studies"]) == [f"image_{n}" for n in (QUERY, SUPPORT, UNLABELLED)]
    # the unlabelled study without cached supervoxels got them computed, on its own grid
    sv = nib.load(server["model"] / "supervoxels" / f"superpix-MIDDLE_{UNLABELLED}.nii.gz")
    assert sv.shape == nib.load(server["studies"] / f"image_{UNLABELLED}.nii.gz").shape
    after = torch.load(model, weights_only=True)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no weight"
    # the infer task now serves the trained weights: again equal to the bundle run on the new model.pt
    mask, img = _returned_mask(_infer(server, {"support_image": f"image_{SUPPORT}"}), tmp_path / "m.nii.gz")
    studies = server["studies"]
    ref = _bundle_mask(server, tmp_path / "ref", studies / f"image_{SUPPORT}.nii.gz",
                       studies / "labels" / "final" / f"image_{SUPPORT}.nii.gz")
    np.testing.assert_array_equal(mask, ref)


def test_the_server_writes_into_its_copy_of_the_app_not_into_the_package(server):
    # MONAI Label creates logs/, model/, bin/ and lib/ in its app folder; an installed package must stay untouched.
    assert set(os.listdir(app_dir())) <= {"main.py", "__pycache__"}
