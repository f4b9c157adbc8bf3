"""PACS in, PACS out: the MONAI Label app over a real Orthanc (DICOMweb plugin) on 127.0.0.1.

Orthanc holds the CT example series (Debian's ``orthanc`` and ``orthanc-dicomweb``, which ``.ci/run`` installs); the
MONAI Label server (the cached environment of :mod:`monai_sdfsmis.monailabel.environment`) uses it as its datastore
(``--studies http://127.0.0.1:<port>/dicom-web``). A request with ``output=dicom_seg`` must return a DICOM-SEG whose
every frame, placed by its own referenced source slice, equals the NIfTI mask the same request returns with
``output=image`` sampled at that slice's pixels (the DICOM pixel -> patient formula, recomputed here).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.test_dicom_seg import _frames_by_source, _nifti_value_at_frames
from tests.test_monailabel_server import _free_port, _running_server, env_python, make_model_dir  # noqa: F401
from tests.utils import requires_chaos, requires_totalseg, stop_process, totalseg_dir, wait_until_serving

pydicom = pytest.importorskip("pydicom")

pytestmark = [requires_chaos, requires_totalseg, pytest.mark.timeout(1500)]

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORGAN = 5


def _require_orthanc() -> None:
    if ORTHANC.is_file() and DICOMWEB_PLUGIN.is_file():
        return
    message = f"Orthanc with its DICOMweb plugin is not installed ({ORTHANC}, {DICOMWEB_PLUGIN}): apt-get install orthanc orthanc-dicomweb"
    if os.environ.get("CI"):
        pytest.fail(message)  # .ci/run installs them: a missing server must not pass CI as a skip
    pytest.skip(message)


def _pacs_series(folder: Path) -> tuple[str, dict[str, object]]:
    """The example series as a PACS stores it: it is anonymised to empty UIDs, which a PACS refuses, so each copy
    gets one study and one series UID and its file-meta SOP UIDs, and is stored uncompressed. Returns the series UID
    and the datasets by SOP UID."""
    from pydicom.uid import generate_uid

    study, series, datasets = generate_uid(), generate_uid(), {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(path))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.PatientID = "SDFSMIS-TEST"
        # The files are JPEG 2000, which this Orthanc (DCMTK) cannot transcode for a WADO-RS answer: store them
        # uncompressed, the same pixels.
        ds.decompress()
        datasets[str(ds.SOPInstanceUID)] = ds
    return series, datasets


@contextlib.contextmanager
def _orthanc(root: Path):
    """Orthanc on 127.0.0.1 with the DICOMweb plugin, holding the CT example series; stopped by its PID on exit."""
    _require_orthanc()
    port = _free_port()
    config = {
        "Name": "sdfsmis-test", "HttpPort": port, "DicomPort": _free_port(), "HttpBindAddress": "127.0.0.1",
        "StorageDirectory": str(root / "orthanc-db"), "IndexDirectory": str(root / "orthanc-db"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomServerEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([str(ORTHANC), str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url + "/system", root / "orthanc.log", "Orthanc", 60)
        series, datasets = _pacs_series(totalseg_dir() / "ct_dicom")
        for ds in datasets.values():
            buffer = io.BytesIO()
            ds.save_as(buffer)
            stored = requests.post(url + "/instances", data=buffer.getvalue(), timeout=30)
            assert stored.status_code == 200, stored.text
        yield url, series, datasets
    finally:
        stop_process(proc)
        log.close()


def test_a_query_series_from_orthanc_comes_back_as_dicom_seg_on_its_own_slices(env_python, tmp_path, monkeypatch):  # noqa: F811
    cache = tmp_path / "dicomweb-cache"  # MONAI Label's copy of the fetched series (default: under ~/.cache)
    monkeypatch.setenv("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(cache))
    with _orthanc(tmp_path) as (orthanc, series, sources):
        model = make_model_dir(tmp_path / "model")
        data = totalseg_dir()
        params = {
            "organ_id": ORGAN, "support_image": str(data / "example_ct_sm.nii.gz"),
            "support_label": str(data / "example_seg.nii.gz"), "label_info": [{"name": "organ 5"}],
        }
        with _running_server(env_python, tmp_path, orthanc + "/dicom-web", model) as server:
            def infer(output: str) -> requests.Response:
                return requests.post(
                    f"{server['url']}/infer/sd_fsmis", params={"image": series, "output": output},
                    data={"params": json.dumps(params)}, timeout=900,
                )

            as_image = infer("image")
            assert as_image.status_code == 200, as_image.text[-2000:]
            (tmp_path / "mask.nii.gz").write_bytes(as_image.content)
            as_seg = infer("dicom_seg")
            assert as_seg.status_code == 200, as_seg.text[-2000:]
            (tmp_path / "mask_seg.dcm").write_bytes(as_seg.content)
    # The server fetched the series from Orthanc (its DICOMweb cache holds it), and no dcmqi download was tried: the app handed MONAI Label the environment's own dcmqi tool.
    fetched = list(cache.glob(f"*/{series}/*.dcm"))  # <cache>/<hash of the DICOMweb URL>/<series>/<instance>.dcm
    assert len(fetched) == len(sources)
    tool = tmp_path / "app" / "bin" / "itkimage2segimage"
    assert tool.is_symlink() and tool.resolve() == (Path(env_python).parent / "itkimage2segimage").resolve()

    expected = _nifti_value_at_frames(tmp_path / "mask.nii.gz", sources)
    assert sum(int(v.sum()) for v in expected.values()) > 0, "the check needs a non-empty mask (seed 0 gives one)"
    seg = pydicom.dcmread(str(tmp_path / "mask_seg.dcm"))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    frames = _frames_by_source(tmp_path / "mask_seg.dcm")
    assert set(frames) <= set(sources)
    for uid, mask in expected.items():
        if uid in frames:
            np.testing.assert_array_equal(frames[uid], mask, err_msg=f"frame of slice {uid}")
        else:
            assert not mask.any(), f"slice {uid} has foreground but no frame"
    shutil.rmtree(tmp_path / "orthanc-db", ignore_errors=True)
