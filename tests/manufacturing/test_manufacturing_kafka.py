"""Inspections flow to Kafka: every result on the results topic, every failure on the alerts topic."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from backbone.kafka import read_topic
from fastapi.testclient import TestClient
from PIL import Image

from services.manufacturing.app.core.config import Settings
from services.manufacturing.app.main import create_app


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _consume(bootstrap: str, topic: str, n: int, timeout_s: float = 30.0) -> list[dict]:
    return read_topic(bootstrap, topic, want=n, timeout_s=timeout_s)


@pytest.mark.kafka
def test_inspections_published(kafka_bootstrap: str, kafka_topic, trained_model_dir: Path, data_dir: Path,
                               tmp_path: Path) -> None:
    results_topic, alerts_topic = kafka_topic("inspection-results"), kafka_topic("defect-alerts")
    settings = Settings(model_dir=trained_model_dir, lines_dir=str(tmp_path),
                        kafka_bootstrap_servers=kafka_bootstrap, topic_results=results_topic,
                        topic_alerts=alerts_topic, api_key="k")
    neu = sorted((data_dir / "neu_det" / "IMAGES").glob("patches_*.jpg"))
    mt = sorted((data_dir / "magnetic_tile" / "MT_Break" / "Imgs").glob("*.jpg"))[:3]
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").json()["checks"]["kafka"] == "ok"
        # a line of smooth painted panels (shading only); a frame from a faulty camera (pure noise) is
        # far from every patch of it, so it must fail and raise an alert
        yy, xx = np.mgrid[0:160, 0:160]
        panels = [80 + 60 * np.sin((xx * np.cos(a) + yy * np.sin(a)) / 90.0) for a in np.linspace(0, 3, 10)]
        good = [("good", (f"panel{i}.png", _png(p), "image/png")) for i, p in enumerate(panels)]
        r = client.post("/v1/lines", data={"line_id": "panels"}, files=good, headers={"X-API-Key": "k"})
        assert r.status_code == 202, r.text
        for _ in range(600):
            if client.get("/v1/lines/panels").json()["state"] != "building":
                break
            time.sleep(0.1)
        assert client.get("/v1/lines/panels").json()["state"] == "ready"
        noise = np.random.default_rng(0).integers(0, 256, (160, 160))
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in neu[:3] + mt]
        files.append(("files", ("noise.png", _png(noise), "image/png")))
        body = client.post("/v1/inspect", data={"line_id": "panels"}, files=files).json()
        assert body["published"] is True and body["n_images"] == 7
        client.app.state.producer.flush(10)
    got = _consume(kafka_bootstrap, results_topic, 7)
    assert sorted(m["filename"] for m in got) == sorted([p.name for p in neu[:3] + mt] + ["noise.png"])
    assert {m["inspection_id"] for m in got} == {body["inspection_id"]}
    failed = sorted(r["filename"] for r in body["results"] if not r["passed"])
    assert "noise.png" in failed, body["results"]
    alerts = _consume(kafka_bootstrap, alerts_topic, len(failed))
    assert sorted(m["filename"] for m in alerts) == failed and not any(m["passed"] for m in alerts)


@pytest.mark.kafka
def test_an_unpublished_inspection_is_answered_counted_and_backs_off(
    kafka_bootstrap: str, trained_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Kafka refuses the events (here: a topic name it does not accept): the inspection is still answered,
    with ``published: false``, the failure is counted, and later answers stop waiting for Kafka a while."""
    settings = Settings(model_dir=trained_model_dir, lines_dir=str(tmp_path),
                        kafka_bootstrap_servers=kafka_bootstrap, topic_results="not a topic!",
                        publish_backoff_s=60.0)  # fmt: skip
    tile = sorted((data_dir / "magnetic_tile" / "MT_Free" / "Imgs").glob("*.jpg"))[0]
    files = [("files", (tile.name, tile.read_bytes(), "image/jpeg"))]
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/inspect", data={"line_id": "magnetic_tile"}, files=files)
        assert r.status_code == 200 and r.json()["published"] is False and r.json()["n_images"] == 1
        assert client.app.state.publish_wait_after > time.monotonic() + 30  # backing off
        metrics = client.get("/metrics").text
    assert 'manufacturing_publish_failures_total{service="manufacturing"}' in metrics
