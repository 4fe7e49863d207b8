"""StreamProcessor(pipeline=True) against the real broker: batch k's outputs are acknowledged and committed
after batch k + 1 was handled, never before their own acknowledgements; ``settle`` from the handler;
restart in the same group neither loses nor repeats a record."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from backbone.kafka import JsonProducer, Message, StreamProcessor, make_consumer, read_topic
from kafka import TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

pytestmark = pytest.mark.kafka

FAST: dict[str, Any] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "poll_timeout_ms": 200}


class Payment(BaseModel):
    id: int
    amount: float


def _committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = make_consumer(bootstrap, group_id=group, client_id="pipeline-test-offsets")
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in parts)
    finally:
        consumer.close(autocommit=False)


@pytest.mark.parametrize("mode", ["pipeline", "async_commits"])
def test_processor_commits_after_acks_and_restarts(kafka_bootstrap: str, kafka_topic, mode: str) -> None:
    """``pipeline``: batch k is acknowledged and committed after batch k + 1 was handled. ``async_commits``:
    each batch is acknowledged before its commit, which does not wait for the coordinator. Both settle on
    exit, and a second member continues without loss or duplicates."""
    topic, out, group = kafka_topic("pay"), kafka_topic("out"), kafka_topic("grp")
    n, first_run = 60, 23
    with JsonProducer(kafka_bootstrap, "pipeline-producer", registry=CollectorRegistry()) as producer:
        for i in range(n):
            producer.send(topic, Payment(id=i, amount=float(i)), key=f"k{i % 7}")
        producer.flush(30)
    seen_unsettled: list[bool] = []
    ahead: list[int] = []  # committed offsets minus the records finished before the batch (never > 0)

    def run(limit: int, settle_every: int, base: int) -> StreamProcessor:
        calls = 0

        def handle(batch: list[Message[Payment]]) -> list[tuple[str, str | None, Any]]:
            nonlocal calls
            calls += 1
            seen_unsettled.append(proc._in_flight is not None)  # the previous batch still in flight
            if mode == "async_commits":
                ahead.append(_committed(kafka_bootstrap, group, topic) - (base + proc.stats.records))
            elif calls % settle_every == 0:
                assert proc.settle() and proc._in_flight is None
                # everything handled before this batch is delivered and committed
                assert _committed(kafka_bootstrap, group, topic) == base + proc.stats.records
            return [(out, m.key, {"id": m.value.id, "offset": m.offset}) for m in batch]

        proc = StreamProcessor(
            kafka_bootstrap, topic, group, Payment, handle, max_batch_size=4, registry=CollectorRegistry(),
            pipeline=mode == "pipeline", async_commits=True, **FAST,
        )  # fmt: skip
        proc.run(max_records=limit)
        return proc

    first = run(first_run, settle_every=3, base=0)
    assert first.stats.records == first_run and first.stats.batches > 3 and first.stats.commits > 0
    assert _committed(kafka_bootstrap, group, topic) == first_run  # the last batch settled on exit
    if mode == "pipeline":
        assert any(seen_unsettled)  # batches were handled while the previous one was in flight
    else:
        assert not any(seen_unsettled) and ahead and max(ahead) <= 0
    second = run(n - first_run, settle_every=5, base=first_run)
    assert second.stats.records == n - first_run
    assert _committed(kafka_bootstrap, group, topic) == n
    per_id = Counter(x["id"] for x in read_topic(kafka_bootstrap, out, want=n + 1, timeout_s=15, idle_s=2))
    assert set(per_id) == set(range(n)) and max(per_id.values()) == 1

