"""Round trips through the real broker: JSON producer -> StreamProcessor -> output and dead-letter topics,
commits, restart in the same consumer group, handler failures, readiness probe."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from backbone.kafka import (
    JsonProducer,
    Message,
    StreamProcessor,
    dlq_topic,
    kafka_metrics,
    kafka_reachable,
    parse_api_version,
)
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

pytestmark = pytest.mark.kafka

FAST: dict[str, Any] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "poll_timeout_ms": 200}


class Payment(BaseModel):
    id: int
    amount: float


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list[Any]:
    """All records of ``topic`` (without a consumer group): waits for ``expected`` records, then polls
    once more so that unexpected extra records are seen too."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", api_version=parse_api_version())
    try:
        deadline = time.monotonic() + timeout_s
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.2)
        assert partitions, f"topic {topic} does not exist"
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        consumer.seek_to_beginning()
        records: list[Any] = []
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
        return records
    finally:
        consumer.close()


def committed_total(bootstrap: str, group: str, topic: str) -> int:
    """Sum of the committed offsets of ``group`` over the partitions of ``topic``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             api_version=parse_api_version())
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in partitions)
    finally:
        consumer.close(autocommit=False)


def doubling_handler(out_topic: str) -> Callable[[list[Message[Payment]]], list[tuple[str, str | None, Any]]]:
    def handle(batch: list[Message[Payment]]) -> list[tuple[str, str | None, Any]]:
        return [(out_topic, m.key, {"id": m.value.id, "double": m.value.amount * 2, "offset": m.offset})
                for m in batch]

    return handle


def test_roundtrip_dlq_commit_and_restart(kafka_bootstrap: str, kafka_topic: Callable[[str], str]) -> None:
    topic, out, group = kafka_topic("payments"), kafka_topic("doubled"), kafka_topic("group")
    n_valid, first_run = 40, 17
    registry = CollectorRegistry()
    with JsonProducer(kafka_bootstrap, "test-producer", registry=registry) as producer:
        for i in range(n_valid // 2):
            producer.send(topic, Payment(id=i, amount=i + 0.5), key=f"k{i}")
        producer.send(topic, b'{"id": 1, "amount": ', key="malformed")  # invalid JSON
        producer.send(topic, {"id": "not-a-number", "amount": 1.0}, key="invalid")  # fails validation
        for i in range(n_valid // 2, n_valid):
            producer.send(topic, {"id": i, "amount": i + 0.5}, key=f"k{i}")
        producer.flush(30)
    total = n_valid + 2

    # First processor: stops after exactly `first_run` records, committing everything it processed.
    first = StreamProcessor(kafka_bootstrap, topic, group, Payment, doubling_handler(out),
                            max_batch_size=5, registry=registry, **FAST)
    stats = first.run(max_records=first_run)
    assert stats.records == first_run and stats.commits == stats.batches > 1
    assert committed_total(kafka_bootstrap, group, topic) == first_run

    # A new processor in the same group continues from the committed offsets.
    second = StreamProcessor(kafka_bootstrap, topic, group, Payment, doubling_handler(out),
                             max_batch_size=5, registry=registry, **FAST)
    stats2 = second.run(max_records=total - first_run)
    assert stats.dead_lettered + stats2.dead_lettered == 2
    assert stats.outputs + stats2.outputs == n_valid
    assert committed_total(kafka_bootstrap, group, topic) == total

    outputs = [json.loads(r.value) for r in read_topic(kafka_bootstrap, out, n_valid)]
    per_id = Counter(o["id"] for o in outputs)
    assert set(per_id) == set(range(n_valid)), "no loss"
    assert max(per_id.values()) == 1, f"reprocessed after restart: {[k for k, c in per_id.items() if c > 1]}"
    assert all(o["double"] == (o["id"] + 0.5) * 2 for o in outputs)

    dead = {r.key: json.loads(r.value) for r in read_topic(kafka_bootstrap, dlq_topic(topic), 2)}
    assert set(dead) == {b"malformed", b"invalid"}
    malformed, invalid = dead[b"malformed"], dead[b"invalid"]
    assert malformed["error"]["reason"] == "decode" and malformed["error"]["type"] == "JSONDecodeError"
    assert base64.b64decode(malformed["value_base64"]) == b'{"id": 1, "amount": '
    assert malformed["value_text"] == '{"id": 1, "amount": '
    assert invalid["error"]["reason"] == "validation" and invalid["error"]["type"] == "ValidationError"
    assert [e["loc"] for e in invalid["error"]["errors"]] == [["id"]]
    assert json.loads(base64.b64decode(invalid["value_base64"])) == {"id": "not-a-number", "amount": 1.0}
    for entry in (malformed, invalid):
        assert entry["source_topic"] == topic and entry["consumer_group"] == group
        assert entry["offset"] >= 0 and 0 <= entry["partition"] < 4

    metrics = kafka_metrics(registry)
    assert metrics is kafka_metrics(registry), "one set of metric objects per registry"
    consumed = registry.get_sample_value("kafka_records_consumed_total", {"topic": topic, "group": group})
    assert consumed == total
    assert registry.get_sample_value("kafka_records_produced_total", {"topic": out}) == n_valid
    for reason in ("decode", "validation"):
        labels = {"topic": topic, "group": group, "reason": reason}
        assert registry.get_sample_value("kafka_records_dead_lettered_total", labels) == 1
    commits = registry.get_sample_value("kafka_offset_commits_total", {"topic": topic, "group": group})
    assert commits == stats.commits + stats2.commits


def test_handler_error_dead_letters_only_that_record(kafka_bootstrap: str,
                                                     kafka_topic: Callable[[str], str]) -> None:
    topic, out, group = kafka_topic("payments"), kafka_topic("doubled"), kafka_topic("group")
    with JsonProducer(kafka_bootstrap, "test-producer") as producer:
        for i in range(10):  # one key: one partition, so the failing record arrives inside a batch
            producer.send(topic, Payment(id=i, amount=float(i)), key="same")
        producer.flush(30)

    batch_sizes: list[int] = []

    def handler(batch: list[Message[Payment]]) -> list[tuple[str, str | None, Any]]:
        batch_sizes.append(len(batch))
        if any(m.value.id == 7 for m in batch):
            raise ValueError("amount 7 is cursed")
        return [(out, m.key, {"id": m.value.id}) for m in batch]

    registry = CollectorRegistry()
    proc = StreamProcessor(kafka_bootstrap, topic, group, Payment, handler, max_batch_size=50,
                           registry=registry, **FAST)
    stats = proc.run(max_records=10)
    assert max(batch_sizes) > 1 and 1 in batch_sizes, "batch failed, then retried record by record"
    assert stats.dead_lettered == 1 and stats.outputs == 9
    assert committed_total(kafka_bootstrap, group, topic) == 10

    ids = Counter(json.loads(r.value)["id"] for r in read_topic(kafka_bootstrap, out, 9))
    assert ids == Counter({i: 1 for i in range(10) if i != 7})
    (dead,) = read_topic(kafka_bootstrap, dlq_topic(topic), 1)
    entry = json.loads(dead.value)
    assert entry["error"] == {"reason": "handler", "type": "ValueError", "message": "amount 7 is cursed"}
    assert json.loads(entry["value_text"]) == {"id": 7, "amount": 7.0}
    labels = {"topic": topic, "group": group, "reason": "handler"}
    assert registry.get_sample_value("kafka_records_dead_lettered_total", labels) == 1


def test_idle_hook_runs_after_everything_is_committed(kafka_bootstrap: str,
                                                      kafka_topic: Callable[[str], str]) -> None:
    topic, out, group = kafka_topic("payments"), kafka_topic("doubled"), kafka_topic("group")
    with JsonProducer(kafka_bootstrap, "test-producer") as producer:
        for i in range(12):
            producer.send(topic, Payment(id=i, amount=float(i)), key=f"k{i}")
        producer.flush(30)
    seen: list[int] = []  # records committed when each idle call ran

    def on_idle() -> None:
        seen.append(committed_total(kafka_bootstrap, group, topic))
        if len(seen) == 1:
            raise RuntimeError("a failing hook is logged, not fatal")

    proc = StreamProcessor(kafka_bootstrap, topic, group, Payment, doubling_handler(out), max_batch_size=5,
                           on_idle=on_idle, **FAST)
    stats = proc.run(idle_timeout_s=1.5)
    assert stats.records == 12 and stats.outputs == 12
    assert len(seen) >= 2, "called on every empty poll, also after the hook raised"
    assert seen[-1] == 12  # by the time the worker is idle, every handled record is committed


def test_stop_from_another_thread_commits_and_closes(kafka_bootstrap: str,
                                                     kafka_topic: Callable[[str], str]) -> None:
    topic, out, group = kafka_topic("payments"), kafka_topic("doubled"), kafka_topic("group")
    with JsonProducer(kafka_bootstrap, "test-producer") as producer:
        for i in range(5):
            producer.send(topic, Payment(id=i, amount=1.0), key=str(i))
        producer.flush(30)
    seen: list[int] = []

    def handler(batch: list[Message[Payment]]) -> list[tuple[str, str | None, Any]]:
        seen.extend(m.value.id for m in batch)
        return [(out, m.key, {"id": m.value.id}) for m in batch]

    proc = StreamProcessor(kafka_bootstrap, topic, group, Payment, handler, registry=CollectorRegistry(),
                           **FAST)
    thread = proc.run_in_thread()
    deadline = time.monotonic() + 30
    while len(seen) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.stop()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert sorted(seen) == list(range(5))
    assert committed_total(kafka_bootstrap, group, topic) == 5


SIGTERM_WORKER = """
import dataclasses, json, sys, time
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from backbone.kafka import StreamProcessor

class Payment(BaseModel):
    id: int
    amount: float

def handler(batch):
    time.sleep(0.2)
    print("batch", len(batch), flush=True)
    return []

proc = StreamProcessor(sys.argv[1], sys.argv[2], sys.argv[3], Payment, handler, max_batch_size=2,
                       registry=CollectorRegistry(), session_timeout_ms=6000, heartbeat_interval_ms=1000,
                       poll_timeout_ms=200)
proc.install_signal_handlers()
stats = proc.run()
print("stats", json.dumps(dataclasses.asdict(stats)), flush=True)
"""


def test_sigterm_finishes_the_batch_commits_and_exits(kafka_bootstrap: str,
                                                      kafka_topic: Callable[[str], str]) -> None:
    topic, group = kafka_topic("payments"), kafka_topic("group")
    with JsonProducer(kafka_bootstrap, "test-producer") as producer:
        for i in range(40):
            producer.send(topic, Payment(id=i, amount=1.0), key=str(i))
        producer.flush(30)
    worker = subprocess.Popen([sys.executable, "-c", SIGTERM_WORKER, kafka_bootstrap, topic, group],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        for _ in range(2):
            assert worker.stdout.readline().startswith("batch")
        worker.send_signal(signal.SIGTERM)
        rest, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0
    stats = json.loads(rest.strip().splitlines()[-1].removeprefix("stats "))
    assert 2 <= stats["batches"] and stats["records"] < 40, "stopped midway"
    assert stats["commits"] == stats["batches"]
    assert committed_total(kafka_bootstrap, group, topic) == stats["records"]


def test_rebalance_hooks_split_partitions_between_members(kafka_bootstrap: str,
                                                          kafka_topic: Callable[[str], str]) -> None:
    topic, group = kafka_topic("payments"), kafka_topic("group")
    with JsonProducer(kafka_bootstrap, "test-producer") as producer:
        producer.send_and_wait(topic, Payment(id=0, amount=1.0), key="0")  # creates 4 partitions
    events: dict[str, list[tuple[str, set[int]]]] = {"a": [], "b": []}

    def member(name: str) -> StreamProcessor[Payment]:
        def hook(kind: str) -> Callable[[set[TopicPartition]], None]:
            return lambda tps: events[name].append((kind, {tp.partition for tp in tps}))

        return StreamProcessor(kafka_bootstrap, topic, group, Payment, lambda batch: [],
                               registry=CollectorRegistry(), on_partitions_assigned=hook("assigned"),
                               on_partitions_revoked=hook("revoked"), **FAST)

    def latest(name: str) -> set[int]:
        assigned = [parts for kind, parts in events[name] if kind == "assigned"]
        return assigned[-1] if assigned else set()

    a = member("a")
    thread_a = a.run_in_thread()
    deadline = time.monotonic() + 30
    while latest("a") != {0, 1, 2, 3} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert latest("a") == {0, 1, 2, 3}
    b = member("b")
    thread_b = b.run_in_thread()
    deadline = time.monotonic() + 30
    while not (latest("b") and latest("a") | latest("b") == {0, 1, 2, 3} and not latest("a") & latest("b")):
        assert time.monotonic() < deadline, events
        time.sleep(0.1)
    assert ("revoked", {0, 1, 2, 3}) in events["a"], "a checkpoints before giving partitions away"
    for proc, thread in ((a, thread_a), (b, thread_b)):
        proc.stop()
        thread.join(timeout=15)
        assert not thread.is_alive()
    assert events["b"][-1] == ("revoked", latest("b")), "close checkpoints the last assignment"


class Feedback(BaseModel):
    id: int
    fraud: bool


def test_several_topics_with_a_model_each(kafka_bootstrap: str, kafka_topic: Callable[[str], str]) -> None:
    payments, feedback, out, group = (kafka_topic(p) for p in ("payments", "feedback", "joined", "group"))
    with JsonProducer(kafka_bootstrap, "test-producer") as producer:
        for i in range(3):
            producer.send(payments, Payment(id=i, amount=1.0), key=str(i))
            producer.send(feedback, Feedback(id=i, fraud=i == 1), key=str(i))
        producer.send(feedback, Payment(id=9, amount=1.0), key="9")  # valid JSON, wrong schema
        producer.flush(30)

    def handler(batch: list[Message[Any]]) -> list[tuple[str, str | None, Any]]:
        return [(out, m.key, {"topic": m.topic, "kind": type(m.value).__name__}) for m in batch]

    models = {payments: Payment, feedback: Feedback}
    proc: StreamProcessor[Any] = StreamProcessor(
        kafka_bootstrap, [payments, feedback], group, models, handler, registry=CollectorRegistry(), **FAST)
    stats = proc.run(max_records=7)
    assert stats.outputs == 6 and stats.dead_lettered == 1
    kinds = Counter((o["topic"], o["kind"]) for o in (json.loads(r.value) for r in read_topic(
        kafka_bootstrap, out, 6)))
    assert kinds == Counter({(payments, "Payment"): 3, (feedback, "Feedback"): 3})
    (dead,) = read_topic(kafka_bootstrap, dlq_topic(feedback), 1)
    assert json.loads(dead.value)["source_topic"] == feedback
    assert committed_total(kafka_bootstrap, group, payments) + committed_total(kafka_bootstrap, group,
                                                                               feedback) == 7


def test_kafka_reachable_both_ways(kafka_bootstrap: str) -> None:
    ok, reason = kafka_reachable(kafka_bootstrap, timeout_s=5.0)
    assert ok, reason
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    ok, reason = kafka_reachable(f"127.0.0.1:{closed_port}", timeout_s=1.0)
    assert not ok and "refused" in reason.lower()
    ok, reason = kafka_reachable("", timeout_s=1.0)
    assert not ok and reason


def test_prepare_topics_makes_output_topics_known_before_the_first_send(
    kafka_bootstrap: str, kafka_topic: Callable[[str], str]
) -> None:
    """``JsonProducer.prepare_topics`` fetches (on this broker: creates) the topics' metadata up front, and a
    ``StreamProcessor`` does it for its ``output_topics`` when it starts, before any record arrives."""
    topics = [kafka_topic("scores"), kafka_topic("alerts")]
    with JsonProducer(kafka_bootstrap, "test-producer") as producer:
        found = producer.prepare_topics([*topics, topics[0]])
        assert set(found) == set(topics) and all(n >= 1 for n in found.values())
        t0 = time.monotonic()
        producer.send_and_wait(topics[0], {"id": 1})
        assert time.monotonic() - t0 < 5.0
    processor_output = kafka_topic("forecasts")
    proc = StreamProcessor(kafka_bootstrap, kafka_topic("ticks"), kafka_topic("group"), Payment,
                           doubling_handler(processor_output), output_topics=[processor_output], **FAST)
    proc.run(max_batches=0)  # prepares the outputs, then stops before the first poll
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, api_version=parse_api_version())
    try:
        assert all(consumer.partitions_for_topic(t) for t in [*topics, processor_output])
    finally:
        consumer.close()


def test_a_processor_started_before_its_topic_exists_consumes_the_first_records(
    kafka_bootstrap: str, kafka_topic: Callable[[str], str]
) -> None:
    """A processor started before its input topic has records consumes the first ones sent (its input topic
    is prepared before it joins the group; records sent before any commit are read from the earliest
    offset)."""
    topic, out, group = kafka_topic("late"), kafka_topic("late-out"), kafka_topic("group")
    proc = StreamProcessor(kafka_bootstrap, topic, group, Payment, doubling_handler(out), **FAST)
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(stats=proc.run(max_records=3)), daemon=True)
    runner.start()
    time.sleep(2.0)  # the processor has joined its group with no partition of the missing topic
    with JsonProducer(kafka_bootstrap, "test-producer") as producer:
        for i in range(3):
            producer.send(topic, Payment(id=i, amount=float(i)), key=f"k{i}")
        producer.flush(30)
    runner.join(timeout=30.0)
    if runner.is_alive():
        proc.stop()
        runner.join(timeout=10.0)
    assert result.get("stats") is not None and result["stats"].records == 3
    assert sorted(json.loads(r.value)["id"] for r in read_topic(kafka_bootstrap, out, 3)) == [0, 1, 2]
