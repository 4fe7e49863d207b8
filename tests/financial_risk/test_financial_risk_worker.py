"""The Kafka stream worker against the real broker: scores, alerts, DLQ, restart from checkpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from backbone.artifacts import latest_artifact
from backbone.kafka import JsonProducer, dlq_topic, read_topic

from pipelines.financial_risk.data import LABEL_DELAY_S, epoch, load_transactions
from pipelines.financial_risk.replay import replay
from services.financial_risk import feature_state
from services.financial_risk.app.core.config import Settings
from services.financial_risk.events import ScoreEvent
from services.financial_risk.features import FeatureEngine, Transaction
from services.financial_risk.worker import RiskWorker

pytestmark = pytest.mark.kafka
CUSTOMERS = set(range(40))
START, END = "2018-07-25", "2018-07-31"


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    return read_topic(bootstrap, topic, want=expected, timeout_s=timeout_s)


def offline_scores(data_dir: Path, model_dir: Path) -> dict[int, float]:
    """The same slice through one engine in stream order, labels fed as the replay tool sends them."""
    df = load_transactions(data_dir, end="2018-08-01")
    lo = epoch(START)
    df = df[(df["ts"] >= lo - LABEL_DELAY_S) & df["CUSTOMER_ID"].isin(CUSTOMERS)].reset_index(drop=True)
    art = latest_artifact(model_dir, "financial_risk", "fraud_lgbm")
    booster = lgb.Booster(model_str=(art.path / "model.txt").read_text())
    eng = FeatureEngine()
    rows, ids = [], []
    j = 0
    for i, r in enumerate(df.itertuples()):
        if r.ts < lo:
            continue
        while j < i and int(df.ts[j]) + LABEL_DELAY_S <= r.ts:
            q = df.iloc[j]
            eng.add_feedback(
                int(q.TRANSACTION_ID),
                int(q.TX_FRAUD),
                int(q.ts) + LABEL_DELAY_S,
                terminal_id=int(q.TERMINAL_ID),
                tx_ts=int(q.ts),
                amount=float(q.TX_AMOUNT),
            )
            j += 1
        rows.append(
            eng.process(Transaction(r.TRANSACTION_ID, r.CUSTOMER_ID, r.TERMINAL_ID, r.ts, r.TX_AMOUNT))
        )
        ids.append(int(r.TRANSACTION_ID))
    return dict(zip(ids, booster.predict(np.vstack(rows)).tolist(), strict=True))


def _settings(tag: str, bootstrap: str, fr_model_dir: Path, fr_data_dir: Path, kafka_topic) -> Settings:
    return Settings(
        model_dir=fr_model_dir, data_dir=fr_data_dir, kafka_bootstrap_servers=bootstrap,
        transactions_topic=kafka_topic(f"tx-{tag}"), feedback_topic=kafka_topic(f"fb-{tag}"),
        scores_topic=kafka_topic(f"scores-{tag}"), alerts_topic=kafka_topic(f"alerts-{tag}"),
        worker_group_id=kafka_topic(f"grp-{tag}"),
    )  # fmt: skip


def test_financial_risk_worker_scores_every_event(
    kafka_bootstrap: str, kafka_topic, fr_model_dir: Path, fr_data_dir: Path, tmp_path: Path
) -> None:
    s = _settings("a", kafka_bootstrap, fr_model_dir, fr_data_dir, kafka_topic)
    sent = replay(
        kafka_bootstrap,
        fr_data_dir,
        START,
        END,
        customers=CUSTOMERS,
        transactions_topic=s.transactions_topic,
        feedback_topic=s.feedback_topic,
        progress=False,
    )
    assert sent["transactions"] > 300 and sent["feedback"] > 100
    with JsonProducer(kafka_bootstrap, "bad-producer") as p:
        p.send(s.transactions_topic, b"not json", key="1")
        p.send(s.transactions_topic, {"transaction_id": 5, "amount": -1}, key="1")
        p.flush()
    worker = RiskWorker(s, kafka_bootstrap, checkpoint_dir=tmp_path / "ckpt", checkpoint_every_s=0.5)
    stats = worker.run(idle_timeout_s=6)
    assert stats.dead_lettered == 2
    assert worker.checkpoint_failures == 0  # periodic checkpoints are written by forked children
    # every record, duplicates included: stop once the topic is drained, not at a count
    scores = read_topic(kafka_bootstrap, s.scores_topic, timeout_s=120, idle_s=5)
    dlq = read_all(kafka_bootstrap, dlq_topic(s.transactions_topic), 2)
    alerts = read_all(kafka_bootstrap, s.alerts_topic, 1, timeout_s=5)
    ids = [x["transaction_id"] for x in scores]
    assert len(ids) == len(set(ids)) == sent["transactions"]
    assert {x["error"]["reason"] for x in dlq} == {"decode", "validation"}
    assert all(x["decision"] == "alert" for x in alerts)
    assert {x["transaction_id"] for x in alerts} == {
        x["transaction_id"] for x in scores if x["decision"] == "alert"
    }
    one = scores[0]
    assert len(one["reasons"]) == 5 and one["model_version"] and one["latency_ms"] is not None
    for record in scores:  # every record follows the documented schema exactly
        assert ScoreEvent.model_validate(record).model_dump(mode="json") == record
    # the stream's scores equal one ordered offline replay (labels only via feedback, in event time)
    expected = offline_scores(fr_data_dir, fr_model_dir)
    got = {x["transaction_id"]: x["score"] for x in scores}
    assert set(got) == set(expected)
    assert max(abs(got[k] - expected[k]) for k in got) < 1e-9
    assert any((tmp_path / "ckpt").glob("*-partition-*.npz"))


def test_financial_risk_worker_survives_kill9(
    kafka_bootstrap: str, kafka_topic, fr_model_dir: Path, fr_data_dir: Path, tmp_path: Path
) -> None:
    """kill -9 the worker process three times during a replay: no event lost, duplicates carry identical
    scores, and the checkpointed state equals one clean ordered replay."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    s = _settings("k", kafka_bootstrap, fr_model_dir, fr_data_dir, kafka_topic)
    env = dict(
        os.environ, MODEL_DIR=str(fr_model_dir), DATA_DIR=str(fr_data_dir),
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        TRANSACTIONS_TOPIC=s.transactions_topic, FEEDBACK_TOPIC=s.feedback_topic, SCORES_TOPIC=s.scores_topic,
        ALERTS_TOPIC=s.alerts_topic, WORKER_GROUP_ID=s.worker_group_id, LOG_LEVEL="WARNING",
        CHECKPOINT_EVERY_S="1",  # periodic checkpoints (forked writers) happen between the kills
    )  # fmt: skip
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "services.financial_risk.worker", "--checkpoint-dir", str(ckpt)]
    cmd += ["--max-batch", "10"]
    sent: dict = {}
    producer = threading.Thread(
        target=lambda: sent.update(
            replay(kafka_bootstrap, fr_data_dir, START, END, rate=60, customers=CUSTOMERS,
                   transactions_topic=s.transactions_topic, feedback_topic=s.feedback_topic, progress=False)
        )
    )  # fmt: skip
    producer.start()
    kills = 0
    seen = 0
    while kills < 3:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until this incarnation has produced new scores, then kill it hard
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            n = len(read_all(kafka_bootstrap, s.scores_topic, 10**9, timeout_s=1.5))
            if n > seen + 30:
                break
        seen = n
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    producer.join()
    final = subprocess.run([*cmd, "--idle-exit-s", "8"], env=env, timeout=300, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    # every record, duplicates included: stop once the topic is drained, not at a count
    scores = read_topic(kafka_bootstrap, s.scores_topic, timeout_s=120, idle_s=5)
    by_id: dict[int, list[dict]] = {}
    for x in scores:
        by_id.setdefault(x["transaction_id"], []).append(x)
    expected = offline_scores(fr_data_dir, fr_model_dir)
    assert set(by_id) == set(expected)  # none lost
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    for k, v in dups.items():  # re-scored after a crash from the restored state: identical scores
        assert max(abs(x["score"] - v[0]["score"]) for x in v) < 1e-12
        assert abs(v[0]["score"] - expected[k]) < 1e-9
    # the checkpointed per-partition state equals one clean ordered replay of the same events
    clean = _clean_engine(fr_data_dir)
    paths = sorted(ckpt.glob("*-partition-*.npz"))
    assert paths
    for path in paths:
        got = feature_state.load(path)
        ref = clean.export_customers(set(got["customer"].tolist()))
        for key, value in ref.items():
            if key.startswith("pending") or key == "watermark":
                continue
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        got_order, ref_order = np.argsort(got["pending_ids"]), np.argsort(ref["pending_ids"])
        for key in ("pending_ids", "pending_int", "pending_amount"):
            np.testing.assert_array_equal(got[key][got_order], ref[key][ref_order], err_msg=key)


def _clean_engine(data_dir: Path) -> FeatureEngine:
    df = load_transactions(data_dir, end="2018-08-01")
    lo = epoch(START)
    df = df[(df["ts"] >= lo - LABEL_DELAY_S) & df["CUSTOMER_ID"].isin(CUSTOMERS)].reset_index(drop=True)
    eng = FeatureEngine()
    j = 0
    for i, r in enumerate(df.itertuples()):
        if r.ts < lo:
            continue
        while j < i and int(df.ts[j]) + LABEL_DELAY_S <= r.ts:
            q = df.iloc[j]
            eng.add_feedback(int(q.TRANSACTION_ID), int(q.TX_FRAUD), int(q.ts) + LABEL_DELAY_S,
                             terminal_id=int(q.TERMINAL_ID), tx_ts=int(q.ts), amount=float(q.TX_AMOUNT))
            j += 1
        tx = Transaction(r.TRANSACTION_ID, r.CUSTOMER_ID, r.TERMINAL_ID, r.ts, r.TX_AMOUNT)
        eng.process(tx, mode="none")
    return eng
