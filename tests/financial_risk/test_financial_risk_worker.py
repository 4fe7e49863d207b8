"""The Kafka stream worker against the real broker: scores, alerts, DLQ, restart from checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from backbone.artifacts import latest_artifact
from backbone.kafka import JsonProducer, dlq_topic, make_consumer, read_topic
from fastapi.testclient import TestClient
from kafka import TopicPartition
from prometheus_client import REGISTRY

from pipelines.financial_risk.data import LABEL_DELAY_S, epoch, load_transactions
from pipelines.financial_risk.replay import replay
from services.financial_risk.app.core.config import Settings
from services.financial_risk.app.main import create_app
from services.financial_risk.events import ScoreEvent
from services.financial_risk.features import FeatureEngine, Transaction
from services.financial_risk.state_log import PartitionLog
from services.financial_risk.worker import FEEDBACK_RETRY_S, RiskWorker, batch_phases

pytestmark = pytest.mark.kafka
CUSTOMERS = set(range(40))
START, END = "2018-07-25", "2018-07-31"


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    return read_topic(bootstrap, topic, want=expected, timeout_s=timeout_s)


def _replay_slice(
    data_dir: Path, eng: FeatureEngine, start: str = START, end: str = END
) -> Iterator[Transaction]:
    """The test slice in stream order: each label goes into ``eng`` once due (as the replay tool sends it),
    each transaction is yielded."""
    df = load_transactions(data_dir, end=(pd.Timestamp(end) + pd.Timedelta(days=1)).strftime("%Y-%m-%d"))
    lo = epoch(start)
    df = df[(df["ts"] >= lo - LABEL_DELAY_S) & df["CUSTOMER_ID"].isin(CUSTOMERS)].reset_index(drop=True)
    j = 0
    for i, r in enumerate(df.itertuples()):
        if r.ts < lo:
            continue
        while j < i and int(df.ts[j]) + LABEL_DELAY_S <= r.ts:
            q = df.iloc[j]
            ts, amount = int(q.ts), float(q.TX_AMOUNT)
            eng.add_feedback(
                int(q.TRANSACTION_ID), int(q.TX_FRAUD), ts + LABEL_DELAY_S, int(q.TERMINAL_ID), ts, amount
            )
            j += 1
        yield Transaction(r.TRANSACTION_ID, r.CUSTOMER_ID, r.TERMINAL_ID, r.ts, r.TX_AMOUNT)


def offline_scores(data_dir: Path, model_dir: Path, start: str = START, end: str = END) -> dict[int, float]:
    """The same slice through one engine in stream order, labels fed as the replay tool sends them."""
    art = latest_artifact(model_dir, "financial_risk", "fraud_lgbm")
    booster = lgb.Booster(model_str=(art.path / "model.txt").read_text())
    eng = FeatureEngine()
    rows, ids = [], []
    for tx in _replay_slice(data_dir, eng, start, end):
        rows.append(eng.process(tx))
        ids.append(int(tx.transaction_id))
    return dict(zip(ids, booster.predict(np.vstack(rows)).tolist(), strict=True))


def _settings(
    tag: str, bootstrap: str, fr_model_dir: Path, fr_data_dir: Path, kafka_topic, **extra: Any
) -> Settings:
    return Settings(
        model_dir=fr_model_dir, data_dir=fr_data_dir, kafka_bootstrap_servers=bootstrap,
        transactions_topic=kafka_topic(f"tx-{tag}"), feedback_topic=kafka_topic(f"fb-{tag}"),
        scores_topic=kafka_topic(f"scores-{tag}"), alerts_topic=kafka_topic(f"alerts-{tag}"),
        threshold_topic=kafka_topic(f"thr-{tag}"), worker_group_id=kafka_topic(f"grp-{tag}"), **extra,
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
        # malformed labels: dead-lettered to the feedback topic's DLQ, not silently dropped
        p.send(s.feedback_topic, b"\xff not json", key="2")
        p.send(s.feedback_topic, {"transaction_id": 9, "label": 3, "known_at": "2018-07-30T00:00Z"}, key="2")
        p.flush()
    worker = RiskWorker(s, kafka_bootstrap, checkpoint_dir=tmp_path / "ckpt", checkpoint_every_s=0.5)
    stats = worker.run(idle_timeout_s=6)
    assert stats.dead_lettered == 2
    assert worker.checkpoint_failures == 0
    assert worker.checkpoints_written > 0  # incremental snapshot rounds during the run
    # per-batch phase timings (diagnosis of the stream benchmark): every scored event is in one batch
    timings = list(worker.batch_timings)
    assert sum(t[1] for t in timings) == stats.valid == sent["transactions"]
    assert all(t[5] >= t[2] + t[3] + t[4] - 1e-9 for t in timings)  # handler >= snapshot + labels + scoring
    phases = batch_phases(timings, since=0.0)
    assert phases["batches"] == len(timings) and set(phases) >= {"events", "scoring_ms", "outside_ms"}
    # every record, duplicates included: stop once the topic is drained, not at a count
    scores = read_topic(kafka_bootstrap, s.scores_topic, timeout_s=120, idle_s=5)
    dlq = read_all(kafka_bootstrap, dlq_topic(s.transactions_topic), 2)
    alerts = read_all(kafka_bootstrap, s.alerts_topic, 1, timeout_s=5)
    ids = [x["transaction_id"] for x in scores]
    assert len(ids) == len(set(ids)) == sent["transactions"]
    assert {x["error"]["reason"] for x in dlq} == {"decode", "validation"}
    label_dlq = read_all(kafka_bootstrap, dlq_topic(s.feedback_topic), 2)
    assert sorted(x["error"]["reason"] for x in label_dlq) == ["decode", "validation"]
    assert worker.feedback_invalid == 2
    bad = next(x for x in label_dlq if x["error"]["reason"] == "validation")
    assert bad["source_topic"] == s.feedback_topic and "label" in json.dumps(bad["error"]["errors"])
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
    assert any((tmp_path / "ckpt").glob("*-partition-*/*.npz"))


def test_financial_risk_worker_discards_a_snapshot_of_another_topic(
    kafka_bootstrap: str,
    kafka_topic,
    fr_model_dir: Path,
    fr_data_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A checkpoint folder written from an earlier topic of the same name (a new broker, a re-created topic:
    Kafka 0.9 has no topic ids) names other events at the same offsets. Restoring it would skip the new
    topic's events as "already in the state". The worker checks each snapshot's last event against the topic,
    moves a foreign one aside and scores the partition from its beginning; its own snapshot it restores."""
    old = _settings("gen-old", kafka_bootstrap, fr_model_dir, fr_data_dir, kafka_topic)
    replay(kafka_bootstrap, fr_data_dir, START, END, customers=CUSTOMERS, progress=False,
           transactions_topic=old.transactions_topic, feedback_topic=old.feedback_topic)  # fmt: skip
    RiskWorker(old, kafka_bootstrap, checkpoint_dir=tmp_path / "old").run(idle_timeout_s=5)
    old_dirs = sorted((tmp_path / "old").glob("*-partition-*"))
    assert old_dirs and all(PartitionLog(d, 0).newest_anchor() is not None for d in old_dirs)

    # the new topic: other days, so each partition holds other events at the old offsets (some partitions
    # are shorter than the old snapshot's last offset, some longer)
    new = _settings("gen-new", kafka_bootstrap, fr_model_dir, fr_data_dir, kafka_topic)
    new_start, new_end = "2018-07-17", "2018-07-24"
    sent = replay(kafka_bootstrap, fr_data_dir, new_start, new_end, customers=CUSTOMERS, progress=False,
                  transactions_topic=new.transactions_topic, feedback_topic=new.feedback_topic)  # fmt: skip
    ckpt = tmp_path / "new"
    for d in old_dirs:  # the old topic's folder, as a worker of the re-created topic finds it
        shutil.copytree(d, ckpt / d.name.replace(old.transactions_topic, new.transactions_topic))
    worker = RiskWorker(new, kafka_bootstrap, checkpoint_dir=ckpt)
    worker.run(idle_timeout_s=5)
    old_parts = sorted(int(d.name.rsplit("-", 1)[1]) for d in old_dirs)
    assert sorted(p for p, _ in worker.snapshots_discarded) == old_parts
    reasons = " ".join(r for _, r in worker.snapshots_discarded)
    assert "holds transaction" in reasons and "ends at offset" in reasons  # both checks were exercised
    assert len(list(ckpt.glob("*.stale-*"))) == len(old_dirs)  # moved aside, not deleted
    scores = read_topic(kafka_bootstrap, new.scores_topic, timeout_s=60, idle_s=4)
    ids = [x["transaction_id"] for x in scores]
    assert len(ids) == len(set(ids)) == sent["transactions"]  # every event scored, once
    expected = offline_scores(fr_data_dir, fr_model_dir, new_start, new_end)
    assert max(abs(x["score"] - expected[x["transaction_id"]]) for x in scores) < 1e-9

    # the worker's own snapshot of this topic passes the check and is restored: nothing scored again
    again = RiskWorker(new, kafka_bootstrap, checkpoint_dir=ckpt)
    with caplog.at_level(logging.INFO, logger="services.financial_risk.worker"):
        again.run(idle_timeout_s=4)
    assert again.snapshots_discarded == []
    restored = [r for r in caplog.records if "restored:" in r.getMessage()]
    assert len(restored) == len(list(ckpt.glob("*-partition-[0-9]")))  # every partition from its snapshot
    assert len(read_topic(kafka_bootstrap, new.scores_topic, timeout_s=30, idle_s=3)) == len(scores)


def test_financial_risk_threshold_set_over_rest_reaches_the_stream_worker(
    kafka_bootstrap: str, kafka_topic, fr_model_dir: Path, fr_data_dir: Path, tmp_path: Path
) -> None:
    """The stream worker decides what goes to risk-alerts. An authorised PUT /v1/threshold publishes the
    change to risk-threshold; every worker applies the changes before its first event and while it runs."""
    key = "ops-key"
    s = _settings("thr", kafka_bootstrap, fr_model_dir, fr_data_dir, kafka_topic, warm_from="", api_key=key)
    topics = {"transactions_topic": s.transactions_topic, "feedback_topic": s.feedback_topic}
    with TestClient(create_app(s)) as client:
        assert client.put("/v1/threshold", json={"value": 0.0}).status_code == 401  # no key: not published
        r = client.put("/v1/threshold", json={"value": 0.0}, headers={"X-API-Key": key})
        assert r.status_code == 200, r.text
        assert r.json()["value"] == 0.0 and r.json()["published_to"] == s.threshold_topic
        with JsonProducer(kafka_bootstrap, "bad-command") as p:  # not a command: dead-lettered by the worker
            p.send(s.threshold_topic, {"value": 0.5}, key="threshold")
            p.flush()
        first = replay(kafka_bootstrap, fr_data_dir, START, END, customers=CUSTOMERS, progress=False,
                       **topics)  # fmt: skip
        # the worker starts after the change: it applies it before its first event
        worker = RiskWorker(s.model_copy(update={"service_name": "risk-worker-thr"}), kafka_bootstrap,
                            checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
        runner = threading.Thread(target=worker.run, kwargs={"idle_timeout_s": 120}, daemon=True)
        runner.start()
        try:
            n1 = first["transactions"]
            early = read_topic(kafka_bootstrap, s.scores_topic, want=n1, timeout_s=60)
            assert len(early) == n1 and worker.threshold_commands == 1
            # a change while the worker runs: in force within THRESHOLD_POLL_S (idle polls look for it)
            r = client.put("/v1/threshold", json={"value": 1.0}, headers={"X-API-Key": key})
            assert r.status_code == 200 and r.json()["published_to"] == s.threshold_topic
            deadline = time.monotonic() + 30
            while worker.threshold_commands < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert worker.threshold_commands == 2
            second = replay(kafka_bootstrap, fr_data_dir, "2018-08-01", "2018-08-02", customers=CUSTOMERS,
                            progress=False, **topics)  # fmt: skip
            n = n1 + second["transactions"]
            scores = read_topic(kafka_bootstrap, s.scores_topic, want=n, timeout_s=60)
        finally:
            worker.processor.stop()
            runner.join(timeout=60)
    assert len(scores) == n1 + second["transactions"]
    before = {x["transaction_id"] for x in early}
    earlier = [x for x in scores if x["transaction_id"] in before]
    assert all(x["threshold"] == 0.0 and x["decision"] == "alert" for x in earlier)
    later = [x for x in scores if x["transaction_id"] not in before]
    assert later and all(x["threshold"] == 1.0 and x["decision"] == "approve" for x in later)
    alerts = read_topic(kafka_bootstrap, s.alerts_topic, want=n1, timeout_s=30, idle_s=3)
    assert {x["transaction_id"] for x in alerts} == before
    gauge = REGISTRY.get_sample_value("fraud_alert_threshold", {"service": "risk-worker-thr"})
    assert gauge == 1.0  # the worker's live threshold as a metric (served with --metrics-port)
    dead = read_all(kafka_bootstrap, dlq_topic(s.threshold_topic), 1)
    assert dead[0]["error"]["reason"] == "validation" and dead[0]["source_topic"] == s.threshold_topic


def test_financial_risk_two_workers_share_the_partitions_and_hand_state_over(
    kafka_bootstrap: str, kafka_topic, fr_model_dir: Path, fr_data_dir: Path, tmp_path: Path
) -> None:
    """A second worker joins the group mid-stream: the first gives up partitions (writing their state), the
    second restores that state and goes on. Every event is scored, repeated scores are identical, and all
    scores equal one ordered offline replay: customer state moved exactly (terminal state is global). The
    stream is live (the first worker starts before any topic exists, the replay is paced), so this also checks
    that each label produced before a transaction is applied before that transaction is scored."""
    s = _settings("pair", kafka_bootstrap, fr_model_dir, fr_data_dir, kafka_topic)
    topics = {"transactions_topic": s.transactions_topic, "feedback_topic": s.feedback_topic}
    ckpt = tmp_path / "ckpt"  # one folder, as for workers on one host (or a shared volume)
    first = RiskWorker(s, kafka_bootstrap, checkpoint_dir=ckpt)
    second = RiskWorker(s, kafka_bootstrap, checkpoint_dir=ckpt)
    runners = [
        threading.Thread(target=w.run, kwargs={"idle_timeout_s": 120}, daemon=True) for w in (first, second)
    ]
    runners[0].start()
    sent: dict[str, Any] = {}
    # one paced replay (about 6 s), as the handbook streams it; the second worker joins while it flows
    producer = threading.Thread(
        target=lambda: sent.update(
            replay(
                kafka_bootstrap,
                fr_data_dir,
                START,
                END,
                rate=100,
                customers=CUSTOMERS,
                progress=False,
                **topics,
            )  # fmt: skip
        ),
        daemon=True,
    )
    try:
        producer.start()
        deadline = time.monotonic() + 60
        while sum(t[1] for t in first.batch_timings) < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = sum(t[1] for t in first.batch_timings)
        runners[1].start()  # the group rebalances: partitions move to the second worker with their state
        producer.join(timeout=120)
        assert sent, "the replay did not finish"
        total = sent["transactions"]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # every id scored (a count could include repeats)
            got = read_topic(kafka_bootstrap, s.scores_topic, timeout_s=20, idle_s=2)
            if len({x["transaction_id"] for x in got}) >= total:
                break
    finally:
        for w in (first, second):
            w.processor.stop()
        for r in runners:
            r.join(timeout=60)
    scores = read_topic(kafka_bootstrap, s.scores_topic, timeout_s=60, idle_s=4)
    by_id: dict[int, float] = {}
    for x in scores:  # a repeat (events after the last commit at the handover) carries the same score
        assert by_id.setdefault(x["transaction_id"], x["score"]) == x["score"]
    expected = offline_scores(fr_data_dir, fr_model_dir)
    assert set(by_id) == set(expected) and len(by_id) == total
    assert max(abs(by_id[k] - expected[k]) for k in by_id) < 1e-9
    later_first = sum(t[1] for t in first.batch_timings) - before
    later_second = sum(t[1] for t in second.batch_timings)
    assert later_first > 0 and later_second > 0  # both scored events of the second half


def _scores_by_position(bootstrap: str, topic: str) -> dict[tuple[int, int], dict]:
    """Every record of ``topic`` keyed by its (partition, offset) there (read until idle)."""
    consumer = make_consumer(bootstrap, client_id="kill9-reader")
    out: dict[tuple[int, int], dict] = {}
    try:
        deadline = time.monotonic() + 30
        parts: set[int] = set()
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic) or set()
            time.sleep(0 if parts else 0.2)
        assert parts, f"topic {topic} has no partitions"
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 3.0:
            polled = consumer.poll(timeout_ms=300)
            for records in polled.values():
                for r in records:
                    out[(r.partition, r.offset)] = json.loads(r.value)
            if polled:
                idle_since = time.monotonic()
    finally:
        consumer.close()
    return out


def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (-1: none), read without joining it."""
    consumer = make_consumer(bootstrap, group_id=group, client_id="kill9-offsets")
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        out = {}
        for p in sorted(parts):
            c = consumer.committed(TopicPartition(topic, p))
            out[p] = -1 if c is None else int(c)
        return out
    finally:
        consumer.close(autocommit=False)


def test_financial_risk_worker_survives_kill9(
    kafka_bootstrap: str, kafka_topic, fr_model_dir: Path, fr_data_dir: Path, tmp_path: Path
) -> None:
    """kill -9 the worker process four times during a replay (three after it scored new events, one at a
    fixed time after start: during start-up, restore or silent re-reading): no event lost, duplicates
    only of events at or after the committed offset at the crash and with identical scores, and the
    snapshotted state equals one clean ordered replay."""
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
        CHECKPOINT_EVERY_S="1",  # incremental snapshot rounds happen between the kills
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
    seen = 0
    crashes: list[tuple[dict[int, int], dict[int, int]]] = []  # (scores end offsets, committed) per kill
    for kill in range(4):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill == 2:
            time.sleep(11.0)  # about 1 s after it joins (the killed member expires after 10 s): restoring
        else:  # wait until this incarnation has produced new scores, then kill it hard
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                n = len(read_all(kafka_bootstrap, s.scores_topic, 10**9, timeout_s=1.5))
                if n > seen + 30:
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ends: dict[int, int] = {}
        for sp, so in _scores_by_position(kafka_bootstrap, s.scores_topic):
            ends[sp] = max(ends.get(sp, 0), so + 1)
        crashes.append((ends, _committed(kafka_bootstrap, s.worker_group_id, s.transactions_topic)))
        seen = sum(ends.values())  # score records so far
    producer.join()
    final = subprocess.run([*cmd, "--idle-exit-s", "8"], env=env, timeout=300, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    # every record, duplicates included, with its position in risk-scores
    by_pos = _scores_by_position(kafka_bootstrap, s.scores_topic)
    by_id: dict[int, list[dict]] = {}
    for x in by_pos.values():
        by_id.setdefault(x["transaction_id"], []).append(x)
    expected = offline_scores(fr_data_dir, fr_model_dir)
    assert set(by_id) == set(expected)  # none lost
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    for k, v in dups.items():  # re-scored after a crash from the restored state: identical scores
        assert max(abs(x["score"] - v[0]["score"]) for x in v) < 1e-12
        assert abs(v[0]["score"] - expected[k]) < 1e-9

    # a score written again after crash i is of an event at or after the offset committed at that crash
    # (events before it only rebuild the state: their scores were delivered)
    def incarnation(sp: int, so: int) -> int:  # 0 before the first kill, i + 1 after kill i
        return sum(so >= ends.get(sp, 0) for ends, _ in crashes)

    records = sorted(((incarnation(*pos), x) for pos, x in by_pos.items()), key=lambda r: r[0])
    earlier: set[int] = set()  # transactions scored by an earlier incarnation
    rescored, k_prev = 0, 0
    batch: list[int] = []
    for k, x in records:
        if k != k_prev:
            earlier.update(batch)
            batch, k_prev = [], k
        batch.append(x["transaction_id"])
        if x["transaction_id"] in earlier:
            committed = crashes[k - 1][1].get(x["partition"], -1)
            assert x["offset"] >= committed, (x["transaction_id"], x["partition"], x["offset"], committed)
            rescored += 1
    assert rescored == sum(len(v) - 1 for v in dups.values())
    # the snapshotted per-partition state equals one clean ordered replay of the same events
    clean = _clean_engine(fr_data_dir)
    dirs = sorted(ckpt.glob("*-partition-*"))
    assert dirs
    for pdir in dirs:
        restored = FeatureEngine()
        plog = PartitionLog(pdir, int(pdir.name.rsplit("-", 1)[1]))
        assert plog.restore(restored)
        assert not [c for c, o in plog.offset_of.items() if o > plog.floor]  # shutdown wrote all changes
        ids = set(restored.customers)
        got, ref = restored.export_customers(ids), clean.export_customers(ids)
        for key, value in ref.items():
            if key.startswith("pending") or key == "watermark":
                continue
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        got_order, ref_order = np.argsort(got["pending_ids"]), np.argsort(ref["pending_ids"])
        for key in ("pending_ids", "pending_int", "pending_amount"):
            np.testing.assert_array_equal(got[key][got_order], ref[key][ref_order], err_msg=key)


def _clean_engine(data_dir: Path) -> FeatureEngine:
    eng = FeatureEngine()
    for tx in _replay_slice(data_dir, eng):
        eng.process(tx, mode="none")
    return eng


def test_financial_risk_worker_finds_a_late_feedback_topic(
    kafka_bootstrap: str, kafka_topic, fr_model_dir: Path, fr_data_dir: Path, tmp_path: Path
) -> None:
    """Before the first label the feedback topic may not exist. Looking for it is a blocking metadata
    request, so the worker looks on idle polls (every FEEDBACK_RETRY_S) and before a batch only every
    FEEDBACK_RETRY_BUSY_S; once the topic appears, its labels are read."""
    s = _settings("late-fb", kafka_bootstrap, fr_model_dir, fr_data_dir, kafka_topic)
    worker = RiskWorker(s, kafka_bootstrap, checkpoint_dir=tmp_path / "ckpt")
    looks: list[float] = []
    assign = worker._assign_feedback

    def counted() -> None:  # the real lookup, counted
        looks.append(time.monotonic())
        assign()

    worker._assign_feedback = counted  # type: ignore[method-assign]
    try:
        worker._idle()
        assert looks and not worker._feedback_assigned  # no label yet: no topic
        assert worker.drain_feedback() == 0 and len(looks) == 1  # before a batch: not again so soon
        worker._idle()
        assert len(looks) == 1  # nor on an idle poll within FEEDBACK_RETRY_S
        label = {"transaction_id": 7, "label": 1, "known_at": "2018-08-08T00:00:00Z", "customer_id": 1,
                 "terminal_id": 2, "tx_timestamp": "2018-08-01T00:00:00Z", "amount": 12.5}  # fmt: skip
        with JsonProducer(kafka_bootstrap, "late-label") as p:  # the first label creates the topic
            p.send(s.feedback_topic, label, key="1")
            p.flush()
        deadline = time.monotonic() + 30
        while not worker._feedback_assigned and time.monotonic() < deadline:
            worker._feedback_tried -= FEEDBACK_RETRY_S  # an idle poll after the retry interval
            worker._idle()
            time.sleep(0.1)
        assert worker._feedback_assigned and worker.feedback_seen == 0
        assert worker.drain_feedback() == 1 and worker.feedback_seen == 1
    finally:
        worker.processor.close()
        worker.close_readers()
