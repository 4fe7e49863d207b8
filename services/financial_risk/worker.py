"""Kafka stream worker: ``python -m services.financial_risk.worker``.

Joins consumer group ``risk-scorer`` on ``transactions`` (keyed by customer id), scores each
micro-batch with the shared feature engine and LightGBM, and writes every event's score to
``risk-scores``, the events at or above the live threshold to ``risk-alerts`` and malformed or
unscorable events (with the reason) to ``transactions.dlq``. Offsets are committed only after
all outputs are acknowledged (backbone.kafka.StreamProcessor). SIGTERM finishes the current
batch, checkpoints and leaves the group.

State: customer state is owned per ``transactions`` partition and checkpointed to
``<checkpoint_dir>/<topic>-partition-<p>.npz`` together with the next offset it reflects; on
(re)assignment the worker restores the checkpoint and seeks the partition back to that
offset, so events after the checkpoint are re-scored (identically) and none is lost or
counted twice in the state. Terminal state is global: every worker reads all partitions of
``risk-feedback`` (no group) and applies labels in event time (see docs/financial_risk.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from backbone.kafka import Message, StreamProcessor, dlq_topic, make_consumer
from kafka import TopicPartition

from services.financial_risk import feature_state
from services.financial_risk.app.core.config import Settings
from services.financial_risk.app.model import RiskModels, load_models
from services.financial_risk.events import FeedbackEvent, TransactionEvent
from services.financial_risk.features import FeatureEngine, Transaction
from services.financial_risk.scoring import FraudScore, FraudScorer
from services.financial_risk.threshold import ThresholdController

log = logging.getLogger("services.financial_risk.worker")

FEEDBACK_RETRY_S = 5.0  # how often a worker looks for a feedback topic that does not exist yet


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
        checkpoint_background: bool = True,
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
        self.checkpoint_background = checkpoint_background  # periodic checkpoints by a forked writer
        self._checkpoint_child: int | None = None  # pid of a background checkpoint writer
        self.checkpoints_written = 0  # background checkpoints that finished
        self.checkpoint_failures = 0
        self.owned: dict[int, set[int]] = {}  # partition -> customer ids
        self.next_offset: dict[int, int] = {}  # partition -> next offset the state reflects
        self.topic = settings.transactions_topic
        self.feedback = make_consumer(bootstrap, client_id=f"risk-feedback-{os.getpid()}")
        self._feedback_assigned = False
        self._feedback_tried = -math.inf  # monotonic time of the last attempt to assign the feedback topic
        self._feedback_synced = False
        self.feedback_seen = 0
        self.feedback_invalid = 0
        self.processor: StreamProcessor[TransactionEvent] = StreamProcessor(
            bootstrap,
            self.topic,
            settings.worker_group_id,
            TransactionEvent,
            self.handle,
            max_batch_size=max_batch_size,
            on_partitions_assigned=self._assigned,
            on_partitions_revoked=self._revoked,
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

    def drain_feedback(self, max_polls: int = 200) -> int:
        """Apply the feedback topic up to its high-water mark (labels enter features at their known time).

        Catching up before every batch makes the features independent of consumer timing: a label
        produced before a transaction is always in the engine when that transaction is scored."""
        if not self._feedback_assigned:
            # the topic may not exist yet (no label so far): asking for its metadata blocks, so at most
            # every FEEDBACK_RETRY_S, not before every batch
            now = time.monotonic()
            if now - self._feedback_tried < FEEDBACK_RETRY_S:
                return 0
            self._feedback_tried = now
            self._assign_feedback()
            if not self._feedback_assigned:
                return 0
        n = 0
        for _ in range(max_polls):
            polled = self.feedback.poll(timeout_ms=0 if self._feedback_synced else 20, max_records=5000)
            for records in polled.values():
                for rec in records:
                    try:
                        fb = FeedbackEvent.model_validate_json(rec.value)
                    except Exception:
                        self.feedback_invalid += 1
                        continue
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
            behind = False
            for tp in self.feedback.assignment():
                hw = self.feedback.highwater(tp)
                if hw is None or self.feedback.position(tp) < hw:
                    behind = True
                    break
            self._feedback_synced = not behind
            if not behind:
                break
        self.feedback_seen += n
        return n

    # --------------------------------------------------------------- partitions
    def _ckpt_path(self, partition: int) -> Path:
        return self.checkpoint_dir / f"{self.topic}-partition-{partition}.npz"

    def checkpoint(self, partitions: set[int] | None = None, background: bool = False) -> None:
        """Write each owned partition's customer state with the next offset it reflects (atomic files).

        ``background`` (the periodic checkpoints): a forked child process writes the files from its
        copy-on-write image of this moment's state while scoring goes on, so the stream does not pause
        for the export (the approach of Redis's BGSAVE); a checkpoint still in progress makes the next
        one wait for the following period. Without ``fork`` (not POSIX), or for partition revocation
        and shutdown, the files are written before this returns."""
        wanted = partitions if partitions is not None else set(self.owned)
        parts = sorted(p for p in wanted if p in self.next_offset)
        self._last_checkpoint = time.monotonic()
        if background and hasattr(os, "fork"):
            if not self._reap_checkpoint(wait=False):
                return  # the previous one is still writing
            pid = os.fork()
            if pid == 0:  # child: write and leave at once (no Kafka, no logging, no atexit handlers)
                code = 1
                try:
                    self._write_checkpoints(parts)
                    code = 0
                finally:
                    os._exit(code)
            self._checkpoint_child = pid
            return
        self._reap_checkpoint(wait=True)  # never two writers of one file
        self._write_checkpoints(parts)

    def _write_checkpoints(self, parts: list[int]) -> None:
        for p in parts:
            arrays = self.engine.export_customers(self.owned[p])
            arrays["partition"] = np.asarray([p], dtype=np.int64)
            arrays["offset"] = np.asarray([self.next_offset[p]], dtype=np.int64)
            feature_state.save(self._ckpt_path(p), arrays)

    def _reap_checkpoint(self, wait: bool) -> bool:
        """True when no background checkpoint is running (after waiting for it if ``wait``)."""
        if self._checkpoint_child is None:
            return True
        pid, status = os.waitpid(self._checkpoint_child, 0 if wait else os.WNOHANG)
        if pid == 0:
            return False
        self._checkpoint_child = None
        if os.waitstatus_to_exitcode(status) != 0:
            self.checkpoint_failures += 1
            log.error("background checkpoint failed (exit status %s)", os.waitstatus_to_exitcode(status))
        else:
            self.checkpoints_written += 1
        return True

    def _assigned(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            if tp.topic != self.topic or tp.partition in self.owned:
                continue
            path = self._ckpt_path(tp.partition)
            self.owned[tp.partition] = set()
            if path.is_file():
                arrays = feature_state.load(path)
                offset = int(arrays["offset"][0])
                self.owned[tp.partition] = self.engine.import_customers(arrays)
                self.next_offset[tp.partition] = offset
                # resume exactly where the restored state ends (re-scores events after it)
                self.processor.consumer.seek(tp, offset)
                log.info("partition %d restored at offset %d", tp.partition, offset)
            else:
                # no checkpoint: the state reflects none of this partition, so consume it from the start
                # (the group's committed offset may be ahead of a worker that died before checkpointing)
                self.processor.consumer.seek_to_beginning(tp)

    def _revoked(self, tps: set[TopicPartition]) -> None:
        parts = {tp.partition for tp in tps if tp.topic == self.topic}
        self.checkpoint(parts)
        for p in parts:
            self.engine.drop_customers(self.owned.pop(p, set()))
            self.next_offset.pop(p, None)

    # ------------------------------------------------------------------ handler
    def handle(self, messages: list[Message[TransactionEvent]]) -> list[tuple[str, str | None, Any]]:
        """Score one micro-batch; never raises after touching the state (errors become DLQ records)."""
        if time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s:
            # the previous batches are committed: the state matches next_offset
            self.checkpoint(background=self.checkpoint_background)
        self.drain_feedback()
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
        scoring_ms = (time.perf_counter() - t0) * 1000.0
        now_ms = time.time() * 1000.0
        out: list[tuple[str, str | None, Any]] = []
        for m, r in zip(messages, results, strict=True):
            self.owned.setdefault(m.partition, set()).add(m.value.customer_id)
            self.next_offset[m.partition] = max(self.next_offset.get(m.partition, 0), m.offset + 1)
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
        return out

    def run(self, **kwargs: Any) -> Any:
        if not self._feedback_assigned:
            self._feedback_tried = time.monotonic()
            self._assign_feedback()  # before scoring starts: its metadata request may block (topic creation)
        try:
            return self.processor.run(**kwargs)
        finally:
            self.feedback.close()
            self._reap_checkpoint(wait=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--max-batch", type=int, default=200)
    p.add_argument("--idle-exit-s", type=float, default=None, help="exit after this long without records")
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
    )
    if args.warm_until:
        status = worker.scorer.warm_from_dataset(
            settings.data_dir, settings.warm_from or "2018-04-01", args.warm_until, settings.warm_customers
        )
        if status.error:
            log.error("warm-up failed: %s", status.error)
            return 1
        log.info("feature state warmed from the dataset: %d events", status.events)
    worker.processor.install_signal_handlers((signal.SIGTERM, signal.SIGINT))
    log.info("risk worker up: model %s, group %s", worker.models.fraud.version, settings.worker_group_id)
    stats = worker.run(idle_timeout_s=args.idle_exit_s)
    log.info("risk worker stopped: %s", stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
