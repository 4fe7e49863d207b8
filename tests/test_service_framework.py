"""The service conventions shared by all four services, exercised on a real app built by the factory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from backbone.artifacts import latest_artifact, list_artifacts, load_artifact, save_artifact, verify_artifact
from backbone.service.app import ModelInfo, create_service_app, get_runtime
from backbone.service.config import ServiceSettings
from backbone.service.security import read_upload_limited
from fastapi import APIRouter, Depends, File, UploadFile
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field


@dataclass
class LinearModel:
    """A real (tiny) torch model restored from an artifact directory."""

    info: ModelInfo
    layer: torch.nn.Linear

    def predict(self, xs: list[float]) -> float:
        with torch.no_grad():
            return float(self.layer(torch.tensor(xs).float()).item())


def load_linear(settings: ServiceSettings) -> LinearModel:
    art = latest_artifact(settings.model_dir, "demo", "linear")
    verify_artifact(art)
    layer = torch.nn.Linear(3, 1)
    layer.load_state_dict(art.load_tensors())
    return LinearModel(ModelInfo(name=art.name, version=art.version, path=str(art.path)), layer)


class PredictRequest(BaseModel):
    features: list[float] = Field(min_length=3, max_length=3)


class PredictResponse(BaseModel):
    value: float
    model_version: str


router = APIRouter(prefix="/v1")


@router.post("/predict", response_model=PredictResponse)
def predict(body: PredictRequest, runtime=Depends(get_runtime)) -> PredictResponse:
    model = runtime.require_model()
    return PredictResponse(value=model.predict(body.features), model_version=model.info.version)


class UploadResponse(BaseModel):
    size: int


@router.post("/upload", response_model=UploadResponse)
async def upload(file: UploadFile = File(...), runtime=Depends(get_runtime)) -> UploadResponse:
    data = await read_upload_limited(file, runtime.settings.max_upload_bytes)
    return UploadResponse(size=len(data))


def save_linear(model_dir: Path, seed: int) -> str:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(3, 1)
    art = save_artifact(
        model_dir, "demo", "linear", config={"in": 3}, metrics={"mse": 0.1 * seed}, tensors=layer.state_dict()
    )
    return art.version


def make_app(tmp_path: Path, **overrides) -> TestClient:
    settings = ServiceSettings(
        service_name="demo_service",
        model_dir=tmp_path,
        api_key="secret-key",
        max_upload_mb=0.01,
        **overrides,
    )
    app = create_service_app(
        settings, title="demo", description="test service", load_model=load_linear, routers=[router]
    )
    return TestClient(app)


def test_artifact_layout_and_integrity(tmp_path: Path) -> None:
    data_file = tmp_path / "input.csv"
    data_file.write_text("a,b\n1,2\n")
    art = save_artifact(
        tmp_path, "dom", "net", config={"k": 1}, metrics={"auc": 0.9}, data_files=[data_file],
        tensors={"w": torch.ones(2, 2)}, text_files={"model.txt": "tree"},
    )
    assert art.path.parent == tmp_path / "dom" / "net"
    assert sorted(p.name for p in art.path.iterdir()) == sorted(
        ["weights.safetensors", "model.txt", "config.json", "metrics.json", "manifest.json"]
    )
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["data_fingerprint"] == {
        str(data_file.resolve()): hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    }
    assert manifest["code_version"]
    assert torch.equal(art.load_tensors()["w"], torch.ones(2, 2))
    second = save_artifact(tmp_path, "dom", "net", config={}, metrics={}, tensors={"w": torch.zeros(1)})
    assert [a.version for a in list_artifacts(tmp_path, "dom", "net")] == [art.version, second.version]
    assert latest_artifact(tmp_path, "dom", "net").version == second.version
    loaded = load_artifact(art.path)  # one artifact directory, as `--artifact DIR` options take it
    assert loaded.version == art.version and loaded.config == {"k": 1}
    with pytest.raises(FileNotFoundError, match="not an artifact directory"):
        load_artifact(tmp_path / "dom")
    (second.path / "weights.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        verify_artifact(latest_artifact(tmp_path, "dom", "net"))
    with pytest.raises(FileNotFoundError, match="pipelines.other.train"):
        latest_artifact(tmp_path, "other", "net")


def test_health_ready_predict_metrics(tmp_path: Path) -> None:
    version = save_linear(tmp_path, 1)
    with make_app(tmp_path) as client:
        assert client.get("/health").json() == {"status": "alive", "service": "demo_service"}
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["model"]["version"] == version
        resp = client.post("/v1/predict", json={"features": [1.0, 2.0, 3.0]})
        assert resp.status_code == 200
        assert resp.json()["model_version"] == version
        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        labels = 'method="POST",route="/v1/predict",service="demo_service",status="200"'
        assert "http_requests_total{" + labels + "}" in text
        assert 'http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/predict"' in text
        assert f'model_info{{name="linear",service="demo_service",version="{version}"}} 1.0' in text
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert "/v1/predict" in paths and "/v1/admin/reload" in paths


def test_errors_are_json_with_codes(tmp_path: Path) -> None:
    save_linear(tmp_path, 1)
    with make_app(tmp_path) as client:
        bad = client.post("/v1/predict", json={"features": [1.0]})
        assert bad.status_code == 422
        body = bad.json()
        assert body["error"] == "validation_error"
        assert body["detail"][0]["loc"] == ["body", "features"]
        broken = client.post(
            "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert broken.status_code == 422 and broken.json()["error"] == "validation_error"
        missing = client.get("/v1/nothing-here")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        big = client.post("/v1/upload", files={"file": ("x.bin", b"x" * 20_000)})
        assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
        small = client.post("/v1/upload", files={"file": ("x.bin", b"x" * 100)})
        assert small.status_code == 200 and small.json() == {"size": 100}


def test_reload_requires_key_and_swaps_model(tmp_path: Path) -> None:
    first = save_linear(tmp_path, 1)
    with make_app(tmp_path) as client:
        assert client.post("/v1/admin/reload").status_code == 401
        denied = client.post("/v1/admin/reload", headers={"X-API-Key": "wrong"})
        assert denied.status_code == 403 and denied.json()["error"] == "invalid_api_key"
        second = save_linear(tmp_path, 2)
        before = client.post("/v1/predict", json={"features": [1.0, 2.0, 3.0]}).json()
        resp = client.post("/v1/admin/reload", headers={"X-API-Key": "secret-key"})
        assert resp.status_code == 200
        assert resp.json()["previous"]["version"] == first
        assert resp.json()["current"]["version"] == second
        after = client.post("/v1/predict", json={"features": [1.0, 2.0, 3.0]}).json()
        assert after["model_version"] == second and after["value"] != before["value"]


def test_not_ready_without_model_and_key_unset(tmp_path: Path) -> None:
    settings = ServiceSettings(service_name="empty_service", model_dir=tmp_path)
    app = create_service_app(settings, title="t", description="d", load_model=load_linear, routers=[router])
    with TestClient(app) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert "no artifact" in ready.json()["checks"]["model"]
        resp = client.post("/v1/predict", json={"features": [1.0, 2.0, 3.0]})
        assert resp.status_code == 503 and resp.json()["error"] == "model_not_loaded"
        locked = client.post("/v1/admin/reload", headers={"X-API-Key": "anything"})
        assert locked.status_code == 503 and locked.json()["error"] == "api_key_not_configured"


def test_ready_reports_unreachable_kafka(tmp_path: Path) -> None:
    save_linear(tmp_path, 1)
    settings = ServiceSettings(
        service_name="kafka_service", model_dir=tmp_path, kafka_bootstrap_servers="127.0.0.1:9"
    )
    app = create_service_app(
        settings, title="t", description="d", load_model=load_linear, routers=[router], needs_kafka=True
    )
    with TestClient(app) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["kafka"].startswith("unreachable")
        assert ready.json()["checks"]["model"].startswith("ok")


@pytest.mark.kafka
def test_ready_with_real_kafka(tmp_path: Path, kafka_bootstrap: str) -> None:
    save_linear(tmp_path, 1)
    settings = ServiceSettings(
        service_name="kafka_ok_service", model_dir=tmp_path, kafka_bootstrap_servers=kafka_bootstrap
    )
    app = create_service_app(
        settings, title="t", description="d", load_model=load_linear, routers=[router], needs_kafka=True
    )
    with TestClient(app) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["kafka"] == "ok"
        assert 'kafka_reachable{service="kafka_ok_service"} 1.0' in client.get("/metrics").text
