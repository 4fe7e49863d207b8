"""Kafka helpers shared by the services: JSON producer, validating stream processor with a dead-letter
queue, a readiness probe and Prometheus metrics.

Delivery is at-least-once: a processor sends every output and dead-letter record, waits for all acks
(``acks='all'``) and only then commits the consumed offsets. After a crash, records of the unfinished
batch are processed again; after a graceful stop nothing is processed twice.

Only protocol features that Kafka 0.9 (the local test broker) and current Kafka (docker-compose) both
have are used: no record headers, no admin client, no idempotent or transactional producer. The broker
API version is auto-detected; pass ``api_version`` (e.g. ``"0.9"``) or set ``KAFKA_API_VERSION`` to skip
the probe.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Generic, TypeVar

import pydantic_core
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.client_async import KafkaClient
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError, NoBrokersAvailable
from kafka.producer.future import FutureRecordMetadata, RecordMetadata
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ValidationError

__all__ = [
    "DLQ_SUFFIX",
    "DeadLetter",
    "KafkaMetrics",
    "Message",
    "Output",
    "ProcessorStats",
    "JsonProducer",
    "StreamProcessor",
    "CONSUMER_DEFAULTS",
    "dead_letter_entry",
    "decode_value",
    "dlq_topic",
    "kafka_metrics",
    "kafka_reachable",
    "make_consumer",
    "make_producer",
    "parse_api_version",
    "read_topic",
    "to_json_bytes",
]

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"
DEFAULT_API_VERSION_TIMEOUT_MS = 5000

M = TypeVar("M")
Output = tuple[str, str | None, Any]
"""A handler output: (topic, key, value); value is a pydantic model, a JSON-able object or raw bytes."""


def dlq_topic(topic: str) -> str:
    """Dead-letter topic of ``topic``."""
    return topic + DLQ_SUFFIX


def parse_api_version(value: str | Sequence[int] | None = None) -> tuple[int, ...] | None:
    """``"0.9"`` -> ``(0, 9)``; ``None`` falls back to ``$KAFKA_API_VERSION``; ``""``/``"auto"`` -> None."""
    if value is None:
        value = os.environ.get("KAFKA_API_VERSION")
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    if isinstance(value, str):
        return tuple(int(part) for part in value.strip().split("."))
    return tuple(int(part) for part in value)


def _client_config(
    client_id: str, api_version: str | Sequence[int] | None, api_version_auto_timeout_ms: int
) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "api_version": parse_api_version(api_version),
        "api_version_auto_timeout_ms": api_version_auto_timeout_ms,
    }


# ------------------------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class KafkaMetrics:
    """Prometheus metrics of the Kafka helpers; one instance per registry (see :func:`kafka_metrics`)."""

    consumed: Counter
    produced: Counter
    produce_errors: Counter
    dead_lettered: Counter
    commits: Counter
    batch_seconds: Histogram


_METRICS: dict[int, tuple[CollectorRegistry, KafkaMetrics]] = {}
_METRICS_LOCK = threading.Lock()


def kafka_metrics(registry: CollectorRegistry | None = None) -> KafkaMetrics:
    """The metric objects registered in ``registry`` (default: the global one), created on first use."""
    registry = REGISTRY if registry is None else registry
    with _METRICS_LOCK:
        entry = _METRICS.get(id(registry))
        if entry is not None and entry[0] is registry:
            return entry[1]
        metrics = KafkaMetrics(
            consumed=Counter(
                "kafka_records_consumed",
                "Records polled by stream processors",
                ["topic", "group"],
                registry=registry,
            ),
            produced=Counter(
                "kafka_records_produced", "Records acknowledged by the broker", ["topic"], registry=registry
            ),
            produce_errors=Counter(
                "kafka_produce_errors", "Records the broker did not acknowledge", ["topic"], registry=registry
            ),
            dead_lettered=Counter(
                "kafka_records_dead_lettered",
                "Records sent to the dead-letter topic",
                ["topic", "group", "reason"],
                registry=registry,
            ),
            commits=Counter(
                "kafka_offset_commits", "Successful offset commits", ["topic", "group"], registry=registry
            ),
            batch_seconds=Histogram(
                "kafka_batch_processing_seconds",
                "Poll-to-commit time of one micro-batch",
                ["topic", "group"],
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                registry=registry,
            ),
        )
        _METRICS[id(registry)] = (registry, metrics)
        return metrics


# ------------------------------------------------------------------------------------------- producer
def to_json_bytes(value: Any) -> bytes:
    """Serialise a record value: pydantic models and JSON-able objects as JSON, bytes unchanged."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, BaseModel):
        return value.model_dump_json().encode()
    return pydantic_core.to_json(value)


def _key_bytes(key: str | bytes | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return str(key).encode()


def make_producer(
    bootstrap_servers: str,
    client_id: str,
    *,
    api_version: str | Sequence[int] | None = None,
    linger_ms: int = 5,
    retries: int = 5,
    api_version_auto_timeout_ms: int = DEFAULT_API_VERSION_TIMEOUT_MS,
    **overrides: Any,
) -> KafkaProducer:
    """A ``KafkaProducer`` with ``acks='all'``, bounded retries that keep per-partition order, JSON values
    (see :func:`to_json_bytes`) and ``str`` keys. ``overrides`` are passed to ``KafkaProducer``."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        **_client_config(client_id, api_version, api_version_auto_timeout_ms),
        "acks": "all",
        "retries": retries,
        "retry_backoff_ms": 200,
        "max_in_flight_requests_per_connection": 1,
        "linger_ms": linger_ms,
        "request_timeout_ms": 30000,
        "value_serializer": to_json_bytes,
        "key_serializer": _key_bytes,
    }
    config.update(overrides)
    return KafkaProducer(**config)


class JsonProducer:
    """Thread-safe JSON producer that counts acknowledged and failed records per topic."""

    def __init__(
        self,
        bootstrap_servers: str,
        client_id: str = "backbone-producer",
        *,
        registry: CollectorRegistry | None = None,
        producer: KafkaProducer | None = None,
        **producer_config: Any,
    ) -> None:
        self.producer = producer or make_producer(bootstrap_servers, client_id, **producer_config)
        self._metrics = kafka_metrics(registry)
        self._closed = False

    def send(
        self,
        topic: str,
        value: BaseModel | Mapping[str, Any] | Any,
        key: str | None = None,
        partition: int | None = None,
    ) -> FutureRecordMetadata:
        """Queue one record; the returned future resolves to its ``RecordMetadata``."""
        future = self.producer.send(topic, value=value, key=key, partition=partition)
        future.add_callback(lambda _md: self._metrics.produced.labels(topic).inc())
        future.add_errback(lambda _exc: self._metrics.produce_errors.labels(topic).inc())
        return future

    def send_and_wait(
        self,
        topic: str,
        value: BaseModel | Mapping[str, Any] | Any,
        key: str | None = None,
        timeout_s: float = 30.0,
    ) -> RecordMetadata:
        """Send one record and block until the broker acknowledged it (raises ``KafkaError`` otherwise)."""
        return self.send(topic, value, key).get(timeout=timeout_s)

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued record was acknowledged or failed."""
        self.producer.flush(timeout=timeout_s)

    def prepare_topics(self, topics: Iterable[str]) -> dict[str, int]:
        """Fetch the metadata of ``topics`` now, so that the first record sent to each does not wait for it
        (where the broker creates topics on first use, this creates them). Returns topic -> number of
        partitions. A topic that is not available within ``max_block_ms`` is logged and left out, and the
        remaining ones are not waited for (such a broker does not create topics: they must be created)."""
        found: dict[str, int] = {}
        for topic in dict.fromkeys(topics):
            try:
                found[topic] = len(self.producer.partitions_for(topic) or ())
            except KafkaError as exc:
                log.warning("topic %s is not available (%s: %s); not waiting for the others",
                            topic, type(exc).__name__, exc)  # fmt: skip
                break
        return found

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush and close (idempotent)."""
        if not self._closed:
            self._closed = True
            self.producer.close(timeout=timeout_s)

    def __enter__(self) -> JsonProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------- consumer
CONSUMER_DEFAULTS: dict[str, Any] = {
    # Kafka 0.9 ignores a fetch's total size limit (fetch v1), so one response can hold
    # max_partition_fetch_bytes for every partition of the node; kafka-python's default 1 MB frame
    # limit then rejects it ("Invalid frame length") and the consumer stalls on a backlog.
    "max_partition_fetch_bytes": 1024 * 1024,
    "receive_message_max_bytes": 256 * 1024 * 1024,
}


def make_consumer(
    bootstrap_servers: str,
    *topics: str,
    group_id: str | None = None,
    client_id: str = "backbone-consumer",
    auto_offset_reset: str = "earliest",
    api_version: str | Sequence[int] | None = None,
    api_version_auto_timeout_ms: int = DEFAULT_API_VERSION_TIMEOUT_MS,
    **overrides: Any,
) -> KafkaConsumer:
    """A ``KafkaConsumer`` that works against Kafka 0.9 and current Kafka: no auto-commit, a frame
    limit large enough for a fetch from every partition, the API version from ``$KAFKA_API_VERSION``
    when set. Subscribes to ``topics`` when given (needs ``group_id``); else assign partitions yourself."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        **_client_config(client_id, api_version, api_version_auto_timeout_ms),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": auto_offset_reset,
        **CONSUMER_DEFAULTS,
    }
    config.update(overrides)
    return KafkaConsumer(*topics, **config)


def read_topic(
    bootstrap_servers: str,
    topic: str,
    *,
    want: int | None = None,
    timeout_s: float = 30.0,
    match: Callable[[Any], bool] | None = None,
    idle_s: float = 2.0,
) -> list[Any]:
    """Read a topic's JSON values from the beginning of every partition, without a consumer group.

    Stops when ``want`` values (that satisfy ``match``, if given) were read, or, with ``want=None``,
    once nothing new arrived for ``idle_s``; always by ``timeout_s``. For tools, demos and tests."""
    consumer = make_consumer(bootstrap_servers, client_id=f"reader-{topic}")
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        partitions: set[int] = set()
        while not partitions and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                time.sleep(0.2)
        if not partitions:
            return out
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        last_new = time.monotonic()
        while time.monotonic() < deadline and (want is None or len(out) < want):
            polled = consumer.poll(timeout_ms=300)
            for records in polled.values():
                for record in records:
                    value = json.loads(record.value)
                    if match is None or match(value):
                        out.append(value)
            if polled:
                last_new = time.monotonic()
            elif want is None and time.monotonic() - last_new > idle_s:
                break
        return out
    finally:
        consumer.close()


def read_before(
    bootstrap_servers: str,
    ends: Mapping[TopicPartition, int],
    max_records: int,
    *,
    timeout_s: float = 30.0,
    client_id: str = "backbone-history",
) -> list[ConsumerRecord]:
    """The last ``max_records`` records before each partition's offset in ``ends`` (fewer where the log starts
    later), in offset order per partition, read without a consumer group: for a processor that rebuilds
    in-memory state from its own input log when it is assigned a partition. Raises ``TimeoutError`` when
    the records cannot be read within ``timeout_s``."""
    wanted = {tp: end for tp, end in ends.items() if end > 0}
    if not wanted:
        return []
    consumer = make_consumer(bootstrap_servers, client_id=client_id, metrics_enabled=False)
    out: list[ConsumerRecord] = []
    try:
        consumer.assign(list(wanted))
        begins = consumer.beginning_offsets(list(wanted))
        todo = {}
        for tp, end in wanted.items():
            start = max(begins.get(tp, 0), end - max_records)
            if start < end:
                consumer.seek(tp, start)
                todo[tp] = end
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sorted(map(str, todo))}: not read up to their ends in {timeout_s} s")
            for tp, records in consumer.poll(timeout_ms=200, max_records=5000).items():
                if tp in todo:
                    out.extend(r for r in records if r.offset < todo[tp])
            for tp in [tp for tp, end in todo.items() if consumer.position(tp) >= end]:
                consumer.pause(tp)
                del todo[tp]
        return out
    finally:
        consumer.close()


@dataclass(frozen=True, slots=True)
class Message(Generic[M]):
    """A consumed record whose value decoded and validated."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: M
    timestamp: int | None
    raw: bytes = field(repr=False)

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


@dataclass
class ProcessorStats:
    """Counts of one :meth:`StreamProcessor.run`."""

    batches: int = 0
    records: int = 0
    valid: int = 0
    outputs: int = 0
    dead_lettered: int = 0
    commits: int = 0
    delivery_failures: int = 0


@dataclass
class _Sent:
    """A handled batch whose outputs were sent: what its acknowledgement and commit need."""

    polled: Mapping[TopicPartition, list[ConsumerRecord]]
    futures: list[FutureRecordMetadata]
    dead: list[tuple[ConsumerRecord, str, BaseException]]
    n_records: int
    n_valid: int
    n_outputs: int
    t0: float
    output_topics: list[str] = field(default_factory=list)  # of the futures after the dead letters


class DeadLetter(Exception):
    """A record that cannot be used: ``reason`` ("decode", "validation", ...) and the underlying error."""

    def __init__(self, reason: str, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.reason = reason
        self.exc = exc


def decode_value(raw: bytes | None, model: type[BaseModel] | None) -> Any:
    """A record value as ``model`` (or plain JSON when None); raises :class:`DeadLetter` with reason
    "decode" (no value, not UTF-8 JSON) or "validation" (JSON that does not fit the schema)."""
    if raw is None:
        raise DeadLetter("decode", ValueError("record has no value"))
    try:
        # fast path: pydantic parses and validates the bytes in one pass (no Python dict in between)
        return json.loads(raw) if model is None else model.model_validate_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeadLetter("decode", exc) from exc
    except ValidationError:
        # slow path for rejected records only: the same two steps as before, so a dead letter says
        # whether the bytes were not JSON ("decode") or the JSON did not fit the schema ("validation")
        try:
            parsed = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeadLetter("decode", exc) from exc
        try:
            return model.model_validate(parsed)  # type: ignore[union-attr]
        except ValidationError as exc:
            raise DeadLetter("validation", exc) from exc


def dead_letter_entry(
    record: ConsumerRecord, reason: str, exc: BaseException, group: str | None
) -> dict[str, Any]:
    """The dead-letter record of ``record``: the error, where the record was (topic, partition, offset,
    key, timestamp), who rejected it (``group``) and its value (text when UTF-8, always base64)."""
    raw = record.value
    text: str | None = None
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    return {
        "error": _error_info(reason, exc),
        "source_topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": _decode_key(record.key),
        "timestamp": _timestamp(record),
        "consumer_group": group,
        "value_base64": None if raw is None else base64.b64encode(raw).decode("ascii"),
        "value_text": text,
        "dead_lettered_at_ms": int(time.time() * 1000),
    }


def _error_info(reason: str, exc: BaseException) -> dict[str, Any]:
    info: dict[str, Any] = {"reason": reason, "type": type(exc).__name__, "message": str(exc)[:2000]}
    if isinstance(exc, ValidationError):  # the message is a summary; the details are in "errors"
        info["message"] = f"{exc.error_count()} validation error(s) for {exc.title}"
        errors = exc.errors(include_url=False, include_input=False)
        info["errors"] = json.loads(json.dumps(errors, default=str))
    return info


def _decode_key(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", errors="replace")


def _timestamp(record: ConsumerRecord) -> int | None:
    ts = record.timestamp
    return ts if ts is not None and ts >= 0 else None


Handler = Callable[[list[Message[Any]]], Iterable[Output] | None]
PartitionsHook = Callable[[set[TopicPartition]], None]


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, assigned: PartitionsHook | None, revoked: PartitionsHook | None) -> None:
        self._assigned = assigned
        self._revoked = revoked

    def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("partitions revoked: %s", sorted(revoked))
        if self._revoked is not None:
            self._revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned: %s", sorted(assigned))
        if self._assigned is not None:
            self._assigned(set(assigned))


class StreamProcessor(Generic[M]):
    """Consume ``topic`` (one or several) in consumer group ``group_id``, validate each JSON value with
    ``model`` (or ``model[record.topic]`` when a mapping; ``None``: plain decoded JSON) and pass
    micro-batches of valid :class:`Message` s to ``handler``, which returns outputs ``(topic, key, value)``.

    Records that do not decode, do not validate, or make the handler raise go to ``<source topic>.dlq``
    (or ``dead_letter_topic``); a failing batch is retried record by record, so only the failing records
    are dead-lettered. Outputs and dead-letter records are acknowledged before the batch offsets are
    committed; if delivery fails the batch is not committed but polled and handled again.

    Offsets are committed after every batch, so on a rebalance no processed, uncommitted records exist:
    ``on_partitions_revoked`` may checkpoint per-partition state and ``on_partitions_assigned`` restore it
    (both run inside ``poll`` on the processing thread; ``self.consumer.seek`` may be used there).
    ``on_idle`` runs on the processing thread after a poll returned nothing (everything handled is then
    delivered and committed): the place for background work such as state snapshots.
    The handler may run twice for records of a failing batch, so it must not mutate state before it can
    fail (or must be idempotent). On Kafka < 0.10.1 a batch must finish within ``session_timeout_ms``
    (newer brokers: ``max_poll_interval_ms``, default 300 s, settable through ``consumer_config``).

    ``output_topics``: the topics the handler writes to (dead-letter topics too, if wanted); :meth:`run`
    fetches their metadata before the first poll (:meth:`JsonProducer.prepare_topics`).

    ``async_commits=True`` still waits for each batch's acknowledgements before committing its offsets, but
    sends the commit without waiting for the coordinator's answer (a round trip per batch saved); rebalances,
    idle polls and shutdown end with one synchronous commit, so the guarantee above holds there. A commit
    lost in a crash only means more records after the last commit are handled again.

    ``pipeline=True`` (which implies ``async_commits``) overlaps delivery with work: batch *k*'s outputs are
    sent (no linger, no flush), batch *k + 1* is polled and handled while they travel, and only then are
    *k*'s acknowledgements awaited and its offsets committed, without waiting for the coordinator's answer
    (still each batch's commit after its own acknowledgements, in order). So when the handler runs, the
    previous batch's outputs may not be acknowledged yet; a handler that saves state which must match
    delivered outputs calls :meth:`settle` first (acknowledgements, then one synchronous commit).
    Rebalances, idle polls and shutdown settle too. If a delivery fails, that batch and the one handled
    after it are polled again.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str | Sequence[str],
        group_id: str,
        model: type[M] | Mapping[str, type[Any]] | None,
        handler: Handler,
        *,
        client_id: str | None = None,
        dead_letter_topic: str | None = None,
        auto_offset_reset: str = "earliest",
        max_batch_size: int = 100,
        poll_timeout_ms: int = 500,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int = 3000,
        send_timeout_s: float = 30.0,
        commit_timeout_ms: int = 30000,
        delivery_retry_backoff_s: float = 1.0,
        pipeline: bool = False,
        async_commits: bool = False,
        output_topics: Sequence[str] = (),
        on_partitions_assigned: PartitionsHook | None = None,
        on_partitions_revoked: PartitionsHook | None = None,
        on_idle: Callable[[], None] | None = None,
        producer: JsonProducer | None = None,
        registry: CollectorRegistry | None = None,
        api_version: str | Sequence[int] | None = None,
        api_version_auto_timeout_ms: int = DEFAULT_API_VERSION_TIMEOUT_MS,
        consumer_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.topics = [topic] if isinstance(topic, str) else list(topic)
        self.topic = ",".join(self.topics)  # metric label of batch-level metrics
        self.group_id = group_id
        self.models: Mapping[str, type[Any] | None] = (
            dict(model) if isinstance(model, Mapping) else dict.fromkeys(self.topics, model)
        )
        missing = set(self.topics) - set(self.models)
        if missing:
            raise ValueError(f"no model for topics {sorted(missing)}")
        self.handler = handler
        self.on_idle = on_idle  # called after a poll that returned nothing (and the settle that follows it)
        self.dead_letter_topic = dead_letter_topic
        self.max_batch_size = max_batch_size
        self.poll_timeout_ms = poll_timeout_ms
        self.send_timeout_s = send_timeout_s
        self.delivery_retry_backoff_s = delivery_retry_backoff_s
        self.stats = ProcessorStats()
        self._metrics = kafka_metrics(registry)
        self._stop = threading.Event()
        self._closed = False
        self._previous_handlers: dict[int, Any] = {}
        self._pending_offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        self.pipeline = pipeline
        self.async_commits = async_commits or pipeline
        # topics the handler writes to: their metadata is fetched when run() starts, not by the first batch
        self.output_topics = list(output_topics)
        self._outputs_prepared = False
        self._in_flight: _Sent | None = None  # pipeline: the handled batch whose outputs are being sent
        self._rewound: dict[TopicPartition, int] = {}  # partitions sought back in this batch
        self._issued: dict[TopicPartition, int] = {}  # pipeline: the last offset sent for commit
        self._unsynced: dict[TopicPartition, int] = {}  # ... not yet confirmed by a synchronous commit
        self._commit_results: deque[tuple[Any, Any]] = deque()  # answers to asynchronous commits
        self._user_on_revoked = on_partitions_revoked
        self.commit_timeout_ms = commit_timeout_ms
        client_id = client_id or f"{group_id}-{os.getpid()}"
        config: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers,
            **_client_config(client_id, api_version, api_version_auto_timeout_ms),
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": auto_offset_reset,
            "max_poll_records": max_batch_size,
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": heartbeat_interval_ms,
            **CONSUMER_DEFAULTS,
        }
        config.update(consumer_config or {})
        self._owns_producer = producer is None
        self.producer = producer or JsonProducer(
            bootstrap_servers,
            f"{client_id}-producer",
            registry=registry,
            api_version=api_version,
            api_version_auto_timeout_ms=api_version_auto_timeout_ms,
            # without pipeline every batch ends with a flush; with it nothing flushes, so records leave at
            # once (no linger) and batch up behind the request in flight
            **({"linger_ms": 0} if pipeline else {}),
        )
        try:
            # input topics known (where the broker creates topics on first use: created) before joining the
            # group: a member that joins before its topic exists is assigned no partition of it, and one demo
            # run's consumer stayed without any for over a minute after the topic appeared
            self.producer.prepare_topics(self.topics)
            self.consumer = KafkaConsumer(**config)
            self.consumer.subscribe(
                self.topics, listener=_RebalanceListener(on_partitions_assigned, self._on_revoked)
            )
        except BaseException:
            if self._owns_producer:
                self.producer.close()
            raise

    # -- control
    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch is committed (thread- and signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Make ``signals`` call :meth:`stop` (main thread only); previous handlers return on close."""

        def handle(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping after the current batch", signal.Signals(signum).name)
            self.stop()

        for sig in signals:
            self._previous_handlers.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, handle)

    def run_in_thread(self, name: str | None = None, **run_kwargs: Any) -> threading.Thread:
        """Start :meth:`run` in a daemon thread; :meth:`stop` then ``join`` it to shut down."""
        thread = threading.Thread(
            target=self.run, kwargs=run_kwargs, name=name or f"kafka-{self.group_id}", daemon=True
        )
        thread.start()
        return thread

    # -- main loop
    def run(
        self,
        *,
        max_batches: int | None = None,
        max_records: int | None = None,
        idle_timeout_s: float | None = None,
        close: bool = True,
    ) -> ProcessorStats:
        """Process batches until :meth:`stop`, ``max_batches`` / ``max_records`` (exact), or no record for
        ``idle_timeout_s``; then close consumer and producer (unless ``close=False``). Returns stats."""
        if self.output_topics and not self._outputs_prepared:
            # otherwise the first batch waits for each output topic's metadata (creation, where the broker
            # creates topics on first use: about 0.4 s per topic on the local 0.9 broker), and so does every
            # record queued behind that batch
            self.producer.prepare_topics(self.output_topics)
            self._outputs_prepared = True
        last_record = time.monotonic()
        batches = records = 0
        try:
            while not self._stop.is_set():
                if max_batches is not None and batches >= max_batches:
                    break
                limit = self.max_batch_size
                if max_records is not None:
                    if records >= max_records:
                        break
                    limit = min(limit, max_records - records)
                polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=limit)
                if not polled:
                    self.settle()  # nothing new: deliver and commit the batch in flight now
                    if self.on_idle is not None:
                        try:
                            self.on_idle()  # background work (e.g. state snapshots) while nothing waits
                        except Exception:
                            log.exception("on_idle hook failed (processing goes on)")
                    if idle_timeout_s is not None and time.monotonic() - last_record > idle_timeout_s:
                        break
                    continue
                last_record = time.monotonic()
                if self._process_batch(polled):
                    batches += 1
                    records += sum(len(rs) for rs in polled.values())
        finally:
            try:
                self.settle()
            finally:
                if close:
                    self.close()
        return self.stats

    def _process_batch(self, polled: Mapping[TopicPartition, list[ConsumerRecord]]) -> bool:
        """Handle one polled batch and send its outputs; then (or, with ``pipeline``, after the next
        batch was handled) wait for their acknowledgements and commit. False if delivery failed: the
        batch is not committed and is polled again."""
        t0 = time.perf_counter()
        self._rewound = {}
        batch = [record for records in polled.values() for record in records]
        for tp, records in polled.items():
            self._metrics.consumed.labels(tp.topic, self.group_id).inc(len(records))
        valid: list[Message[Any]] = []
        valid_records: list[ConsumerRecord] = []
        dead: list[tuple[ConsumerRecord, str, BaseException]] = []
        for record in batch:
            try:
                valid.append(self._decode(record))
                valid_records.append(record)
            except DeadLetter as dl:
                dead.append((record, dl.reason, dl.exc))
        outputs: list[Output] = []
        if valid:
            try:
                outputs = self._call_handler(valid)
            except Exception as exc:
                if len(valid) == 1:
                    dead.append((valid_records[0], "handler", exc))
                else:
                    log.warning(
                        "handler failed on a batch of %d (%s: %s); retrying record by record",
                        len(valid),
                        type(exc).__name__,
                        exc,
                    )
                    for message, record in zip(valid, valid_records, strict=True):
                        try:
                            outputs.extend(self._call_handler([message]))
                        except Exception as one_exc:
                            dead.append((record, "handler", one_exc))
        sent = _Sent(polled, [], dead, len(batch), len(valid), len(outputs), t0)
        if self._rewound:  # the batch in flight failed while the handler settled it: poll this one again
            self._rewind(None, [sent])
            return False
        try:
            sent.futures = [self._dead_letter(record, reason, exc) for record, reason, exc in dead]
            # the raw producer (no callback per record): produced records are counted per batch on success
            send = self.producer.producer.send
            sent.futures += [send(topic, value=value, key=key) for topic, key, value in outputs]
            sent.output_topics = [topic for topic, _, _ in outputs]
        except KafkaError as exc:
            previous, self._in_flight = self._in_flight, None
            self._rewind(exc, [s for s in (previous, sent) if s is not None])
            return False
        if not self.pipeline:
            return self._finish(sent)
        previous, self._in_flight = self._in_flight, sent
        return previous is None or self._finish(previous)

    def settle(self, commit: bool = True) -> bool:
        """Wait until the batch in flight (``pipeline`` mode) is acknowledged; afterwards every output of
        the batches handled so far is delivered. With ``commit`` also commit them all synchronously (else
        its commit is sent asynchronously, as usual). True unless a delivery failed (then that batch and any
        later one are polled again). The handler may call it, e.g. before it saves state that must match
        delivered outputs."""
        sent, self._in_flight = self._in_flight, None
        if sent is not None and not self._finish(sent, commit_async=not commit):
            return False
        if commit and self._unsynced:  # asynchronous commits may still be on their way: one synchronous one
            assigned = self.consumer.assignment()
            offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in self._unsynced.items() if tp in assigned}
            self._unsynced.clear()
            self._commit(offsets)
        return True

    def _commit_async(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """``async_commits`` / ``pipeline``: commit without waiting for the coordinator's answer (a failed
        commit's offsets go with the next commit unless a later one was issued for that partition)."""
        self._absorb_commit_results()
        offsets = {**self._pending_offsets, **offsets}
        self._pending_offsets.clear()
        for tp, om in offsets.items():
            self._issued[tp] = om.offset
        self.consumer.commit_async(dict(offsets), callback=lambda o, r: self._commit_results.append((o, r)))

    def _absorb_commit_results(self) -> None:
        while self._commit_results:
            offsets, result = self._commit_results.popleft()
            if isinstance(result, Exception):
                log.warning("asynchronous offset commit failed (%s: %s)", type(result).__name__, result)
                assigned = self.consumer.assignment()
                for tp, om in offsets.items():
                    if self._issued.get(tp) == om.offset and tp in assigned:
                        self._pending_offsets.setdefault(tp, om)
            else:
                self.stats.commits += 1
                self._metrics.commits.labels(self.topic, self.group_id).inc()

    def _finish(self, sent: _Sent, commit_async: bool = True) -> bool:
        """Wait for ``sent``'s acknowledgements, then commit its offsets (``async_commits`` / ``pipeline``:
        asynchronously, or, with ``commit_async=False``, not here: :meth:`settle` commits them
        synchronously)."""
        produced = self.producer._metrics
        outputs = sent.futures[len(sent.futures) - len(sent.output_topics) :]
        try:
            self._await(sent.futures)
        except KafkaError as exc:
            for future, topic in zip(outputs, sent.output_topics, strict=True):
                if future.is_done and future.failed():
                    produced.produce_errors.labels(topic).inc()
            later, self._in_flight = self._in_flight, None
            self._rewind(exc, [s for s in (sent, later) if s is not None])
            return False
        for topic, n in collections.Counter(sent.output_topics).items():
            produced.produced.labels(topic).inc(n)
        for record, reason, _ in sent.dead:
            self._metrics.dead_lettered.labels(record.topic, self.group_id, reason).inc()
        offsets = {tp: OffsetAndMetadata(rs[-1].offset + 1, "", -1) for tp, rs in sent.polled.items()}
        if not self.async_commits:
            self._commit(offsets)
        else:
            self._unsynced.update({tp: om.offset for tp, om in offsets.items()})
            if commit_async:
                self._commit_async(offsets)
        self.stats.batches += 1
        self.stats.records += sent.n_records
        self.stats.valid += sent.n_valid
        self.stats.outputs += sent.n_outputs
        self.stats.dead_lettered += len(sent.dead)
        self._metrics.batch_seconds.labels(self.topic, self.group_id).observe(time.perf_counter() - sent.t0)
        return True

    def _rewind(self, exc: BaseException | None, batches: list[_Sent]) -> None:
        """Seek every partition of ``batches`` back to its first uncommitted record (poll them again)."""
        if exc is not None:
            self.stats.delivery_failures += 1
            log.error(
                "delivery failed (%s: %s); batch not committed, re-polling it in %.1fs",
                type(exc).__name__,
                exc,
                self.delivery_retry_backoff_s,
            )
        for sent in batches:
            for tp, records in sent.polled.items():
                if tp not in self._rewound or records[0].offset < self._rewound[tp]:
                    self._rewound[tp] = records[0].offset
                    self.consumer.seek(tp, records[0].offset)
        if exc is not None:
            self._stop.wait(self.delivery_retry_backoff_s)

    def _commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata]) -> bool:
        """Commit ``offsets`` plus any earlier ones whose commit failed; True on success."""
        self._pending_offsets.update(offsets)
        if not self._pending_offsets:
            return True
        try:
            self.consumer.commit(dict(self._pending_offsets), timeout_ms=self.commit_timeout_ms)
        except CommitFailedError as exc:
            # The group rebalanced meanwhile; the partitions' new owners re-process them (at-least-once).
            log.warning("offset commit rejected after a rebalance: %s", exc)
            self._pending_offsets.clear()
            return False
        except KafkaError as exc:
            log.error("offset commit failed (%s: %s); retrying with the next commit", type(exc).__name__, exc)
            return False
        for tp, om in self._pending_offsets.items():
            self._issued[tp] = om.offset
        self._pending_offsets.clear()
        self.stats.commits += 1
        self._metrics.commits.labels(self.topic, self.group_id).inc()
        return True

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.settle()  # the batch in flight is delivered and committed before its partitions go
        if any(tp in revoked for tp in self._pending_offsets):
            self._commit({})
        self._pending_offsets.clear()
        if self._user_on_revoked is not None:
            self._user_on_revoked(revoked)

    def _call_handler(self, messages: list[Message[Any]]) -> list[Output]:
        """Run the handler; outputs are checked and serialised here so a bad one counts as its failure."""
        outputs = []
        for out in self.handler(messages) or ():
            if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], str)):
                raise TypeError(f"handler outputs must be (topic, key, value) tuples, got {out!r:.200}")
            outputs.append((out[0], out[1], to_json_bytes(out[2])))
        return outputs

    def _decode(self, record: ConsumerRecord) -> Message[Any]:
        raw = record.value
        obj = decode_value(raw, self.models[record.topic])
        return Message(
            record.topic,
            record.partition,
            record.offset,
            _decode_key(record.key),
            obj,
            _timestamp(record),
            raw,
        )

    def _dead_letter(self, record: ConsumerRecord, reason: str, exc: BaseException) -> FutureRecordMetadata:
        target = self.dead_letter_topic or dlq_topic(record.topic)
        entry = dead_letter_entry(record, reason, exc, self.group_id)
        log.warning(
            "dead-lettering %s[%d]@%d to %s: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            target,
            type(exc).__name__,
            str(exc)[:300],
        )
        return self.producer.send(target, entry, _decode_key(record.key))

    def _await(self, futures: list[FutureRecordMetadata]) -> None:
        """Block until every future is acknowledged; raises the first ``KafkaError``."""
        if not futures:
            return
        if not self.pipeline:  # (pipeline: later batches' records are queued too; wait for these only)
            self.producer.flush(self.send_timeout_s)
        deadline = time.monotonic() + self.send_timeout_s
        for future in futures:
            future.get(timeout=max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Commit what is pending, call ``on_partitions_revoked`` with the current assignment, close the
        consumer (leaving the group) and, if owned, flush and close the producer."""
        if self._closed:
            return
        self._closed = True
        try:
            self.settle()
            if self._pending_offsets:
                self._commit({})
            assigned = set(self.consumer.assignment())
            if assigned and self._user_on_revoked is not None:  # like a rebalance: checkpoint state
                try:
                    self._user_on_revoked(assigned)
                except Exception:
                    log.exception("on_partitions_revoked failed during close")
            self.consumer.close(autocommit=False)
        finally:
            if self._owns_producer:
                self.producer.close()
            for sig, previous in self._previous_handlers.items():
                if threading.current_thread() is threading.main_thread():
                    signal.signal(sig, previous)
            self._previous_handlers.clear()

    def __enter__(self) -> StreamProcessor[M]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ readiness
_REACHABLE_CACHE: dict[tuple[str, tuple[int, ...] | None], tuple[float, tuple[bool, str]]] = {}
_REACHABLE_LOCK = threading.Lock()


def _split_bootstrap(bootstrap_servers: str) -> list[tuple[str, int]]:
    hosts = []
    for item in bootstrap_servers.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or "]" in port:
            host, port = item, "9092"
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def kafka_reachable(
    bootstrap_servers: str,
    timeout_s: float = 2.0,
    *,
    api_version: str | Sequence[int] | None = None,
    cache_ttl_s: float = 0.0,
) -> tuple[bool, str]:
    """Readiness probe: can a broker of ``bootstrap_servers`` answer a metadata request within
    ``timeout_s``? Returns ``(ok, reason)`` and never raises. With ``cache_ttl_s > 0`` a result younger
    than that is returned without contacting the cluster."""
    version = parse_api_version(api_version)
    key = (bootstrap_servers, version)
    if cache_ttl_s > 0:
        with _REACHABLE_LOCK:
            cached = _REACHABLE_CACHE.get(key)
        if cached is not None and time.monotonic() - cached[0] < cache_ttl_s:
            return cached[1]
    result = _probe(bootstrap_servers, timeout_s, version)
    if cache_ttl_s > 0:
        with _REACHABLE_LOCK:
            _REACHABLE_CACHE[key] = (time.monotonic(), result)
    return result


def _probe(bootstrap_servers: str, timeout_s: float, version: tuple[int, ...] | None) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout_s
    try:
        hosts = _split_bootstrap(bootstrap_servers)
    except ValueError as exc:
        return False, f"invalid bootstrap servers {bootstrap_servers!r}: {exc}"
    if not hosts:
        return False, "no bootstrap servers configured"
    errors = []
    for host, port in hosts:  # a cheap TCP check gives a precise reason for the common failure
        try:
            with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())):
                break
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc.strerror or exc}")
    else:
        return False, "cannot connect: " + "; ".join(errors)
    timeout_ms = max(100, int((deadline - time.monotonic()) * 1000))
    client = None
    try:
        client = KafkaClient(
            bootstrap_servers=bootstrap_servers,
            client_id="backbone-readiness",
            api_version=version,
            api_version_auto_timeout_ms=timeout_ms,
            request_timeout_ms=max(timeout_ms, 1000),
            metadata_max_age_ms=300000,
        )
        future = client.cluster.request_update()
        client.poll(timeout_ms=max(0, int((deadline - time.monotonic()) * 1000)), future=future)
        if future.succeeded():
            brokers = client.cluster.brokers()
            return True, f"{len(brokers)} broker(s) answered metadata (api {client.config['api_version']})"
        if future.failed():
            return False, f"metadata request failed: {type(future.exception).__name__}: {future.exception}"
        return False, f"no metadata response within {timeout_s:g}s"
    except NoBrokersAvailable:
        return False, f"no broker at {bootstrap_servers} answered within {timeout_s:g}s"
    except Exception as exc:  # a probe reports, it does not raise
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        if client is not None:
            client.close()
