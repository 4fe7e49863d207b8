"""Kafka stream: real CSI 300 ticks -> rolling history per symbol -> forecasts; bad ticks -> DLQ."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from backbone.kafka import read_topic
from fastapi.testclient import TestClient
from kafka import KafkaProducer

from services.forecasting.app.core.config import Settings
from services.forecasting.app.main import create_app

pytestmark = pytest.mark.kafka


def _read(bootstrap: str, topic: str, want: int, timeout_s: float = 60.0) -> list[dict]:
    return read_topic(bootstrap, topic, want=want, timeout_s=timeout_s)


def test_ticks_to_forecasts_and_dlq(
    fc_model_dir: Path, fc_data_dir: Path, kafka_bootstrap: str, kafka_topic: Callable[[str], str]
) -> None:
    ticks_topic, forecasts_topic = kafka_topic("ticks"), kafka_topic("forecasts")
    settings = Settings(
        model_dir=fc_model_dir,
        kafka_bootstrap_servers=kafka_bootstrap,
        ticks_topic=ticks_topic,
        forecasts_topic=forecasts_topic,
        stream_group_id=kafka_topic("group"),
        stream_every_n=5,
        stream_horizon=5,
        log_level="WARNING",
    )
    csi = pd.read_csv(fc_data_dir / "csi300" / "CSI300_daily_2005_2021.csv").iloc[-70:]
    dates = pd.to_datetime(csi["date"], format="%Y/%m/%d")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for d, v in zip(dates, csi["close"], strict=True):
        tick = {"timestamp": d.isoformat(), "symbol": "CSI300", "value": float(v)}
        producer.send(ticks_topic, json.dumps(tick).encode(), key=b"CSI300")
    producer.send(ticks_topic, b"{not json", key=b"CSI300")
    producer.send(ticks_topic, json.dumps({"timestamp": "2021-12-31", "symbol": "CSI300"}).encode())
    stale = {"timestamp": "2020-01-02T00:00:00", "symbol": "CSI300", "value": 4000.0}
    producer.send(ticks_topic, json.dumps(stale).encode(), key=b"CSI300")
    huge = {"timestamp": "2022-01-04T00:00:00", "symbol": "CSI300", "value": 1e300}  # NaN in float32 models
    producer.send(ticks_topic, json.dumps(huge).encode(), key=b"CSI300")
    producer.flush(30)
    producer.close()

    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        forecasts = _read(kafka_bootstrap, forecasts_topic, want=3)
        dead = _read(kafka_bootstrap, f"{ticks_topic}.dlq", want=4)
    assert len(forecasts) == 3, forecasts
    assert [f["ticks_seen"] for f in forecasts] == [60, 65, 70]
    last = forecasts[-1]
    assert last["symbol"] == "CSI300" and last["model"] == "CSI300_h5" and last["horizon"] == 5
    assert pd.Timestamp(last["as_of"]) == dates.iloc[-1]
    close = float(csi["close"].iloc[-1])
    for p in last["forecasts"]:
        assert p["lower"] <= p["point"] <= p["upper"] and abs(p["point"] / close - 1) < 0.2
    assert len(dead) == 4
    text = json.dumps(dead)
    assert "out-of-order" in text and "value" in text and "beyond" in text


def test_a_restarted_service_rebuilds_its_histories_from_the_topic(
    fc_model_dir: Path, fc_data_dir: Path, kafka_bootstrap: str, kafka_topic: Callable[[str], str]
) -> None:
    """The histories live in memory: a restart re-reads the ticks before its first batch (without publishing
    them again), so the next forecast comes after ``stream_every_n`` ticks, not after another lookback."""
    ticks_topic, forecasts_topic = kafka_topic("ticks"), kafka_topic("forecasts")
    settings = Settings(
        model_dir=fc_model_dir, kafka_bootstrap_servers=kafka_bootstrap, ticks_topic=ticks_topic,
        forecasts_topic=forecasts_topic, stream_group_id=kafka_topic("group"), stream_every_n=5,
        stream_horizon=5, log_level="WARNING",
    )  # fmt: skip
    csi = pd.read_csv(fc_data_dir / "csi300" / "CSI300_daily_2005_2021.csv").iloc[-75:]
    dates = pd.to_datetime(csi["date"], format="%Y/%m/%d")
    ticks = [{"timestamp": d.isoformat(), "symbol": "CSI300", "value": float(v)}
             for d, v in zip(dates, csi["close"], strict=True)]  # fmt: skip

    def send(batch: list[dict]) -> None:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        for tick in batch:
            producer.send(ticks_topic, json.dumps(tick).encode(), key=b"CSI300")
        producer.flush(30)
        producer.close()

    send(ticks[:70])
    with TestClient(create_app(settings)):
        first = _read(kafka_bootstrap, forecasts_topic, want=3)
    assert [f["ticks_seen"] for f in first] == [60, 65, 70]
    send(ticks[70:])  # five more ticks while the service is down
    with TestClient(create_app(settings)) as client:
        forecasts = _read(kafka_bootstrap, forecasts_topic, want=4)
        stream = client.app.state.stream.handler
        assert stream.rebuilt_ticks == 70
    assert [f["ticks_seen"] for f in forecasts] == [60, 65, 70, 75]  # 75: the 70 re-read + 5 new
    assert pd.Timestamp(forecasts[-1]["as_of"]) == dates.iloc[-1] and forecasts[-1]["history_length"] == 75
