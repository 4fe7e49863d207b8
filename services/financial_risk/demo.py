"""Demo: real handbook transactions and taiwan_default applications scored by the running service."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sklearn.metrics import roc_auc_score

N_STREAM = 2000  # transactions replayed over REST, in stream order, right after the warm-up cutoff
BATCH = 500


def _wait_ready(client: httpx.Client, timeout_s: float = 600.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        r = client.get("/v1/model")
        if r.status_code == 200 and r.json()["feature_state"]["warm"]["done"]:
            return r.json()
        last = r.text[:300]
        time.sleep(2.0)
    raise RuntimeError(f"financial_risk did not finish warming its feature state: {last}")


def _fraud_slice(data_dir: Path, watermark: str | None, until: str, n: int) -> Any:
    from pipelines.financial_risk.data import epoch, load_transactions

    df = load_transactions(data_dir)
    start = epoch(until)
    if watermark:
        start = max(start, int(np.datetime64(watermark.replace("+00:00", ""), "s").astype(np.int64)) + 1)
    return df[df["ts"] >= start].head(n)


def exercise(base_url: str, data_dir: Path) -> list[str]:
    """Score real transactions (and credit applications) over HTTP; raise RuntimeError if wrong."""
    lines: list[str] = []
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        info = _wait_ready(client)
        state = info["feature_state"]
        version = info["fraud"]["version"]
        lines.append(
            f"fraud model {version} ({info['fraud']['n_features']} streaming features, test AUC "
            f"{info['fraud']['metrics'].get('auc', float('nan')):.3f}, AP "
            f"{info['fraud']['metrics'].get('average_precision', float('nan')):.3f}); feature state: "
            f"{state['customers']} customers, {state['terminals']} terminals, watermark {state['watermark']}"
        )
        df = _fraud_slice(
            Path(data_dir), state["watermark"], state["warm"]["until"] or "2018-08-08", N_STREAM
        )
        if df.empty:
            raise RuntimeError("no transactions left after the service's watermark")
        # one transaction through /v1/score, the rest through /v1/score/batch, in stream order
        rows = [
            {
                "transaction_id": int(r.TRANSACTION_ID),
                "customer_id": int(r.CUSTOMER_ID),
                "terminal_id": int(r.TERMINAL_ID),
                "timestamp": r.TX_DATETIME.isoformat(),
                "amount": float(r.TX_AMOUNT),
            }
            for r in df.itertuples()
        ]
        t0 = time.perf_counter()
        first = client.post("/v1/score", json=rows[0])
        if first.status_code != 200:
            raise RuntimeError(f"/v1/score answered {first.status_code}: {first.text[:300]}")
        one = first.json()
        if len(one["reasons"]) != 5 or one["model_version"] != version:
            raise RuntimeError(f"/v1/score answer incomplete: {one}")
        results = [one]
        for i in range(1, len(rows), BATCH):
            r = client.post("/v1/score/batch", json={"transactions": rows[i : i + BATCH]})
            if r.status_code != 200:
                raise RuntimeError(f"/v1/score/batch answered {r.status_code}: {r.text[:300]}")
            body = r.json()
            if body["failed"]:
                bad = [x for x in body["results"] if x["error"]][:3]
                raise RuntimeError(f"batch items failed: {bad}")
            results += [x["result"] for x in body["results"]]
        elapsed = time.perf_counter() - t0
        scores = np.array([x["score"] for x in results])
        labels = df["TX_FRAUD"].to_numpy()[: len(scores)]
        if not np.all((scores >= 0) & (scores <= 1)):
            raise RuntimeError("scores outside [0, 1]")
        alerts = [x for x in results if x["decision"] == "alert"]
        lines.append(
            f"scored {len(results)} real transactions "
            f"({df.TX_DATETIME.iloc[0]} .. {df.TX_DATETIME.iloc[-1]}) over REST in {elapsed:.1f}s: "
            f"{len(alerts)} alerts, {int(labels.sum())} true frauds"
        )
        if labels.sum() and labels.sum() < len(labels):
            auc = roc_auc_score(labels, scores)
            hit = sum(labels[i] for i, x in enumerate(results) if x["decision"] == "alert")
            lines.append(f"  slice AUC {auc:.3f}; frauds among alerts {hit}/{len(alerts)}")
            if auc < 0.6:
                raise RuntimeError(
                    f"fraud scores do not separate frauds from legitimate ones (AUC {auc:.3f})"
                )
        lines.append(f"  {'tx id':>9} {'customer':>8} {'amount':>8} {'score':>6} fraud  top reasons")
        for i in np.argsort(-scores)[:5]:
            x, r = results[i], df.iloc[i]
            reasons = ", ".join(f"{z['feature']}({z['contribution']:+.2f})" for z in x["reasons"][:3])
            lines.append(
                f"  {x['transaction_id']:>9} {int(r.CUSTOMER_ID):>8} {r.TX_AMOUNT:>8.2f} {x['score']:>6.3f} "
                f"{int(r.TX_FRAUD):>5}  {reasons}"
            )
        thr = client.get("/v1/threshold").json()
        lines.append(
            f"live threshold of REST scoring {thr['value']:.4f} (mode {thr['mode']}, "
            f"budget {thr['alert_budget']})"
        )
        lines += _credit(client, Path(data_dir))
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        lines += _kafka(bootstrap, Path(data_dir))
    return lines


def _kafka(bootstrap: str, data_dir: Path, n: int = 500, timeout_s: float = 120.0) -> list[str]:
    """Replay a slice through Kafka (transactions + delayed labels) and read the worker's risk-scores."""
    import json

    from backbone.kafka import make_consumer
    from kafka import TopicPartition

    from pipelines.financial_risk.data import load_transactions
    from pipelines.financial_risk.replay import replay

    consumer = make_consumer(bootstrap)
    try:
        parts = consumer.partitions_for_topic("risk-scores") or set()
        tps = [TopicPartition("risk-scores", p) for p in sorted(parts)]
        if tps:
            consumer.assign(tps)
            consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the end offsets now (seek_to_end is lazy): the scores come quickly
                consumer.position(tp)
        day = "2018-08-10"
        df = load_transactions(data_dir, end="2018-08-11")
        wanted = set(df[df["TX_DATETIME"] >= day]["TRANSACTION_ID"].head(n).tolist())
        sent = replay(bootstrap, data_dir, day, day, rate=1000, limit=n, progress=False)
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(wanted) and time.monotonic() < deadline:
            if not tps:
                parts = consumer.partitions_for_topic("risk-scores") or set()
                tps = [TopicPartition("risk-scores", p) for p in sorted(parts)]
                if tps:
                    consumer.assign(tps)
                    consumer.seek_to_beginning(*tps)
                time.sleep(0.5)
                continue
            for batch in consumer.poll(timeout_ms=500).values():
                for rec in batch:
                    ev = json.loads(rec.value)
                    if ev["transaction_id"] in wanted:
                        got[ev["transaction_id"]] = ev
    finally:
        consumer.close()
    if not got:
        raise RuntimeError(
            "no risk-scores came back from Kafka within "
            f"{timeout_s:.0f}s: is `python -m services.financial_risk.worker --warm-until 2018-08-08` "
            "running?"
        )
    lat = np.array([g["latency_ms"] for g in got.values() if g.get("latency_ms") is not None])
    alerts = sum(1 for g in got.values() if g["decision"] == "alert")
    line = (
        f"kafka: replayed {sent['transactions']} transactions of {day} ({sent['feedback']} labels) at "
        f"{sent['events_per_s']} ev/s; worker scored {len(got)}/{len(wanted)}, {alerts} alerts "
        f"(stream threshold {got[max(got)]['threshold']:.4f})"
    )
    if len(lat):
        p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
        line += f", latency produced->scored p50 {p50:.1f} ms p99 {p99:.1f} ms"
    if len(got) < len(wanted):
        raise RuntimeError(line + " (incomplete)")
    return [line]


def _credit(client: httpx.Client, data_dir: Path) -> list[str]:
    from pipelines.financial_risk.common import credit_split
    from pipelines.financial_risk.data import CREDIT_FEATURES, CREDIT_TARGET

    _, test = credit_split(data_dir)
    sample = test.sample(n=40, random_state=1)
    scores, labels = [], []
    for _, row in sample.iterrows():
        body = {
            c.lower(): (
                int(row[c])
                if c in {"SEX", "EDUCATION", "MARRIAGE", "AGE"}
                or c.startswith("PAY_")
                and not c.startswith("PAY_AMT")
                else float(row[c])
            )
            for c in CREDIT_FEATURES
        }
        r = client.post("/v1/credit/score", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"/v1/credit/score answered {r.status_code}: {r.text[:300]}")
        out = r.json()
        if len(out["reasons"]) != 5:
            raise RuntimeError(f"credit answer without 5 reasons: {out}")
        scores.append(out["score"])
        labels.append(int(row[CREDIT_TARGET]))
    s, y = np.array(scores), np.array(labels)
    lines = [
        f"credit: 40 held-out applications scored; mean PD of defaulters {s[y == 1].mean():.3f} vs "
        f"others {s[y == 0].mean():.3f}; last reasons: {', '.join(z['feature'] for z in out['reasons'])}"
    ]
    if s[y == 1].mean() <= s[y == 0].mean():
        raise RuntimeError("credit scores of defaulters are not higher than of the others")
    return lines
