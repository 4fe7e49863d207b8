"""The forecasting service over FastAPI's TestClient with real tiny models and real ETT / CSI 300 data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from services.forecasting.app.core.config import Settings
from services.forecasting.app.main import create_app


@pytest.fixture(scope="module")
def client(fc_model_dir: Path) -> Iterator[TestClient]:
    app = create_app(Settings(model_dir=fc_model_dir, kafka_bootstrap_servers=None, log_level="WARNING"))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def etth1(fc_data_dir: Path) -> pd.DataFrame:
    return pd.read_csv(fc_data_dir / "ett" / "ETTh1.csv")


def body(df: pd.DataFrame, cols: list[str], **extra: object) -> dict[str, object]:
    return {
        "timestamps": df["date"].astype(str).tolist(),
        "series": {c: [None if pd.isna(v) else v for v in df[c]] for c in cols},
        **extra,
    }


def test_ready_and_models(client: TestClient) -> None:
    assert client.get("/ready").status_code == 200
    r = client.get("/v1/models")
    assert r.status_code == 200
    names = {m["name"]: m for m in r.json()["models"]}
    assert r.json()["default"] == "ETTh1_h96" and {"ETTh1_h96", "CSI300_h5"} <= set(names)
    assert names["ETTh1_h96"]["max_horizon"] == 96 and "mse" in names["ETTh1_h96"]["metrics"]["test"]


def test_forecast_real_window(client: TestClient, etth1: pd.DataFrame) -> None:
    window = etth1.iloc[11520 - 200 : 11520]
    truth = etth1.iloc[11520 : 11520 + 48]
    r = client.post(
        "/v1/forecast", json=body(window, list(etth1.columns[1:]), horizon=48, quantiles=[0.1, 0.5, 0.9])
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (
        pd.Timestamp(out["timestamps"][0]) == pd.Timestamp(truth["date"].iloc[0])
        and len(out["timestamps"]) == 48
    )
    assert set(out["forecasts"]) == set(etth1.columns[1:])
    ot = out["forecasts"]["OT"]
    point, lo, hi = np.array(ot["point"]), np.array(ot["lower"]), np.array(ot["upper"])
    assert point.shape == (48,) and np.all(lo <= point) and np.all(point <= hi)
    q = np.array([ot["quantiles"][k] for k in ("0.1", "0.5", "0.9")])
    assert np.all(np.diff(q, axis=0) >= 0)
    # a real forecast: closer to the truth than a constant far from the data, in the data's units
    assert np.mean(np.abs(point - truth["OT"].to_numpy())) < 3 * truth["OT"].std() + 1.0
    assert out["preprocessing"]["nan_filled"] == 0 and out["preprocessing"]["freq"] == "0 days 01:00:00"


def test_forecast_any_scale_univariate(client: TestClient, fc_data_dir: Path) -> None:
    csi = pd.read_csv(fc_data_dir / "csi300" / "CSI300_daily_2005_2021.csv").iloc[-120:]
    csi["date"] = pd.to_datetime(csi["date"], format="%Y/%m/%d").dt.strftime("%Y-%m-%d")
    r = client.post("/v1/forecast", json=body(csi, ["close"], horizon=5, model="CSI300_h5"))
    assert r.status_code == 200, r.text
    out = r.json()
    last = csi["close"].iloc[-1]
    assert all(abs(p / last - 1) < 0.2 for p in out["forecasts"]["close"]["point"])
    # trading days: weekend gaps are kept (the model was trained on trading days), next business days out
    assert out["preprocessing"]["inserted_steps"] == 0 and out["model"]["name"] == "CSI300_h5"
    assert any("trading-day" in n for n in out["preprocessing"]["notes"])
    assert pd.Timestamp(out["timestamps"][0]) == pd.Timestamp("2022-01-03")  # 2021-12-31 was a Friday


def test_monthly_history_and_utc_offsets(client: TestClient) -> None:
    """A month-end series forecasts month ends; local stamps across a daylight-saving change are one
    regular hourly series in UTC."""
    months = pd.date_range("1990-01-31", periods=200, freq="ME")
    sales = (100 + 10 * np.sin(2 * np.pi * np.arange(200) / 12)).tolist()
    stamps = [d.strftime("%Y-%m-%d") for d in months]
    r = client.post("/v1/forecast", json={"timestamps": stamps, "series": {"sales": sales}, "horizon": 12})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["preprocessing"]["freq"] == "ME" and out["preprocessing"]["inserted_steps"] == 0
    assert [pd.Timestamp(t) for t in out["timestamps"][:2]] == [
        pd.Timestamp("2006-09-30"),
        pd.Timestamp("2006-10-31"),
    ]
    local = pd.date_range("2021-03-20", periods=200, freq="h", tz="Europe/Berlin")
    load = (50 + 5 * np.sin(2 * np.pi * np.arange(200) / 24)).tolist()
    payload = {"timestamps": [t.isoformat() for t in local], "series": {"load": load}, "horizon": 24}
    r = client.post("/v1/forecast", json=payload)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["preprocessing"]["inserted_steps"] == 0 and not out["preprocessing"]["resampled"]
    next_hour = (local[-1] + pd.Timedelta("1h")).tz_convert("UTC").tz_localize(None)
    assert pd.Timestamp(out["timestamps"][0]).tz_localize(None) == next_hour
    # the calendar can be named: month starts sent with a gap, freq "MS"; a fixed step; a refused multiple
    starts = [d.strftime("%Y-%m-%d") for d in pd.date_range("1990-01-01", periods=200, freq="MS")]
    monthly = {"timestamps": starts[:50] + starts[51:], "series": {"sales": sales[:50] + sales[51:]}}
    r = client.post("/v1/forecast", json={**monthly, "horizon": 3, "freq": "MS"})
    assert r.status_code == 200 and r.json()["preprocessing"]["inserted_steps"] == 1, r.text
    assert r.json()["timestamps"][0].startswith("2006-09-01")
    r = client.post("/v1/forecast", json={**monthly, "horizon": 3, "freq": "2MS"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_freq"
    payload["timestamps"] = [int(t.timestamp()) for t in local]  # the same instants as Unix epoch seconds
    r = client.post("/v1/forecast", json=payload)
    assert r.status_code == 200 and pd.Timestamp(r.json()["timestamps"][0]) == next_hour, r.text


def test_nan_and_missing_rows_are_filled_and_reported(client: TestClient, etth1: pd.DataFrame) -> None:
    df = etth1.iloc[:300].drop(index=[100, 101]).copy()
    df.loc[50, "OT"] = np.nan
    payload = body(df, ["OT"], horizon=24)
    payload["series"]["OT"][60] = None
    r = client.post("/v1/forecast", json=payload)
    assert r.status_code == 200, r.text
    pre = r.json()["preprocessing"]
    assert pre["inserted_steps"] == 2 and pre["nan_filled"] == 4 and pre["rows_received"] == 298


def test_bad_inputs_are_clear_4xx(client: TestClient, etth1: pd.DataFrame) -> None:
    short = client.post("/v1/forecast", json=body(etth1.iloc[:50], ["OT"], horizon=24))
    assert short.status_code == 422 and short.json()["error"] == "history_too_short"
    assert short.json()["detail"]["minimum"] == 96 and "96" in short.json()["detail"]["message"]
    sparse = etth1.iloc[list(range(0, 400, 3))]
    irr = client.post("/v1/forecast", json=body(sparse, ["OT"], horizon=24, freq="1h"))
    assert irr.status_code == 422 and irr.json()["error"] == "irregular_timestamps"
    bad_ts = body(etth1.iloc[:200], ["OT"], horizon=24)
    bad_ts["timestamps"][5] = "not a time"
    r = client.post("/v1/forecast", json=bad_ts)
    assert r.status_code == 422 and r.json()["error"] == "invalid_timestamps"
    mism = body(etth1.iloc[:200], ["OT"], horizon=24)
    mism["series"]["OT"] = mism["series"]["OT"][:-1]
    assert client.post("/v1/forecast", json=mism).json()["error"] == "length_mismatch"
    assert client.post("/v1/forecast", json=body(etth1.iloc[:200], ["OT"], horizon=500)).json()["error"] == (
        "horizon_too_long"
    )
    r = client.post("/v1/forecast", json=body(etth1.iloc[:200], ["OT"], horizon=5, model="nope"))
    assert r.status_code == 404 and r.json()["error"] == "unknown_model"
    r = client.post("/v1/forecast", json=body(etth1.iloc[:200], ["OT"], horizon=5, quantiles=[1.5]))
    assert r.status_code == 422 and r.json()["error"] == "validation_error"
    allnan = body(etth1.iloc[:200], ["OT"], horizon=5)
    allnan["series"]["OT"] = [None] * 200
    assert client.post("/v1/forecast", json=allnan).json()["error"] == "no_values"
    huge = body(etth1.iloc[:400], ["OT"], horizon=5)
    huge["series"]["OT"] = [1e300] * 400  # would come back as NaN from float32 models
    r = client.post("/v1/forecast", json=huge)
    assert r.status_code == 422 and r.json()["error"] == "value_out_of_range"


def test_backtest_rolling_origin(client: TestClient, etth1: pd.DataFrame) -> None:
    df = etth1.iloc[11520 - 96 : 11520 + 24 * 6]
    r = client.post("/v1/backtest", json=body(df, ["OT", "HUFL"], horizon=24, folds=4))
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["folds"]) == 4 and out["baseline"] == "seasonal_naive(period=24)"
    origins = pd.to_datetime([f["origin"] for f in out["folds"]])
    assert (np.diff(origins) == np.timedelta64(24, "h")).all() and origins[-1] == pd.Timestamp(
        df["date"].iloc[-24]
    )
    assert abs(out["overall"]["mse"] - np.mean([f["mse"] for f in out["folds"]])) < 1e-9
    assert 0.0 <= out["overall"]["coverage"] <= 1.0
    r = client.post("/v1/backtest", json=body(df.iloc[:150], ["OT"], horizon=24, folds=4))
    assert r.status_code == 422 and r.json()["detail"]["minimum"] == 96 + 24 * 4
