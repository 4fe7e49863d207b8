"""Demo of the forecasting service: a real ETTh1 forecast and backtest over REST and, when
KAFKA_BOOTSTRAP_SERVERS is set, CSI 300 ticks streamed through ``market-ticks`` -> ``forecasts``."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

ETT_TEST_BORDER = 12 * 30 * 24 + 4 * 30 * 24  # first test row of ETTh1 (standard protocol)


def _history_body(df: pd.DataFrame, cols: list[str]) -> dict[str, object]:
    return {
        "timestamps": df["date"].astype(str).tolist(),
        "series": {c: df[c].astype(float).tolist() for c in cols},
    }


def _check(cond: bool, reason: str) -> None:
    if not cond:
        raise RuntimeError(f"forecasting demo: {reason}")


def exercise_rest(client: httpx.Client, data_dir: Path) -> list[str]:
    lines: list[str] = []
    models = client.get("/v1/models")
    _check(models.status_code == 200, f"GET /v1/models -> {models.status_code} {models.text[:200]}")
    default = next(m for m in models.json()["models"] if m["default"])
    lookback, horizon = default["lookback"], min(96, default["max_horizon"])
    df = pd.read_csv(data_dir / "ett" / "ETTh1.csv")
    cols = list(df.columns[1:])
    start = ETT_TEST_BORDER + 24 * 7  # a week into the test period
    hist = df.iloc[start - max(lookback, 512) : start]
    truth = df.iloc[start : start + horizon]
    r = client.post(
        "/v1/forecast", json={**_history_body(hist, cols), "horizon": horizon, "quantiles": [0.05, 0.5, 0.95]}
    )
    _check(r.status_code == 200, f"POST /v1/forecast -> {r.status_code} {r.text[:300]}")
    out = r.json()
    _check(
        pd.Timestamp(out["timestamps"][0]) == pd.Timestamp(truth["date"].iloc[0]),
        "forecast timestamps do not follow the history",
    )
    lines.append(
        f"forecasting: ETTh1 {len(hist)} h x {len(cols)} vars from {hist['date'].iloc[0]} -> "
        f"{horizon} h ahead with {out['model']['name']} ({out['model']['family']} {out['model']['version']})"
    )
    lines.append(f"  {'variable':<6} {'MAE model':>10} {'MAE s-naive':>12} {'in 90% int.':>12}")
    maes, naives = [], []
    for c in cols:
        fc = out["forecasts"][c]
        point, lo, hi = (np.asarray(fc[k], dtype=float) for k in ("point", "lower", "upper"))
        _check(bool(np.isfinite(point).all()), f"non-finite forecast for {c}")
        _check(
            bool((lo <= point + 1e-6).all() and (point <= hi + 1e-6).all()),
            f"interval does not contain the point forecast for {c}",
        )
        y = truth[c].to_numpy(dtype=float)
        naive = hist[c].to_numpy(dtype=float)[-24:]
        naive = np.tile(naive, horizon // 24 + 1)[:horizon]
        mae, mae_naive = float(np.mean(np.abs(point - y))), float(np.mean(np.abs(naive - y)))
        cover = float(np.mean((y >= lo) & (y <= hi)))
        maes.append(mae)
        naives.append(mae_naive)
        lines.append(f"  {c:<6} {mae:>10.3f} {mae_naive:>12.3f} {cover:>12.0%}")
    _check(
        float(np.mean(maes)) < 2.0 * float(np.mean(naives)),
        f"forecast MAE {np.mean(maes):.3f} far worse than seasonal naive {np.mean(naives):.3f}",
    )
    bt_hist = df.iloc[start - lookback - 24 * 4 : start + 24]
    b = client.post("/v1/backtest", json={**_history_body(bt_hist, ["OT"]), "horizon": 24, "folds": 5})
    _check(b.status_code == 200, f"POST /v1/backtest -> {b.status_code} {b.text[:300]}")
    ov = b.json()["overall"]
    lines.append(
        f"  backtest OT, 5 daily folds at horizon 24: MAE {ov['mae']:.3f} vs {b.json()['baseline']} "
        f"{ov['baseline_mae']:.3f}, 90% coverage {ov['coverage']:.0%}"
    )
    short = client.post("/v1/forecast", json={**_history_body(hist.iloc[:10], ["OT"]), "horizon": 24})
    _check(
        short.status_code == 422 and short.json()["error"] == "history_too_short",
        "a 10-step history was not rejected with 422",
    )
    lines.append(f"  10-step history -> 422 {short.json()['detail']['message']}")
    return lines


def exercise_kafka(bootstrap: str, data_dir: Path, lookback: int = 60, timeout_s: float = 90.0) -> list[str]:
    """Stream real CSI 300 closes into ``market-ticks``; read this run's forecasts back from ``forecasts``."""
    from backbone.kafka import JsonProducer, make_consumer

    n_ticks = lookback + 40  # the service forecasts once a symbol's history covers the model's lookback
    csi = pd.read_csv(data_dir / "csi300" / "CSI300_daily_2005_2021.csv")
    csi["date"] = pd.to_datetime(csi["date"], format="%Y/%m/%d")
    ticks = csi.iloc[-n_ticks - 10 : -10]  # keep the last 10 days to score the streamed forecasts
    symbol = f"CSI300-demo-{uuid.uuid4().hex[:6]}"
    with JsonProducer(bootstrap, "forecasting-demo") as producer:
        for row in ticks.itertuples():
            producer.send(
                "market-ticks",
                {"timestamp": row.date.isoformat(), "symbol": symbol, "value": float(row.close)},
                key=symbol,
            )
        producer.send(
            "market-ticks", {"timestamp": "yesterday", "symbol": symbol, "value": "n/a"}, key=symbol
        )
        producer.flush(30)
    consumer = make_consumer(
        bootstrap,
        "forecasts",
        group_id=f"forecasting-demo-{uuid.uuid4().hex[:6]}",
        consumer_timeout_ms=1000,
        value_deserializer=lambda b: json.loads(b.decode("utf-8")),
    )
    got: list[dict] = []
    deadline = time.monotonic() + timeout_s
    expected = max(1, (n_ticks - lookback) // 5)
    try:
        while time.monotonic() < deadline and len(got) < expected:
            for rec in consumer:
                if rec.value.get("symbol") == symbol:
                    got.append(rec.value)
    finally:
        consumer.close()
    _check(
        len(got) > 0,
        f"no forecasts for {symbol} on 'forecasts' within {timeout_s:.0f} s (is the service consuming?)",
    )
    closes = csi.set_index("date")["close"]
    lines = [
        f"forecasting stream: {n_ticks} CSI 300 daily closes + 1 malformed tick -> market-ticks; "
        f"{len(got)} forecasts read back"
    ]
    lines.append(
        f"  {'as of':<11} {'last close':>10} {'+1 forecast':>12} {'90% interval':>21} {'actual +1':>10}"
    )
    errors, naive_errors = [], []
    for fc in got[-6:]:
        as_of = pd.Timestamp(fc["as_of"])
        pos = closes.index.get_indexer([as_of])[0]
        actual = float(closes.iloc[pos + 1]) if 0 <= pos < len(closes) - 1 else float("nan")
        first = fc["forecasts"][0]
        errors.append(abs(first["point"] - actual) / actual)
        naive_errors.append(abs(float(closes.iloc[pos]) - actual) / actual)
        lines.append(
            f"  {as_of.date()!s:<11} {float(closes.iloc[pos]):>10.1f} {first['point']:>12.1f} "
            f"[{first['lower']:>8.1f}, {first['upper']:>8.1f}] {actual:>10.1f}"
        )
    lines.append(
        f"  one-day-ahead MAPE of these forecasts: {100 * float(np.nanmean(errors)):.2f} % "
        f"(last-value baseline {100 * float(np.nanmean(naive_errors)):.2f} %)"
    )
    return lines


def exercise(base_url: str, data_dir: Path) -> list[str]:
    """Run the demo against a running service; raises RuntimeError when an answer makes no sense."""
    data_dir = Path(data_dir)
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        lines = exercise_rest(client, data_dir)
        models = client.get("/v1/models").json()["models"]
    stream = [m for m in models if m["name"].upper().startswith("CSI300")] or [
        m for m in models if m["default"]
    ]
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        lines += exercise_kafka(bootstrap, data_dir, lookback=int(stream[0]["lookback"]))
    else:
        lines.append("forecasting stream: skipped (KAFKA_BOOTSTRAP_SERVERS not set)")
    return lines
