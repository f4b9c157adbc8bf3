"""The model-zoo door, end to end on a loopback server: package the bundle, download it as a zoo user does, fetch
its weights, ``monai.bundle.load`` it and run it, with no Stable Diffusion weights anywhere.

A tiny weight-free (no-prior) model is built in the on-disk form training writes (``model.pt``, ``model_config.json``,
``autoencoder/``) and hosted, with the zip, by an ``http.server`` on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from monai_sdfsmis import zoo
from monai_sdfsmis.__main__ import main
from tests.test_bundle import BUNDLE, SMALL, _env
from tests.utils import REPO_ROOT, chaos_dir, requires_chaos

SCHEMA = REPO_ROOT / "tests" / "data" / "meta_schema_20240725.json"
VERSION = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
WEIGHT_FILES = [
    "models/autoencoder/calibration.json",
    "models/autoencoder/config.json",
    "models/autoencoder/diffusion_pytorch_model.safetensors",
    "models/model.pt",
    "models/model_config.json",
]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files; ``/truncated/<path>`` announces the whole file but sends half of it and hangs up."""

    def log_message(self, *args) -> None:  # keep the test output readable
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/truncated/"):
            data = (Path(self.directory) / self.path[len("/truncated/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


def _build_no_prior_model(folder: Path) -> None:
    """A random tiny no-prior model saved as the bundle's training saves one."""
    from monai_sdfsmis.engines.autoencoder import freeze_and_calibrate
    from monai_sdfsmis.engines.model_folder import write_model_config
    from monai_sdfsmis.networks.autoencoder import build_autoencoder, save_autoencoder
    from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis

    torch.manual_seed(0)
    vae = build_autoencoder("tiny", sample_size=64)
    freeze_and_calibrate(vae, torch.rand(4, 3, 64, 64) * 2 - 1)
    save_autoencoder(vae, folder / "autoencoder")
    net = build_no_prior_sdfsmis(folder / "autoencoder", unet_channels="tiny", seed=0)
    torch.save(net.state_dict(), folder / "model.pt")
    write_model_config(folder, net, "no_prior", spatial_size=64)
    # a resumable training state, which is not a release weight
    (folder / "checkpoint_iteration=1.pt").write_bytes(b"optimizer and trainer state")


def _subprocess_env(tmp: Path) -> dict[str, str]:
    env = _env()
    env.update(HF_HOME=str(tmp / "empty_hf_home"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    env.update(OMP_NUM_THREADS="1", SDFSMIS_NUM_THREADS="1")  # the same threads, the same float sums, as in-process
    return env


@pytest.fixture(scope="module")
def zoo_site(tmp_path_factory):
    """Package with the command line, serve, download with ``monai.bundle download``, fetch the large files."""
    tmp = tmp_path_factory.mktemp("zoo")
    # The bundle as a user has it after training: weights in models/, outputs in eval/, their data in data/.
    source = tmp / "checkout" / "sd_fsmis"
    shutil.copytree(BUNDLE, source)
    _build_no_prior_model(source / "models")
    for folder in ("eval", "data"):
        (source / folder).mkdir(exist_ok=True)
        (source / folder / "image_1_seg.nii.gz").write_bytes(b"a user's file")
    site = tmp / "site"
    weights = site / "weights"
    shutil.copytree(source / "models", weights)  # what is uploaded to the base URL
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code = main([
            "package", "--bundle_dir", str(source), "--output_dir", str(site),
            "--weights_dir", str(source / "models"), "--base_url", f"{url}/weights", "--schema", str(SCHEMA),
        ])
        assert code == 0
        zip_path = site / f"sd_fsmis_v{VERSION}.zip"
        downloads = tmp / "downloads"
        proc = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "download", "--name", "sd_fsmis",
             "--url", f"{url}/{zip_path.name}", "--bundle_dir", str(downloads)],
            env=_subprocess_env(tmp), capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        bundle = downloads / "sd_fsmis"
        from monai.bundle import download_large_files

        download_large_files(bundle_path=str(bundle))  # MONAI's own, as the zoo documents it
        yield {"url": url, "site": site, "weights": weights, "zip": zip_path, "bundle": bundle, "tmp": tmp,
               "source": source}
    finally:
        server.shutdown()
        server.server_close()


def test_zip_holds_one_bundle_folder_without_weights_or_outputs(zoo_site):
    names = zipfile.ZipFile(zoo_site["zip"]).namelist()
    expected = {"sd_fsmis/LICENSE", "sd_fsmis/large_files.yml"}
    for sub in ("configs", "docs"):
        expected |= {f"sd_fsmis/{sub}/{p.name}" for p in (zoo_site["source"] / sub).iterdir() if p.is_file()}
    assert set(names) == expected and len(names) == len(expected)
    assert not any(n.startswith(("sd_fsmis/models", "sd_fsmis/eval")) or n.endswith(".pt") for n in names)
    # every packaged file but the generated large-file list is the bundle's own, byte for byte
    with zipfile.ZipFile(zoo_site["zip"]) as archive:
        for name in expected - {"sd_fsmis/large_files.yml"}:
            assert archive.read(name) == (zoo_site["source"] / name.removeprefix("sd_fsmis/")).read_bytes(), name
    # the downloaded copy is the zip's content plus the fetched weights
    downloaded = {p.relative_to(zoo_site["bundle"]).as_posix() for p in zoo_site["bundle"].rglob("*") if p.is_file()}
    assert downloaded == {n.removeprefix("sd_fsmis/") for n in names} | set(WEIGHT_FILES)


def test_large_files_list_every_weight_with_its_url_and_hash(zoo_site):
    listing = yaml.safe_load((zoo_site["bundle"] / "large_files.yml").read_text())["large_files"]
    assert [item["path"] for item in listing] == WEIGHT_FILES  # no checkpoint_iteration=1.pt
    for item in listing:
        hosted = zoo_site["weights"] / item["path"].removeprefix("models/")
        assert item["url"] == f"{zoo_site['url']}/weights/{item['path'].removeprefix('models/')}"
        assert item["hash_type"] == "sha256"
        assert item["hash_val"] == hashlib.sha256(hosted.read_bytes()).hexdigest()
        assert (zoo_site["bundle"] / item["path"]).read_bytes() == hosted.read_bytes()
    # the packaged bundle keeps its own placeholder list: packaging never writes into it
    assert (zoo_site["source"] / "large_files.yml").read_bytes() == (BUNDLE / "large_files.yml").read_bytes()


def test_package_refuses_to_overwrite_and_is_reproducible(zoo_site, capsys):
    before = zoo_site["zip"].read_bytes()
    args = ["package", "--bundle_dir", str(zoo_site["source"]), "--output_dir", str(zoo_site["site"]),
            "--weights_dir", str(zoo_site["source"] / "models"), "--base_url", f"{zoo_site['url']}/weights"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(zoo_site["zip"]) in err[0] and "--overwrite" in err[0]
    assert zoo_site["zip"].read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
    assert zoo_site["zip"].read_bytes() == before  # same inputs, same bytes: the published hash stays valid
    assert not [p for p in zoo_site["site"].iterdir() if p.name.startswith(".")], "a temporary file was left"


def test_package_names_a_bad_bundle_and_writes_nothing(tmp_path, capsys):
    bundle = tmp_path / "sd_fsmis"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval"))
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = "9.9.9"  # no changelog entry
    meta_file.write_text(json.dumps(meta))
    out = tmp_path / "dist"
    assert main(["package", "--bundle_dir", str(bundle), "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(meta_file) in err[0] and "changelog" in err[0]

    meta["version"] = VERSION
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    meta_file.write_text(json.dumps(meta))
    assert main(["package", "--bundle_dir", str(bundle), "--output_dir", str(out), "--schema", str(SCHEMA)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(meta_file) in err[0] and "num_channels" in err[0]

    with pytest.raises(FileNotFoundError, match="model.pt"):
        zoo.package_bundle(bundle, out, weights_dir=tmp_path, base_url="http://127.0.0.1:1/w")
    assert not out.exists() or not list(out.iterdir())


def test_package_without_weights_ships_the_bundles_own_list_and_warns_it_is_unverifiable(tmp_path):
    with pytest.warns(UserWarning, match="no hash_val for models/model.pt"):
        zip_path = zoo.package_bundle(BUNDLE, tmp_path, log=None)
    assert zip_path.name == f"sd_fsmis_v{VERSION}.zip"
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.read("sd_fsmis/large_files.yml") == (BUNDLE / "large_files.yml").read_bytes()


def test_a_large_file_path_out_of_the_bundle_is_refused(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    entry = {"path": "../outside.pt", "url": "http://127.0.0.1:1/x.pt", "hash_val": "", "hash_type": "sha256"}
    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
    with pytest.raises(ValueError, match="must stay inside the bundle"):
        zoo.download_large_files(bundle)
    assert not (tmp_path / "outside.pt").exists()


def _listing(bundle: Path, url: str, hash_val: str) -> None:
    bundle.mkdir()
    entry = {"path": "models/model.pt", "url": url, "hash_val": hash_val, "hash_type": "sha256"}
    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))


def test_a_wrong_hash_and_a_truncated_file_are_named_and_nothing_is_written(zoo_site, tmp_path):
    model = zoo_site["weights"] / "model.pt"
    good = hashlib.sha256(model.read_bytes()).hexdigest()
    short = zoo_site["site"] / "short"
    short.mkdir(exist_ok=True)
    (short / "model.pt").write_bytes(model.read_bytes()[:1000])  # a hosted file cut short
    cases = {
        "wrong_hash": (f"{zoo_site['url']}/weights/model.pt", "0" * 64, "sha256 mismatch"),
        "truncated_file": (f"{zoo_site['url']}/short/model.pt", good, "sha256 mismatch"),
        "truncated_transfer": (f"{zoo_site['url']}/truncated/weights/model.pt", good, "transfer truncated"),
        "missing": (f"{zoo_site['url']}/weights/no_such.pt", good, "HTTP 404"),
    }
    for case, (url, hash_val, problem) in cases.items():
        bundle = tmp_path / case
        _listing(bundle, url, hash_val)
        with pytest.raises(ValueError) as info:
            zoo.download_large_files(bundle)
        message = str(info.value)
        assert "\n" not in message and problem in message, case
        assert str(bundle / "large_files.yml") in message and "models/model.pt" in message and url in message, case
        assert not (bundle / "models" / "model.pt").exists(), f"{case}: a partial file was written"
    size = model.stat().st_size
    assert f"got only {size // 2} out of {size} bytes" in _message(tmp_path / "truncated_transfer")
    # MONAI's own downloader refuses the wrong hash too (its message names the URL and the expected hash)
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    with pytest.raises(HashCheckError, match="0" * 64):
        download_large_files(bundle_path=str(tmp_path / "wrong_hash"))


def _message(bundle: Path) -> str:
    try:
        zoo.download_large_files(bundle)
    except ValueError as err:
        return str(err)
    raise AssertionError(f"{bundle}: no error")


@pytest.mark.parametrize(
    "workflow_type, net_override",
    [
        # inference.json builds the network its model folder's model_config.json names
        ("inference", {}),
        # train.json builds the network it is told to: the weight-free one, with the saved settings
        ("train", {"network_type": "no_prior", "saved_settings": True}),
    ],
)
def test_monai_load_builds_the_weight_free_network_of_the_downloaded_bundle(
    zoo_site, monkeypatch, workflow_type, net_override
):
    from monai.bundle import load

    monkeypatch.setenv("SDFSMIS_NUM_THREADS", "1")
    monkeypatch.chdir(zoo_site["tmp"])  # not the bundle: its models/ folder is found through net_override only
    bundle = zoo_site["bundle"]
    net = load(
        name="sd_fsmis", bundle_dir=str(bundle.parent), workflow_type=workflow_type, device="cpu",
        net_override={**net_override, "model_dir": str(bundle / "models")},
    )
    assert net.vtct.image_encoder is None  # the no-prior network: no DINOv2, no SD
    hosted = torch.load(zoo_site["weights"] / "model.pt", map_location="cpu", weights_only=True)
    state = net.state_dict()
    assert set(state) == set(hosted)
    assert all(torch.equal(state[k], hosted[k]) for k in hosted)  # every weight, not only those of matching shape


@requires_chaos
def test_run_from_the_downloaded_copy_writes_the_same_mask_as_the_hosted_model(zoo_site, tmp_path, monkeypatch):
    query = chaos_dir() / "image_1.nii.gz"
    inputs = {
        "query_image": str(query), "support_image": str(chaos_dir() / "image_3.nii.gz"),
        "support_label": str(chaos_dir() / "label_3.nii.gz"), "organ_id": 2, "progress": False,
    }
    out = tmp_path / "downloaded_run"
    args = [item for key, value in {**inputs, "output_dir": str(out)}.items() for item in (f"--{key}", str(value))]
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *args],
        cwd=zoo_site["bundle"], env=_subprocess_env(zoo_site["tmp"]), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred_file = out / "image_1_seg.nii.gz"
    pred, ref = nib.load(str(pred_file)), nib.load(str(query))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    values = np.asarray(pred.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) == {0, 1}

    # the reference: the repository's bundle with the model folder as it was hosted
    from monai.bundle import run

    monkeypatch.setenv("SDFSMIS_NUM_THREADS", "1")
    reference = tmp_path / "reference_run"
    run(
        config_file=str(BUNDLE / "configs" / "inference.json"), logging_file=False, bundle_root=str(BUNDLE),
        model_dir=str(zoo_site["weights"]), output_dir=str(reference), **inputs,
    )
    expected = np.asarray(nib.load(str(reference / "image_1_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(values, expected)


def test_downloaded_metadata_validates_against_the_local_schema(zoo_site, tmp_path):
    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)  # an existing file: verify_metadata does not download
    verify_metadata(meta_file=str(zoo_site["bundle"] / "configs" / "metadata.json"), filepath=str(schema))
    # MONAI's own fetch of the schema URL, served from the loopback site, with its md5 checked
    shutil.copy(SCHEMA, zoo_site["site"] / SCHEMA.name)
    meta = json.loads((zoo_site["bundle"] / "configs" / "metadata.json").read_text())
    meta["schema"] = f"{zoo_site['url']}/{SCHEMA.name}"
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    fetched = tmp_path / "fetched" / "schema.json"
    md5 = hashlib.md5(SCHEMA.read_bytes()).hexdigest()
    verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(fetched), hash_val=md5, hash_type="md5")
    assert fetched.read_bytes() == SCHEMA.read_bytes()


@requires_chaos
def test_every_workflow_of_the_downloaded_copy_has_its_properties(zoo_site, tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow

    monkeypatch.setenv("SDFSMIS_NUM_THREADS", "1")
    configs = zoo_site["bundle"] / "configs"
    # Without SD weights, training is checked with the weight-free network; evaluation and inference build the
    # network the downloaded model_config.json names.
    workflows = {
        "train": (["train.json", "no_prior.json"], {"unet_width": "tiny"}),
        # the model folder's own resolution (SMALL's 128 would be refused: the folder says 64)
        "eval": (["train.json", "evaluate.json"], {"spatial_size": None}),
        "infer": (["inference.json"], {"spatial_size": None}),
    }
    for name, (files, extra) in workflows.items():
        workflow = ConfigWorkflow(
            config_file=[str(configs / f) for f in files],
            workflow_type=name,
            logging_file=False,
            bundle_root=str(zoo_site["bundle"]),
            dataset_dir=str(chaos_dir()),
            output_dir=str(tmp_path / name),
            **{**SMALL, **extra},
        )
        workflow.initialize()
        assert workflow.check_properties() == [], name
