"""The MONAI bundle ``bundles/sd_fsmis``: its configs run through ``monai.bundle`` on real CHAOS volumes.

Training runs once per module (quick-start override, tiny network, 2 iterations) through the exact
command line the README shows; evaluation, resuming and inference reuse its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from tests.utils import REPO_ROOT, chaos_dir, requires_chaos

BUNDLE = REPO_ROOT / "bundles" / "sd_fsmis"
CONFIGS = BUNDLE / "configs"
TRAIN = str(CONFIGS / "train.json")
QUICK = str(CONFIGS / "quickstart.json")
EVALUATE = str(CONFIGS / "evaluate.json")
INFERENCE = str(CONFIGS / "inference.json")
TINY = {"_target_": "monai_sdfsmis.networks.sdfsmis.SDFSMIS.tiny", "seed": 0}
# Small but real: one CHAOS test fold of volumes 1, 2, 3 (support: volume 3 at position 2; queries: 1, 2; training:
# the 17 others), right kidney only, 128x128 slices.
SMALL = {"folds": [[0, 1, 2]], "organ_ids": [2], "spatial_size": 128, "num_workers": 0, "sw_batch_size": 8}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The package may not be pip-installed in a development checkout; the bundle imports it by name.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _bundle_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` from the bundle folder, as a user types it."""
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=BUNDLE,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-8000:])
    return proc


def _overrides(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", json.dumps(value))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Quick-start training on CHAOS through the CLI: 2 iterations, validation and a checkpoint every iteration."""
    if not (chaos_dir() / "image_1.nii.gz").exists():
        pytest.skip("CHAOS T2-SPIR copy not found (set SDFSMIS_DATA_DIR)")
    out = tmp_path_factory.mktemp("quickstart")
    settings = {**SMALL, "iterations": 2, "val_interval": 2, "ckpt_interval": 1}
    proc = _bundle_cli(
        "run",
        "training",
        "--config_file",
        "['configs/train.json','configs/quickstart.json']",
        "--dataset_dir",
        str(chaos_dir()),
        "--output_dir",
        str(out),
        *_overrides(settings),
    )
    assert proc.returncode == 0, "quick-start training failed"
    return out, proc.stdout + proc.stderr


def test_metadata_follows_the_model_zoo_schema_fields():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["schema"].endswith("/meta_schema_20240725.json")
    assert meta["version"] == "0.1.0" and meta["version"] in meta["changelog"]
    assert meta["monai_version"] == "1.6.1"
    for key in ("pytorch_version", "numpy_version", "task", "description", "authors", "copyright", "intended_use"):
        assert meta[key], key
    required = meta["required_packages_version"]
    for package in ("monai-sdfsmis", "diffusers", "transformers", "nibabel"):
        assert package in required
    assert meta["supported_apps"] == {}
    assert list(meta["network_data_format"]["inputs"]) == ["image", "support_image", "support_label"]
    assert list(meta["network_data_format"]["outputs"]) == ["pred"]
    assert any("SD-FSMIS" in ref for ref in meta["references"])
    large = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    assert [item["path"] for item in large] == ["models/model.pt"]
    assert "NOT YET PUBLISHED" in (BUNDLE / "large_files.yml").read_text()
    assert (BUNDLE / "LICENSE").read_text().startswith((REPO_ROOT / "LICENSE").read_text()[:200])


def test_metadata_validates_against_the_model_zoo_schema_offline(tmp_path):
    from monai.bundle import verify_metadata

    # verify_metadata skips the download when the schema file exists, and validates against it.
    schema = tmp_path / "schema.json"
    schema.write_text((REPO_ROOT / "tests" / "data" / "meta_schema_20240725.json").read_text())
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="num_channels"):
        verify_metadata(meta_file=str(broken), filepath=str(schema))


@requires_chaos
@pytest.mark.parametrize(
    "files, workflow_type, extra",
    [
        ([TRAIN, QUICK], "train", {}),
        ([TRAIN, QUICK, EVALUATE], "eval", {}),
        ([INFERENCE], "infer", {"load_checkpoint": False, "network_def": TINY}),
    ],
    ids=["train", "evaluate", "inference"],
)
def test_check_properties_finds_no_missing_property(files, workflow_type, extra, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=files,
        workflow_type=workflow_type,
        logging_file=False,
        bundle_root=str(BUNDLE),
        dataset_dir=str(chaos_dir()),
        output_dir=str(tmp_path),
        **{**SMALL, **extra},
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_quickstart_evaluates_once_unless_validation_is_asked_for():
    """The quick start's one evaluation is its final table: train.json's ValidationHandler is off by default."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([TRAIN, QUICK]))
    # quickstart.json addresses the handler by its index in train.json's list: it must still be the validator.
    assert parser["train::handlers::1::_target_"] == "ValidationHandler"
    assert parser.get_parsed_content("val_interval") is None
    assert parser.get_parsed_content("train::handlers::1::_disabled_") is True
    parser["val_interval"] = 20  # --val_interval 20 turns validation during training back on
    parser.parse(reset=True)
    assert parser.get_parsed_content("train::handlers::1::_disabled_") is False


def test_quickstart_trains_validates_saves_and_prints_table(trained):
    out, log = trained
    models = out / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == [
        "checkpoint_iteration=1.pt",
        "checkpoint_iteration=2.pt",
        "model.pt",
    ]
    assert not list(models.glob("*.tmp")), "atomic saving left a temporary file"
    # model.pt holds the trained parts only and loads strictly into the same architecture.
    from monai_sdfsmis.networks.sdfsmis import SDFSMIS

    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("vae.") for k in state)
    SDFSMIS.tiny(seed=0).load_state_dict(state, strict=True)
    full = torch.load(models / "checkpoint_iteration=2.pt", map_location="cpu", weights_only=False)
    assert set(full) == {"model", "optimizer", "trainer", "rng"} and full["trainer"]["iteration"] == 2
    assert "val_mean_dice" in log  # ValidationHandler ran the protocol evaluator
    assert "| support-mask copy (fold 0) |" in log and "| SD-FSMIS (fold 0) |" in log
    results = json.loads((out / "evaluation" / "fold_0" / "protocol_results.json").read_text())
    assert set(results["methods"]) == {"support-mask copy", "SD-FSMIS"}
    assert list((out).glob("events.out.tfevents.*")), "TensorBoard logs missing"


def test_evaluate_writes_per_case_metrics_table_and_overlays(trained):
    out, _ = trained
    proc = _bundle_cli(
        "run",
        "--config_file",
        "['configs/train.json','configs/quickstart.json','configs/evaluate.json']",
        "--dataset_dir",
        str(chaos_dir()),
        "--output_dir",
        str(out),
        *_overrides(SMALL),
    )
    assert proc.returncode == 0
    eval_dir = out / "evaluation" / "fold_0"
    results = json.loads((eval_dir / "protocol_results.json").read_text())
    assert results["checkpoint"].endswith("model.pt")
    rows = {m: r["rows"] for m, r in results["methods"].items()}
    assert set(rows) == {"support-mask copy", "SD-FSMIS"}
    for method_rows in rows.values():
        assert sorted(r["query_id"] for r in method_rows) == ["1", "2"]
        assert {r["support_id"] for r in method_rows} == {"3"}
        assert all(r["organ"] == "right_kidney" and 0.0 <= r["dice"] <= 1.0 for r in method_rows)
        assert all(r["hd95"] is None or r["hd95"] >= 0.0 for r in method_rows)
    # The support-mask copy is a deterministic, non-trivial baseline on real data.
    assert np.mean([r["dice"] for r in rows["support-mask copy"]]) > 0.3
    csv_lines = (eval_dir / "protocol_cases.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("method,fold,organ_id,organ,support_id,query_id,dice,hd95,assd")
    assert len(csv_lines) == 1 + 2 * 2
    table = (eval_dir / "protocol_table.md").read_text()
    assert "| Method | RK | Mean |" in table and "HD95 (mm)" in table and "ASSD (mm)" in table
    assert table.strip() in proc.stdout.replace("\r", "")
    for method in ("SD-FSMIS", "support-mask_copy"):
        assert list((eval_dir / "overlays" / method).glob("*.png")), method

    # With aligned supports the bundle adds the copy of the aligned supports; the plain copy row does not move.
    aligned_out = out / "aligned"
    proc = _bundle_cli(
        "run", "--config_file", "['configs/train.json','configs/quickstart.json','configs/evaluate.json']",
        "--dataset_dir", str(chaos_dir()), "--output_dir", str(out), "--eval_dir", str(aligned_out),
        "--support_alignment", "body_box", "--n_overlays", "0", *_overrides(SMALL),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    aligned = json.loads((aligned_out / "protocol_results.json").read_text())
    assert aligned["inference"]["support_alignment"] == "body_box"
    assert list(aligned["methods"]) == ["support-mask copy", "support-mask copy (body_box)", "SD-FSMIS"]
    assert aligned["methods"]["support-mask copy"]["rows"] == results["methods"]["support-mask copy"]["rows"]
    assert aligned["methods"]["support-mask copy (body_box)"]["rows"] != results["methods"]["support-mask copy"]["rows"]


def test_resume_continues_from_the_latest_checkpoint(trained, tmp_path):
    from monai.bundle import ConfigWorkflow

    out, _ = trained
    # An interrupted run: only the iteration-1 checkpoint of a 2-iteration run exists.
    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    shutil.copy(out / "models" / "checkpoint_iteration=1.pt", ckpt_dir)
    workflow = ConfigWorkflow(
        config_file=[TRAIN, QUICK],
        workflow_type="train",
        logging_file=False,
        bundle_root=str(BUNDLE),
        dataset_dir=str(chaos_dir()),
        output_dir=str(tmp_path),
        ckpt_dir=str(ckpt_dir),
        resume=True,
        iterations=2,
        val_interval=100,
        ckpt_interval=1,
        run=["$@train::trainer.run()"],
        **SMALL,
    )
    workflow.initialize()
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train::trainer")
    resume = workflow.parser.get_parsed_content("train::handlers")[0]
    assert resume.loaded_from == ckpt_dir / "checkpoint_iteration=1.pt"
    assert trainer.state.iteration == 2
    assert (ckpt_dir / "checkpoint_iteration=2.pt").is_file() and (ckpt_dir / "model.pt").is_file()
    workflow.finalize()


def _run_inference(tmp_path: Path, **overrides) -> Path:
    from monai.bundle import run

    run(
        config_file=INFERENCE,
        logging_file=False,
        bundle_root=str(BUNDLE),
        dataset_dir=str(chaos_dir()),
        output_dir=str(tmp_path),
        **overrides,
    )
    return tmp_path


def test_inference_writes_nifti_mask_with_the_query_affine(trained, tmp_path):
    out, _ = trained
    query = chaos_dir() / "image_1.nii.gz"
    _run_inference(
        tmp_path,
        network_def=TINY,
        ckpt_path=str(out / "models" / "model.pt"),
        query_image=str(query),
        support_image=str(chaos_dir() / "image_3.nii.gz"),
        support_label=str(chaos_dir() / "label_3.nii.gz"),
        organ_id=2,
        spatial_size=128,
        progress=False,
    )
    written = tmp_path / "image_1_seg.nii.gz"
    assert written.is_file()
    pred, ref = nib.load(str(written)), nib.load(str(query))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-4)
    values = np.asarray(pred.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1}


def test_inference_maps_the_mask_back_to_the_file_orientation(tmp_path):
    """With the support-mask copy and query == support, every predicted slice is a support slice's organ mask.

    CHAOS files are stored LAS and the bundle works in RAS, so a missing or wrong reorientation of the
    written mask would mirror it and break the equality.
    """
    if not (chaos_dir() / "image_3.nii.gz").exists():
        pytest.skip("CHAOS T2-SPIR copy not found (set SDFSMIS_DATA_DIR)")
    volume, labels = chaos_dir() / "image_3.nii.gz", chaos_dir() / "label_3.nii.gz"
    _run_inference(
        tmp_path,
        network_def={"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"},
        load_checkpoint=False,
        query_image=str(volume),
        support_image=str(volume),
        support_label=str(labels),
        organ_id=1,
        progress=False,
    )
    pred = np.asarray(nib.load(str(tmp_path / "image_3_seg.nii.gz")).dataobj)
    organ = np.asarray(nib.load(str(labels)).dataobj) == 1
    support_slices = [organ[..., z] for z in range(organ.shape[-1]) if organ[..., z].any()]
    predicted = [pred[..., z].astype(bool) for z in range(pred.shape[-1]) if pred[..., z].any()]
    assert predicted, "the support-mask copy predicted nothing"
    for mask in predicted:
        assert any(np.array_equal(mask, s) for s in support_slices)


def test_inference_rejects_an_organ_missing_from_the_support_label(tmp_path):
    with pytest.raises(Exception) as info:
        _run_inference(
            tmp_path,
            network_def={"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"},
            load_checkpoint=False,
            query_image=str(chaos_dir() / "image_1.nii.gz"),
            support_image=str(chaos_dir() / "image_3.nii.gz"),
            support_label=str(chaos_dir() / "label_3.nii.gz"),
            organ_id=9,
        )
    text = "".join(str(e) for e in _chain(info.value))
    assert "label_3.nii.gz" in text and "9" in text


def test_training_on_a_missing_dataset_folder_names_it(tmp_path):
    from monai.bundle import run

    missing = tmp_path / "no_such_dataset"
    with pytest.raises(Exception) as info:
        run(
            "training",
            config_file=[TRAIN, QUICK],
            logging_file=False,
            bundle_root=str(BUNDLE),
            dataset_dir=str(missing),
            output_dir=str(tmp_path),
        )
    assert any(isinstance(e, FileNotFoundError) and str(missing) in str(e) for e in _chain(info.value))


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
