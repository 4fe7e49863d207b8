"""Kafka stream worker: ``python -m services.financial_risk.worker``.

Joins consumer group ``risk-scorer`` on ``transactions`` (keyed by customer id), scores each
micro-batch with the shared feature engine and LightGBM, and writes every event's score to
``risk-scores``, the events at or above the live threshold to ``risk-alerts`` and malformed or
unscorable events (with the reason) to ``transactions.dlq``. Offsets are committed only after
all outputs are acknowledged (backbone.kafka.StreamProcessor). SIGTERM finishes the current
batch, checkpoints and leaves the group.

State: customer state is owned per ``transactions`` partition and snapshotted incrementally under
``<checkpoint_dir>/<topic>-partition-<p>/`` (``services.financial_risk.state_log``): every
``checkpoint_every_s`` a snapshot round writes the customers changed since, in steps of about
``checkpoint_step_ms`` (as many customers as the measured cost per customer allows, at most
``checkpoint_chunk``) before a batch that does not find the worker behind, or while no event waits;
each customer with the input offset its state reflects.
Snapshots are independent of offset commits (those follow the outputs' acknowledgements, as
always). On (re)assignment the worker restores the snapshot, seeks to its floor and re-reads:
events already in a customer's restored state are skipped, events before the group's committed
offset update the state silently (their scores were delivered), and scoring resumes at the
committed offset. So a crash loses no event, counts none twice in the state, and re-emits scores
(identical ones) only for events after the last commit. Terminal state is global: every worker
reads all partitions of ``risk-feedback`` (no group) and applies labels in event time (see
docs/financial_risk.md).
"""

from __future__ import annotations

import argparse
import collections
import gc
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import prometheus_client
from backbone.kafka import (
    DeadLetter,
    Message,
    StreamProcessor,
    dead_letter_entry,
    decode_value,
    dlq_topic,
    kafka_metrics,
    make_consumer,
)
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from pydantic import BaseModel

from services.financial_risk.app.core.config import Settings
from services.financial_risk.app.model import RiskModels, load_models
from services.financial_risk.events import FeedbackEvent, ThresholdCommand, TransactionEvent
from services.financial_risk.features import FeatureEngine, Transaction
from services.financial_risk.scoring import FraudScore, FraudScorer
from services.financial_risk.state_log import PartitionLog
from services.financial_risk.threshold import ThresholdController

log = logging.getLogger("services.financial_risk.worker")

# How often a worker looks for a feedback topic that does not exist yet (the lookup is a metadata request that
# blocks, up to ~90 ms on a loaded machine): on idle polls, where it delays no event, and before batches.
FEEDBACK_RETRY_S = 5.0
FEEDBACK_RETRY_BUSY_S = 60.0
CHECKPOINT_CHUNK = 100  # customers a snapshot step writes before one batch, at most
CHECKPOINT_STEP_MS = 4.0  # time a snapshot step may take before one batch (sized by the measured cost)
MIN_STEP_CUSTOMERS = 8  # a step writes at least this many (progress even when a customer costs more)
STEP_MAX_BACKLOG = 64  # a batch larger than this means the worker is behind: no snapshot step before it
MAX_LIVE_CHUNKS = 128  # beyond this many snapshot files a partition's oldest one is rewritten
THRESHOLD_POLL_S = 0.25  # how often a worker looks for threshold changes (before a batch or when idle)
ANCHOR_READ_TIMEOUT_S = 10.0  # restore: longest wait for the snapshot's last event (then restored unchecked)
BATCH_TIMINGS_KEPT = 100_000  # per-batch phase timings kept for diagnosis (``RiskWorker.batch_timings``)


# a handled batch: start (perf_counter), events, seconds in the snapshot step, labels, scoring, the handler
BatchTiming = tuple[float, int, float, float, float, float]


def batch_phases(timings: list[BatchTiming], since: float) -> dict[str, Any]:
    """p50 / p99 / max of the worker's per-batch phases (ms) for batches started after ``since``
    (``perf_counter``): events per batch, the snapshot step, draining labels, scoring, the whole handler,
    and ``outside`` = from the handler's end to the next batch's start (delivery, commit, poll)."""
    rows = [t for t in timings if t[0] >= since]
    if len(rows) < 2:
        return {}
    a = np.array(rows)
    phases = {
        "events": a[:, 1],
        "snapshot_ms": a[:, 2] * 1e3,
        "feedback_ms": a[:, 3] * 1e3,
        "scoring_ms": a[:, 4] * 1e3,
        "handler_ms": a[:, 5] * 1e3,
        "outside_ms": (a[1:, 0] - a[:-1, 0] - a[:-1, 5]) * 1e3,
    }
    out: dict[str, Any] = {"batches": len(rows)}
    for name, v in phases.items():
        out[name] = [round(float(np.percentile(v, 50)), 2), round(float(np.percentile(v, 99)), 2),
                     round(float(v.max()), 2)]  # fmt: skip
    return out


def _reader(bootstrap: str, name: str) -> KafkaConsumer:
    """One of the worker's own readers (labels, their end offsets, threshold changes, snapshot checks): no
    group, and without kafka-python's client metrics, which are exported nowhere and cost CPU on every request
    (a ListOffsets call: 0.20 -> 0.16 ms of CPU, 0.60 -> 0.39 ms of wall time on the local broker)."""
    return make_consumer(bootstrap, client_id=f"risk-{name}-{os.getpid()}", metrics_enabled=False)


Polled = dict[TopicPartition, list[ConsumerRecord]]
M = TypeVar("M", bound=BaseModel)


def _read_up_to(
    consumer: KafkaConsumer,
    ends: dict[TopicPartition, int],
    apply: Callable[[Polled], int],
    max_polls: int,
    poll_ms: int = 20,
) -> tuple[int, bool]:
    """Poll ``consumer`` until its position reaches ``ends`` on every partition, giving each poll's records to
    ``apply`` (which returns how many it used); (records used, whether the ends were reached)."""
    n = 0
    for _ in range(max_polls):
        if all(consumer.position(tp) >= end for tp, end in ends.items()):
            return n, True
        n += apply(consumer.poll(timeout_ms=poll_ms, max_records=5000))
    return n, all(consumer.position(tp) >= end for tp, end in ends.items())


@dataclass
class _Replay:
    """A restored partition being re-read from its snapshot floor."""

    floor: int
    skip: dict[int, int]  # customer -> offset its restored state reflects (when above the floor)
    committed: int | None = None  # the group's committed offset (asked before the first batch)
    end: int = 0  # offset from which nothing is skipped or silent any more


class RiskWorker:
    """One stream worker: feature state per owned partition, global terminal state, model."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        models: RiskModels | None = None,
        checkpoint_dir: Path | None = None,
        checkpoint_every_s: float | None = None,
        max_batch_size: int = 200,
        checkpoint_chunk: int = CHECKPOINT_CHUNK,
        checkpoint_step_ms: float = CHECKPOINT_STEP_MS,
        pipeline: bool = False,
    ) -> None:
        self.settings = settings
        self.models = models or load_models(settings)
        self.engine = FeatureEngine()
        threshold = ThresholdController(
            settings.service_name,
            initial=self.models.fraud.threshold,
            mode=settings.threshold_mode,
            alert_budget=settings.alert_budget,
            target_precision=settings.target_precision,
            window=settings.threshold_window,
        )
        self.scorer = FraudScorer(self.engine, threshold, settings.service_name)
        self.scorer.warm.done = True
        cdir = checkpoint_dir or (
            Path(settings.checkpoint_dir)
            if settings.checkpoint_dir
            else Path(settings.model_dir).parent / "runs" / "financial_risk" / settings.worker_group_id
        )
        self.checkpoint_dir = Path(cdir)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_every_s = checkpoint_every_s or settings.checkpoint_every_s
        self._last_checkpoint = time.monotonic()
        self.checkpoint_chunk = checkpoint_chunk  # most customers written before one batch
        self.checkpoint_step_s = checkpoint_step_ms / 1000.0
        self._s_per_customer = 2e-4  # running estimate of a step's cost per customer (export + write)
        self._round: dict[int, int] | None = None  # snapshot round in progress: partition -> its end offset
        self.checkpoints_written = 0  # snapshot rounds completed
        self.checkpoint_failures = 0
        self.logs: dict[int, PartitionLog] = {}  # partition -> its incremental snapshot files
        self._replay: dict[int, _Replay] = {}  # restored partitions still re-reading delivered events
        self.events_rebuilt = 0  # events applied to the state without output (after a restore)
        self.snapshot_chunks = 0  # snapshot files written
        self.snapshot_max_s = 0.0  # longest single chunk write (scoring waits for it)
        self.snapshot_steps_deferred = 0  # steps put off because the worker was behind
        # per handled batch: (start, events, snapshot step s, feedback s, scoring s, handler s), for diagnosis
        self.batch_timings: collections.deque[BatchTiming] = collections.deque(maxlen=BATCH_TIMINGS_KEPT)
        self.owned: dict[int, set[int]] = {}  # partition -> customer ids
        self.next_offset: dict[int, int] = {}  # partition -> next offset the state reflects
        self.last_event: dict[int, tuple[int, int]] = {}  # partition -> (offset, id) of its newest event
        self.snapshots_discarded: list[tuple[int, str]] = []  # (partition, reason): chunks of another topic
        self._bootstrap = bootstrap
        self._verifier: KafkaConsumer | None = None  # reads a snapshot's anchor event on restore
        self.topic = settings.transactions_topic
        self.feedback = _reader(bootstrap, "feedback")
        self._feedback_assigned = False
        self._feedback_tried = -math.inf  # monotonic time of the last attempt to assign the feedback topic
        self.feedback_incomplete = 0  # drains that stopped before the labels' end offsets (max_polls)
        # end offsets on a connection that never holds a fetch: the broker answers a connection's requests in
        # order, so behind a consumer's fetch that waits for new records a ListOffsets call waits too (up to
        # fetch_max_wait_ms; 405 ms seen for the labels' consumer)
        self._offsets = _reader(bootstrap, "end-offsets")
        self.feedback_seen = 0
        self.feedback_invalid = 0  # malformed labels (dead-lettered)
        self.control = _reader(bootstrap, "threshold")
        self._control_polled = -math.inf
        self._control_tried = -math.inf
        self.threshold_commands = 0  # threshold changes applied (risk-threshold)
        self.processor: StreamProcessor[TransactionEvent] = StreamProcessor(
            bootstrap,
            self.topic,
            settings.worker_group_id,
            TransactionEvent,
            self.handle,
            max_batch_size=max_batch_size,
            on_partitions_assigned=self._assigned,
            on_partitions_revoked=self._revoked,
            on_idle=self._idle,  # snapshot steps also while no event waits
            # off by default: overlapping batch k's acknowledgements with batch k + 1 did not measurably help
            # (docs/financial_risk.md), and a failed delivery then re-polls two batches instead of one
            pipeline=pipeline,
            # offsets still follow the acknowledgements, but the commit does not wait for the coordinator: a
            # round trip per batch (0.65 ms of a 6.8 ms cycle at 2,000 ev/s) leaves the stream's path
            async_commits=True,
            output_topics=[
                settings.scores_topic,
                settings.alerts_topic,
                dlq_topic(self.topic),
                dlq_topic(settings.feedback_topic),
            ],
        )

    # ------------------------------------------------------------------ feedback
    def _assign_feedback(self) -> None:
        parts = self.feedback.partitions_for_topic(self.settings.feedback_topic)
        if not parts:
            return
        tps = [TopicPartition(self.settings.feedback_topic, p) for p in sorted(parts)]
        self.feedback.assign(tps)
        self.feedback.seek_to_beginning(*tps)
        self._feedback_assigned = True

    def _try_assign_feedback(self, every_s: float) -> bool:
        """Assign the feedback topic if it exists, asking at most every ``every_s`` (the metadata request
        blocks); True once assigned."""
        if not self._feedback_assigned and time.monotonic() - self._feedback_tried >= every_s:
            self._feedback_tried = time.monotonic()
            self._assign_feedback()
        return self._feedback_assigned

    def _apply_feedback(self, polled: Polled) -> int:
        """Labels into the feature engine (at their known time) and the threshold's precision window."""
        n = 0
        for fb in self._decoded(polled, FeedbackEvent):
            self.engine.add_feedback(
                fb.transaction_id,
                fb.label,
                int(fb.known_at.timestamp()),
                terminal_id=fb.terminal_id,
                tx_ts=int(fb.tx_timestamp.timestamp()) if fb.tx_timestamp else None,
                amount=fb.amount,
            )
            self.scorer.threshold.feedback(fb.transaction_id, fb.label)
            n += 1
        return n

    def _decoded(self, polled: Polled, model: type[M]) -> Iterator[M]:
        """The records of ``polled`` as ``model``; a malformed one is dead-lettered instead."""
        for records in polled.values():
            for rec in records:
                try:
                    yield decode_value(rec.value, model)
                except DeadLetter as dl:
                    self._dead_letter_unassigned(rec, dl)

    def drain_feedback(self, max_polls: int = 200) -> int:
        """Apply every label the broker had taken when this call began (labels enter the features at their
        known time): a label produced before a transaction is in the engine when that transaction is scored.

        The end offsets are asked fresh, one ListOffsets round trip per batch on a connection of its own: the
        high-water mark of the last fetch response can be older than the transaction just polled, and a label
        produced in between was then applied after it (up to the ninth session: one of 595 scores differed
        from an ordered replay in two of three runs of
        ``test_financial_risk_two_workers_share_the_partitions_and_hand_state_over``)."""
        # the topic may not exist yet (no label so far): looked for on idle polls, and before a batch only
        # every FEEDBACK_RETRY_BUSY_S
        if not self._try_assign_feedback(FEEDBACK_RETRY_BUSY_S):
            return 0
        ends = self._offsets.end_offsets(list(self.feedback.assignment()))
        n, reached = _read_up_to(self.feedback, ends, self._apply_feedback, max_polls)
        if not reached:
            self.feedback_incomplete += 1
            log.warning("labels not caught up after %d polls: this batch is scored without some", max_polls)
        self.feedback_seen += n
        return n

    def _dead_letter_unassigned(self, record: ConsumerRecord, dl: DeadLetter) -> None:
        """A malformed label or threshold command goes to ``<its topic>.dlq`` with the reason, never silently
        dropped. Every worker reads those topics whole (no group), so each one reports it, and again after a
        restart: the copies carry the same source partition and offset, on which a reader of the dead
        letters dedupes."""
        if record.topic == self.settings.feedback_topic:
            self.feedback_invalid += 1
        topic = dlq_topic(record.topic)
        group = self.settings.worker_group_id
        log.warning("dead-lettering %s[%d]@%d to %s: %s", record.topic, record.partition, record.offset,
                    topic, str(dl.exc)[:300])  # fmt: skip
        entry = dead_letter_entry(record, dl.reason, dl.exc, group)
        future = self.processor.producer.send(topic, entry, key=entry["key"])
        future.add_errback(lambda exc: log.error("label dead letter to %s not delivered: %s", topic, exc))
        kafka_metrics().dead_lettered.labels(record.topic, group, dl.reason).inc()

    # ------------------------------------------------------------ threshold commands
    def _assign_threshold_topic(self) -> bool:
        """Read ``risk-threshold`` from its beginning; False if it is not there (looked for again later). The
        first look asks through the producer, which creates the topic where the broker creates topics on first
        use (and waits up to ``max_block_ms`` where it does not); later looks only read the metadata."""
        first = self._control_tried == -math.inf
        self._control_tried = time.monotonic()
        topic = self.settings.threshold_topic
        if first:
            self.processor.producer.prepare_topics([topic])
        parts = self.control.partitions_for_topic(topic)
        if not parts:
            log.warning("threshold topic %s not found; looking again later", topic)
            return False
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.control.assign(tps)
        self.control.seek_to_beginning(*tps)
        return True

    def _apply_commands(self, polled: Polled) -> int:
        """Threshold changes into the live controller, in order (invalid ones dead-lettered)."""
        applied = 0
        for cmd in self._decoded(polled, ThresholdCommand):
            state = self.scorer.threshold.set(
                value=cmd.value, mode=cmd.mode, alert_budget=cmd.alert_budget,
                target_precision=cmd.target_precision,
            )  # fmt: skip
            applied += 1
            log.info("threshold change %s from %s (%s) applied: %s", cmd.command_id, cmd.issued_by,
                     cmd.issued_at.isoformat(), state)  # fmt: skip
        return applied

    def apply_threshold_commands(
        self, catch_up: bool = False, retry_every_s: float = FEEDBACK_RETRY_S
    ) -> int:
        """Apply the threshold changes published since the last look (at most every ``THRESHOLD_POLL_S``
        unless ``catch_up``, which reads up to the topic's end, as after assigning the topic: all changes
        before the first event, the latest in force); returns how many were applied."""
        now = time.monotonic()
        if not self.control.assignment():
            if now - self._control_tried < retry_every_s or not self._assign_threshold_topic():
                return 0
            catch_up = True
        elif not catch_up and now - self._control_polled < THRESHOLD_POLL_S:
            return 0
        self._control_polled = now
        if catch_up:
            ends = self._offsets.end_offsets(list(self.control.assignment()))
            applied, _ = _read_up_to(self.control, ends, self._apply_commands, max_polls=150, poll_ms=200)
        else:
            applied = self._apply_commands(self.control.poll(timeout_ms=0, max_records=1000))
        self.threshold_commands += applied
        return applied

    # --------------------------------------------------------------- partitions
    def _log_dir(self, partition: int) -> Path:
        return self.checkpoint_dir / f"{self.topic}-partition-{partition}"

    def checkpoint(self, partitions: set[int] | None = None) -> None:
        """Write every changed customer of ``partitions`` (default: all owned) now, one chunk each
        (partition revocation and shutdown: the state then matches the delivered outputs)."""
        wanted = partitions if partitions is not None else set(self.logs)
        for p in sorted(wanted):
            plog = self.logs.get(p)
            if plog is not None and p in self.next_offset:
                self._write_chunk(p, plog, list(plog.dirty), step=False)

    def _write_chunk(self, p: int, plog: PartitionLog, customers: list[int], step: bool = True) -> int:
        t0 = time.perf_counter()
        n = plog.write(self.engine, customers, self.next_offset[p], self.last_event.get(p))
        if n:
            self.snapshot_chunks += 1
            if step:  # (not the shutdown's all-at-once chunk)
                took = time.perf_counter() - t0
                self.snapshot_max_s = max(self.snapshot_max_s, took)
                self._s_per_customer = 0.7 * self._s_per_customer + 0.3 * took / n
        return n

    def _step_size(self) -> int:
        """Customers the next snapshot step may write: ``checkpoint_step_ms`` at the measured cost."""
        fit = int(self.checkpoint_step_s / max(self._s_per_customer, 1e-7))
        return max(MIN_STEP_CUSTOMERS, min(self.checkpoint_chunk, fit))

    def _snapshot_step(self, batch_size: int = 0) -> None:
        """Write the customers that fit in ``checkpoint_step_ms`` (:meth:`_step_size`; the oldest changes
        first): one bounded step of an incremental snapshot. A round starts every ``checkpoint_every_s``
        and covers every customer changed before it started; it is spread over as many batches as it
        needs, so scoring never waits for a whole snapshot. Before it writes, every earlier batch's outputs
        are acknowledged (``settle``). Before a batch of more than ``STEP_MAX_BACKLOG`` events (the worker is
        behind, e.g. after a pause) the step waits, so the backlog drains first, unless the round has run
        for longer than ``checkpoint_every_s`` already."""
        now = time.monotonic()
        if self._round is None:
            if now - self._last_checkpoint < self.checkpoint_every_s:
                return
            self._last_checkpoint = now
            self._round = {p: self.next_offset[p] for p in self.logs if p in self.next_offset}
        if batch_size > STEP_MAX_BACKLOG and now - self._last_checkpoint < self.checkpoint_every_s:
            self.snapshot_steps_deferred += 1
            return
        # a chunk must hold only state whose outputs were acknowledged: the batch in flight first (its commit
        # may land later: a restore skips a customer's events below its chunk offset, see _classify)
        if not self.processor.settle(commit=False):
            return
        budget = self._step_size()
        done = True
        for p, until in self._round.items():
            plog = self.logs.get(p)
            if plog is None or p not in self.next_offset:
                continue
            todo = []
            for c, first in plog.dirty.items():
                if first >= until or len(todo) >= budget:
                    break
                todo.append(c)
            if len(plog.members) > MAX_LIVE_CHUNKS and len(todo) < budget:
                todo += plog.oldest_chunk_members()[: budget - len(todo)]  # retire the oldest file
            if todo:
                budget -= self._write_chunk(p, plog, todo)
            if plog.dirty and next(iter(plog.dirty.values())) < until:
                done = False
        if done:
            self._round = None
            self.checkpoints_written += 1

    def _try_snapshot_step(self, batch_size: int = 0) -> None:
        """:meth:`_snapshot_step`; a failure is counted and logged, and scoring goes on (the next retries)."""
        try:
            self._snapshot_step(batch_size)
        except Exception:
            self.checkpoint_failures += 1
            log.exception("snapshot step failed (scoring goes on; the next step retries)")

    def _idle(self) -> None:
        """Nothing polled: a snapshot step or a look for a missing feedback topic now costs no event any
        latency (no-op outside a round / once assigned)."""
        self._try_assign_feedback(FEEDBACK_RETRY_S)
        self.apply_threshold_commands()
        if not self._replay:
            self._try_snapshot_step()

    def _stale_reason(self, tp: TopicPartition, anchor: tuple[int, int]) -> str | None:
        """Why the snapshot whose newest event is ``anchor`` (offset, transaction id) is not of this topic,
        or None if it is (Kafka 0.9 has no topic ids: a new broker or a re-created topic reuses offsets)."""
        offset, tx_id = anchor
        if self._verifier is None:
            self._verifier = _reader(self._bootstrap, "snapshot-check")
        c = self._verifier
        begin, end = c.beginning_offsets([tp])[tp], c.end_offsets([tp])[tp]
        if end <= offset:
            return f"the partition ends at offset {end}; the snapshot reflects the event at offset {offset}"
        if begin > offset:
            log.warning("partition %d: the snapshot's last event (offset %d) is gone (log starts at %d): "
                        "restored unchecked", tp.partition, offset, begin)  # fmt: skip
            return None
        c.assign([tp])
        c.seek(tp, offset)
        deadline = time.monotonic() + ANCHOR_READ_TIMEOUT_S
        while time.monotonic() < deadline:
            for records in c.poll(timeout_ms=500, max_records=1).values():
                for rec in records:
                    if rec.offset != offset:
                        continue
                    try:
                        found: int | str = TransactionEvent.model_validate_json(rec.value).transaction_id
                    except ValueError:
                        found = "a malformed record"
                    if found != tx_id:
                        return f"offset {offset} holds transaction {found}, the snapshot's event was {tx_id}"
                    return None
        log.warning("partition %d: the snapshot's last event (offset %d) could not be read within %.0f s: "
                    "restored unchecked", tp.partition, offset, ANCHOR_READ_TIMEOUT_S)  # fmt: skip
        return None

    def _discard_stale_snapshot(self, plog: PartitionLog, tp: TopicPartition) -> bool:
        """Move the partition's chunks aside if they were written from another topic incarnation (True)."""
        anchor = plog.newest_anchor()
        reason = self._stale_reason(tp, anchor) if anchor is not None else None
        if reason is None:
            return False
        stale = plog.dir.with_name(f"{plog.dir.name}.stale-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        plog.dir.rename(stale)
        self.snapshots_discarded.append((tp.partition, reason))
        log.warning("partition %d: snapshot not of this topic (%s); moved to %s, the partition is scored "
                    "from its beginning", tp.partition, reason, stale)  # fmt: skip
        return True

    def _assigned(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            if tp.topic != self.topic or tp.partition in self.owned:
                continue
            p = tp.partition
            plog = self.logs[p] = PartitionLog(self._log_dir(p), p)
            if self._discard_stale_snapshot(plog, tp):
                # the group's committed offset may be of the old topic too: score everything (duplicates at
                # worst, never a lost event)
                self.owned[p] = set()
                self._replay[p] = _Replay(0, {}, committed=-1)
                self.processor.consumer.seek_to_beginning(tp)
            elif plog.restore(self.engine):
                self.owned[p] = set(plog.chunk_of)
                self.next_offset[p] = plog.floor
                if plog.anchor is not None:
                    self.last_event[p] = plog.anchor
                skip = {c: o for c, o in plog.offset_of.items() if o > plog.floor}
                self._replay[p] = _Replay(plog.floor, skip)
                # every event before the floor is in the restored state; re-read from there
                self.processor.consumer.seek(tp, plog.floor)
                log.info("partition %d restored: %d customers, floor %d", p, len(plog.chunk_of), plog.floor)
            else:
                # no snapshot: the state reflects none of this partition, so consume it from the start
                # (events before the group's committed offset only rebuild the state, see _replay)
                self.owned[p] = set()
                self._replay[p] = _Replay(0, {})
                self.processor.consumer.seek_to_beginning(tp)

    def _revoked(self, tps: set[TopicPartition]) -> None:
        parts = {tp.partition for tp in tps if tp.topic == self.topic}
        self.checkpoint(parts)
        for p in parts:
            self.engine.drop_customers(self.owned.pop(p, set()))
            self.next_offset.pop(p, None)
            self.last_event.pop(p, None)
            self.logs.pop(p, None)
            self._replay.pop(p, None)
        self._round = None

    def _resolve_replays(self) -> None:
        """The group's committed offset of each restored partition (asked outside the rebalance callback):
        events below it were delivered before, so they only rebuild the state."""
        for p, r in self._replay.items():
            if r.committed is None:
                tp = TopicPartition(self.topic, p)
                committed = self.processor.consumer.committed(tp)
                end = self._offsets.end_offsets([tp])[tp] if committed is not None else 0
                if committed is not None and committed > end:  # an offset of an older topic of this name
                    log.warning("partition %d: committed %d beyond the end %d: ignored", p, committed, end)
                    committed = None
                r.committed = -1 if committed is None else int(committed)
                r.end = max([r.committed, *r.skip.values()])
                log.info("partition %d: silent replay until offset %d, scoring from there", p, r.committed)

    def _classify(self, messages: list[Message[TransactionEvent]]) -> tuple[list, list]:
        """(silent, scored) messages; events already in the restored state are only counted."""
        silent: list[Message[TransactionEvent]] = []
        scored: list[Message[TransactionEvent]] = []
        replay = self._replay
        for m in messages:
            r = replay.get(m.partition)
            if r is not None:
                if m.offset < r.skip.get(m.value.customer_id, r.floor):
                    self._advance_offset(m)  # in the restored state, its output delivered before
                    continue
                if m.offset < r.committed:  # type: ignore[operator]
                    silent.append(m)
                    continue
            scored.append(m)
        return silent, scored

    def _advance_offset(self, m: Message[TransactionEvent]) -> None:
        p = m.partition
        self.owned.setdefault(p, set()).add(m.value.customer_id)
        if m.offset >= self.next_offset.get(p, 0):
            self.next_offset[p] = m.offset + 1
            self.last_event[p] = (m.offset, m.value.transaction_id)

    def _apply(self, m: Message[TransactionEvent]) -> None:
        """Bookkeeping of an event whose customer state was updated (or rejected) now."""
        self._advance_offset(m)
        plog = self.logs.get(m.partition)
        if plog is not None:
            plog.mark(m.value.customer_id, m.offset)

    def _rebuild(self, messages: list[Message[TransactionEvent]]) -> None:
        """State updates without output: events whose scores were delivered before a restart."""
        txs = [
            Transaction(
                v.transaction_id, v.customer_id, v.terminal_id, int(v.timestamp.timestamp()), float(v.amount)
            )
            for v in (m.value for m in messages)
        ]
        # an id already in the state or an event out of order was dead-lettered the first time: skipped again
        self.engine.process_batch(txs)
        for m in messages:
            self._apply(m)
        self.events_rebuilt += len(messages)

    # ------------------------------------------------------------------ handler
    def handle(self, messages: list[Message[TransactionEvent]]) -> list[tuple[str, str | None, Any]]:
        """Score one micro-batch; never raises after touching the state (errors become DLQ records)."""
        t_start = time.perf_counter()
        self._resolve_replays()  # before touching the state; blocks until the broker answers
        self._try_snapshot_step(len(messages))  # the earlier batches are acknowledged: the state matches them
        t_snapshot = time.perf_counter()
        self.drain_feedback()
        self.apply_threshold_commands(retry_every_s=FEEDBACK_RETRY_BUSY_S)
        t_feedback = time.perf_counter()
        n_events = len(messages)
        if self._replay:
            silent, messages = self._classify(messages)
            if silent:
                self._rebuild(silent)
            for p in [p for p, r in self._replay.items() if self.next_offset.get(p, 0) >= r.end]:
                del self._replay[p]
                log.info("partition %d: replay done at offset %d", p, self.next_offset.get(p, 0))
            if not messages:
                return []
        txs = [
            Transaction(
                m.value.transaction_id,
                m.value.customer_id,
                m.value.terminal_id,
                int(m.value.timestamp.timestamp()),
                float(m.value.amount),
            )
            for m in messages
        ]
        t0 = time.perf_counter()
        results = self.scorer.score(
            self.models, txs, update=True, path="kafka", method=self.settings.reason_method
        )
        t_scored = time.perf_counter()
        scoring_ms = (t_scored - t0) * 1000.0
        now_ms = time.time() * 1000.0
        out: list[tuple[str, str | None, Any]] = []
        for m, r in zip(messages, results, strict=True):
            self._apply(m)
            key = m.key or str(m.value.customer_id)
            if isinstance(r, FraudScore):
                # the ScoreEvent schema as a plain dict: the same JSON bytes without a pydantic model per
                # event (tests validate the records against ScoreEvent)
                ev = {
                    "transaction_id": r.transaction_id,
                    "customer_id": m.value.customer_id,
                    "terminal_id": m.value.terminal_id,
                    "timestamp": m.value.timestamp,
                    "score": r.score,
                    "decision": r.decision,
                    "threshold": r.threshold,
                    "reasons": r.reasons,
                    "reason_method": r.reason_method,
                    "model_version": r.model_version,
                    "latency_ms": (now_ms - m.value.produced_at_ms) if m.value.produced_at_ms else None,
                    "scoring_ms": scoring_ms,
                    "partition": m.partition,
                    "offset": m.offset,
                }
                out.append((self.settings.scores_topic, key, ev))
                if r.decision == "alert":
                    out.append((self.settings.alerts_topic, key, ev))
            else:
                out.append(
                    (
                        dlq_topic(self.topic),
                        key,
                        {
                            "error": {"reason": "unscorable", "type": type(r).__name__, "message": str(r)},
                            "source_topic": m.topic,
                            "partition": m.partition,
                            "offset": m.offset,
                            "value_text": m.raw.decode("utf-8", errors="replace"),
                            "consumer_group": self.settings.worker_group_id,
                        },
                    )
                )
        self.batch_timings.append(
            (t_start, n_events, t_snapshot - t_start, t_feedback - t_snapshot, t_scored - t0,
             time.perf_counter() - t_start)
        )  # fmt: skip
        return out

    def start(self) -> None:
        """What comes before the first poll: the feedback topic assigned (its metadata request may block while
        the broker creates it) and every threshold change so far applied."""
        if not self._feedback_assigned:
            # asking for the topic through the producer creates it where the broker creates topics on first
            # use: a worker that started before the first label must not score events without the labels
            # produced meanwhile (it would find the topic only on a later look, FEEDBACK_RETRY_S)
            self.processor.producer.prepare_topics([self.settings.feedback_topic])
            self._feedback_tried = time.monotonic()
            self._assign_feedback()
        if self._feedback_assigned:
            # connections and start positions now, not on the first batch (a first-batch stall of about 0.3 s
            # delayed every event queued behind it in `make demo`)
            tps = list(self.feedback.assignment())
            self._offsets.end_offsets(tps)
            for tp in tps:
                self.feedback.position(tp)
        self.apply_threshold_commands(catch_up=True)

    def close_readers(self) -> None:
        """Close the consumers of the topics read whole (feedback, threshold, snapshot checks)."""
        self.feedback.close()
        self._offsets.close()
        self.control.close()
        if self._verifier is not None:
            self._verifier.close()

    def run(self, **kwargs: Any) -> Any:
        # the model and the (warmed) feature state live as long as the worker: keep them out of the
        # garbage collector's full passes (one over them took about 0.27 s, a stall of the stream)
        gc.collect()
        gc.freeze()
        try:
            self.start()
            return self.processor.run(**kwargs)
        finally:
            self.close_readers()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--max-batch", type=int, default=200)
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="acknowledge batch k while batch k + 1 is scored (off by default)",
    )
    p.add_argument("--idle-exit-s", type=float, default=None, help="exit after this long without records")
    p.add_argument(
        "--checkpoint-step-ms",
        type=float,
        default=CHECKPOINT_STEP_MS,
        help="time one snapshot step may take before a batch (the step is sized by the measured cost)",
    )
    p.add_argument(
        "--warm-until",
        default=None,
        help="before consuming, fill the feature state from the dataset (WARM_FROM .. this day), e.g. "
        "2018-08-08 for a demo that replays later days; partitions with a checkpoint use the checkpoint",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if not settings.kafka_bootstrap_servers:
        print("KAFKA_BOOTSTRAP_SERVERS is not set", file=sys.stderr)
        return 2
    worker = RiskWorker(
        settings,
        settings.kafka_bootstrap_servers,
        checkpoint_dir=args.checkpoint_dir,
        max_batch_size=args.max_batch,
        checkpoint_step_ms=args.checkpoint_step_ms,
        pipeline=args.pipeline,
    )
    if args.warm_until:
        status = worker.scorer.warm_from_dataset(
            settings.data_dir, settings.warm_from or "2018-04-01", args.warm_until, settings.warm_customers
        )
        if status.error:
            log.error("warm-up failed: %s", status.error)
            return 1
        log.info("feature state warmed from the dataset: %d events", status.events)
    if settings.worker_metrics_port:
        prometheus_client.start_http_server(settings.worker_metrics_port)  # threshold gauge, scores, Kafka
        log.info("metrics on port %d", settings.worker_metrics_port)
    worker.processor.install_signal_handlers((signal.SIGTERM, signal.SIGINT))
    log.info("risk worker up: model %s, group %s", worker.models.fraud.version, settings.worker_group_id)
    stats = worker.run(idle_timeout_s=args.idle_exit_s)
    log.info("risk worker stopped: %s", stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
