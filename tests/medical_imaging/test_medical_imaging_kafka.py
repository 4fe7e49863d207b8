"""Kafka: imaging-requests -> diagnosis-reports, failures with reasons to the .dlq (real broker)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from backbone.kafka import read_topic
from fastapi.testclient import TestClient
from kafka import KafkaProducer
from PIL import Image

from services.medical_imaging.app.core.config import Settings
from services.medical_imaging.app.main import create_app

pytestmark = pytest.mark.kafka


def _collect(bootstrap: str, topic: str, want: int, timeout_s: float = 90.0) -> list[dict]:
    return read_topic(bootstrap, topic, want=want, timeout_s=timeout_s)


def test_requests_reports_and_dead_letters(
    kafka_bootstrap: str, kafka_topic, trained_model_dir: Path, data_dir: Path
) -> None:
    requests, reports = kafka_topic("imaging-requests"), kafka_topic("diagnosis-reports")
    settings = Settings(
        model_dir=trained_model_dir,
        data_dir=data_dir,
        kafka_bootstrap_servers=kafka_bootstrap,
        request_topic=requests,
        report_topic=reports,
        kafka_group_id=kafka_topic("g"),
        mc_samples=2,
        tta_views=2,
    )
    with np.load(data_dir / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz") as z:
        img = z["test_images"][2]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    png_b64 = base64.b64encode(buf.getvalue()).decode()
    good = {"request_id": "req-ok", "files": [{"filename": "Doe_Jane.png", "content_base64": png_b64}]}
    by_path = {"request_id": "req-path", "path": "luna16_patches/positive_patch.npy"}
    not_image = {
        "request_id": "req-txt",
        "files": [{"filename": "a.txt", "content_base64": base64.b64encode(b"hi").decode()}],
    }
    traversal = {"request_id": "req-trav", "path": "../../etc/passwd"}
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 200
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        for key, value in (
            ("req-ok", json.dumps(good).encode()),
            ("req-path", json.dumps(by_path).encode()),
            ("bad-json", b"{not json"),
            ("bad-schema", json.dumps({"request_id": ""}).encode()),
            ("req-txt", json.dumps(not_image).encode()),
            ("req-trav", json.dumps(traversal).encode()),
        ):
            producer.send(requests, value, key=key.encode()).get(timeout=30)
        producer.close()
        got = _collect(kafka_bootstrap, reports, 2)
        dead = _collect(kafka_bootstrap, requests + ".dlq", 4)
    by_id = {m["request_id"]: m["report"] for m in got}
    assert set(by_id) == {"req-ok", "req-path"}
    assert by_id["req-ok"]["model"]["key"] == "2d" and by_id["req-ok"]["uncertainty"]["n_samples"] == 4
    assert by_id["req-path"]["model"]["key"] == "3d"
    reasons = {d["key"]: d["error"] for d in dead}
    assert reasons["bad-json"]["reason"] == "decode"
    assert reasons["bad-schema"]["reason"] == "validation"
    assert "unsupported_media_type" in reasons["req-txt"]["message"]
    assert "path_traversal" in reasons["req-trav"]["message"]
