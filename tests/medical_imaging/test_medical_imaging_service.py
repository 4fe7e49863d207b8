"""The REST service end to end (TestClient with lifespan) on real studies and bad inputs."""

from __future__ import annotations

import base64
import io
import logging
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from services.medical_imaging.app.core.config import Settings
from services.medical_imaging.app.main import create_app

PATIENT_NAME = "Doe^Janet"
PATIENT_ID = "MRN-77889911"


@pytest.fixture(scope="module")
def client(trained_model_dir: Path, data_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_dir=trained_model_dir, data_dir=data_dir, mc_samples=3, tta_views=2, log_level="DEBUG"
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def cxr_png(data_dir: Path) -> bytes:
    with np.load(data_dir / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz") as z:
        img = z["test_images"][1]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ct_files(data_dir: Path) -> list[tuple[str, bytes]]:
    return [
        (p.name, p.read_bytes()) for p in sorted((data_dir / "ct_examples" / "example_ct_dicom").iterdir())
    ]


def _post(client: TestClient, url: str, files: list[tuple[str, bytes]], **data: str):
    return client.post(
        url, files=[("files", (n, b, "application/octet-stream")) for n, b in files], data=data
    )


def _check_report(r: dict, dims: int) -> None:
    assert r["model"]["key"] == f"{dims}d" and r["input"]["dims"] == dims
    u = r["uncertainty"]
    assert u["n_samples"] == 6  # 3 MC passes x 2 TTA views
    assert u["interval_95"][0] <= u["mean"] <= u["interval_95"][1]
    assert 0.0 <= u["predictive_entropy"] <= 1.0 and u["std"] >= 0
    assert r["finding"]["probability"] == pytest.approx(u["mean"])
    assert sum(r["finding"]["class_probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert isinstance(r["needs_review"], bool) and r["model"]["version"]
    # the 2-D fixture is a 2-member deep ensemble, the 3-D one a single network
    assert ("deep ensemble of 2" in u["method"]) == (dims == 2)


def test_ready_and_models(client: TestClient) -> None:
    assert client.get("/ready").status_code == 200
    models = client.get("/v1/models").json()["models"]
    assert {m["key"] for m in models} == {"2d", "3d"}
    three = next(m for m in models if m["key"] == "3d")
    assert "mask" in three["trained_on"]  # honest about what the 3-D model saw


def test_diagnose_chest_xray_png_with_saliency(client: TestClient, cxr_png: bytes) -> None:
    r = _post(client, "/v1/diagnose", [("cxr.png", cxr_png)], saliency="true")
    assert r.status_code == 200, r.text
    rep = r.json()
    _check_report(rep, 2)
    assert rep["input"]["size"] == [28, 28] and rep["finding"]["label"] in ("normal", "pneumonia")
    png = base64.b64decode(rep["saliency_png_base64"])
    assert Image.open(io.BytesIO(png)).size == (256, 256)


def test_same_study_same_report(client: TestClient, cxr_png: bytes, trained_model_dir: Path) -> None:
    """MC-dropout masks are seeded from the study, so a resent study gets identical numbers, and the
    pipelines' evaluation (``served_probabilities``) reproduces the service's probability exactly."""
    from backbone.artifacts import latest_artifact

    from services.medical_imaging.app.networks import load_network
    from services.medical_imaging.app.uncertainty import served_probabilities

    first, second = (_post(client, "/v1/diagnose", [("cxr.png", cxr_png)]).json() for _ in range(2))
    assert first["uncertainty"] == second["uncertainty"] and first["report_id"] != second["report_id"]
    assert first["finding"] == second["finding"] and first["uncertainty"]["std"] > 0
    art = latest_artifact(trained_model_dir, "medical_imaging", "pneumoniamnist")
    x = np.asarray(Image.open(io.BytesIO(cxr_png)), dtype=np.float32)[None, None] / 255.0
    served = served_probabilities(load_network(art), x, art.config["temperature"], 3, 2)
    assert served[0, 1] == pytest.approx(first["finding"]["probability"], abs=1e-6)


def test_without_uncertainty_single_pass(client: TestClient, cxr_png: bytes) -> None:
    rep = _post(client, "/v1/diagnose", [("cxr.png", cxr_png)], uncertainty="false").json()
    assert rep["uncertainty"] is None and rep["warnings"]


def test_diagnose_ct_series_multipart_routes_to_3d_and_flags_domain(client: TestClient, ct_files) -> None:
    r = _post(client, "/v1/diagnose", ct_files, roi_center="10,256,256", roi_size_mm="80")
    assert r.status_code == 200, r.text
    rep = r.json()
    _check_report(rep, 3)
    assert rep["input"]["modality"] == "CT" and rep["input"]["size"] == [20, 512, 512]
    assert rep["input"]["spacing_mm"] == pytest.approx([2.0, 0.9766, 0.9766], abs=1e-3)
    assert rep["needs_review"] and any("out of domain" in s for s in rep["review_reasons"])
    assert any("crop" in s for s in rep["preprocessing"])


def test_dicom_sr_reads_back_and_references_the_study(client: TestClient, data_dir: Path) -> None:
    files = [
        (p.name, p.read_bytes())
        for p in sorted((data_dir / "dicom_fixtures" / "series_CT5N_16x16").iterdir())
    ]
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        for n, b in files:
            zf.writestr(n, b)
    rep = _post(client, "/v1/diagnose", [("s.zip", zipped.getvalue())], dicom_sr="true").json()
    sr = pydicom.dcmread(io.BytesIO(base64.b64decode(rep["dicom_sr_base64"])))
    src = pydicom.dcmread(io.BytesIO(files[0][1]))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == src.StudyInstanceUID
    evidence = {
        item.SeriesInstanceUID
        for item in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert src.SeriesInstanceUID in evidence
    texts = [getattr(i, "TextValue", "") for i in sr.ContentSequence]
    assert any(rep["model"]["version"] in t for t in texts)
    probs = [
        float(i.MeasuredValueSequence[0].NumericValue)
        for i in sr.ContentSequence
        if "MeasuredValueSequence" in i
    ]
    assert probs[0] == pytest.approx(rep["finding"]["probability"], abs=1e-3)


def test_nifti_and_npy(client: TestClient, data_dir: Path) -> None:
    nii = data_dir / "ct_examples" / "example_ct.nii.gz"
    rep = _post(client, "/v1/diagnose", [(nii.name, nii.read_bytes())]).json()
    _check_report(rep, 3)
    assert rep["input"]["format"] == "nifti" and rep["input"]["spacing_mm"] == [3.0, 3.0, 3.0]
    npy = data_dir / "luna16_patches" / "positive_patch.npy"
    rep = _post(client, "/v1/diagnose", [(npy.name, npy.read_bytes())]).json()
    _check_report(rep, 3)


def test_bad_inputs_are_clear_4xx(client: TestClient, data_dir: Path, cxr_png: bytes) -> None:
    fx = data_dir / "dicom_fixtures"
    cases = [
        ([("notes.txt", b"hello")], 415, "unsupported_media_type"),
        ([("JPEG-lossy.dcm", (fx / "JPEG-lossy.dcm").read_bytes())], 415, "unsupported_transfer_syntax"),
        ([("liver.dcm", (fx / "liver_1frame.dcm").read_bytes())], 422, "not_an_image"),
        (
            [(p.name, p.read_bytes()) for p in sorted((fx / "series_CT2_16x16").iterdir())]
            + [(p.name, p.read_bytes()) for p in sorted((fx / "series_CT5N_16x16").iterdir())],
            422,
            "mixed_series",
        ),
    ]
    bad_zip = io.BytesIO()
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("../../etc/cron.d/x", b"x")
    cases.append(([("evil.zip", bad_zip.getvalue())], 400, "zip_path_traversal"))
    for files, status, code in cases:
        r = _post(client, "/v1/diagnose", files)
        assert r.status_code == status, (code, r.text)
        assert r.json()["error"] == code and r.json()["detail"]
    r = _post(client, "/v1/diagnose", [("cxr.png", cxr_png)], model="3d")
    assert r.status_code == 422 and r.json()["error"] == "wrong_dimensions"
    r = _post(client, "/v1/diagnose", [("cxr.png", cxr_png)], roi_center="1,2")
    assert r.status_code == 422
    r = _post(client, "/v1/diagnose", [("cxr.png", cxr_png)], mc_samples="1000")
    assert r.status_code == 422
    assert client.post("/v1/diagnose").status_code == 422  # no file at all


def test_oversize_upload_413(trained_model_dir: Path, cxr_png: bytes) -> None:
    with TestClient(create_app(Settings(model_dir=trained_model_dir, max_upload_mb=0.001))) as c:
        r = c.post("/v1/diagnose", files=[("files", ("big.npy", b"\x00" * 5000, "application/octet-stream"))])
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_async_study_job(client: TestClient, ct_files) -> None:
    r = _post(client, "/v1/studies", ct_files)
    assert r.status_code == 202
    job = r.json()
    assert job["status"] in ("queued", "running")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = client.get(job["status_url"]).json()
        if state["status"] in ("done", "failed"):
            break
        time.sleep(0.2)
    assert state["status"] == "done", state
    _check_report(state["report"], 3)
    failed = _post(client, "/v1/studies", [("notes.txt", b"nope")]).json()
    for _ in range(100):
        state = client.get(failed["status_url"]).json()
        if state["status"] == "failed":
            break
        time.sleep(0.05)
    assert state["status"] == "failed" and state["error"]["error"] == "unsupported_media_type"
    assert client.get("/v1/studies/does-not-exist").status_code == 404


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(repr(record.__dict__) + record.getMessage())


def test_patient_identifiers_never_reach_logs(client: TestClient, data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "dicom_fixtures" / "CT_small.dcm")
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    buf = io.BytesIO()
    ds.save_as(buf)
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        fname = f"{PATIENT_NAME}_{PATIENT_ID}.dcm"
        ok = _post(client, "/v1/diagnose", [(fname, buf.getvalue())], dicom_sr="true")
        assert ok.status_code == 200, ok.text
        bad = _post(client, "/v1/diagnose", [(fname, buf.getvalue()[:400])])
        assert bad.status_code == 422
    finally:
        root.removeHandler(handler)
    logs = "\n".join(handler.records)
    assert "study diagnosed" in logs and ok.json()["study_anon_id"] in logs  # anonymous ids are logged
    for secret in ("Doe", "Janet", PATIENT_ID, str(ds.StudyInstanceUID)):
        assert secret not in logs
    assert PATIENT_ID not in ok.text  # nor in the JSON report (the SR carries the patient module, as it must)
