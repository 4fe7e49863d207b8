"""Fraud scoring shared by the REST path and the Kafka worker: feature state + model + threshold."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.financial_risk.app.model import RiskModels
from services.financial_risk.explain import ReasonMethod
from services.financial_risk.features import (
    FeatureEngine,
    OutOfOrderError,
    Transaction,
)
from services.financial_risk.threshold import SCORED, ThresholdController

log = logging.getLogger(__name__)

WARM_BATCH = 1000  # transactions per engine call while the start-up replay fills the feature state


@dataclass
class FraudScore:
    """One scored transaction."""

    transaction_id: int
    score: float
    decision: str
    threshold: float
    reasons: list[dict[str, Any]]
    model_version: str
    latency_ms: float
    customer_id: int = 0
    terminal_id: int = 0
    reason_method: str = "path"


@dataclass(frozen=True)
class ScoreRequest:
    """One ``/v1/score`` call waiting in the micro-batcher."""

    models: RiskModels
    tx: Transaction
    update: bool = True
    method: ReasonMethod = "path"

    @property
    def group(self) -> tuple[int, bool, str]:
        return id(self.models), self.update, self.method


@dataclass
class WarmStatus:
    """Progress of the start-up replay that fills the feature state."""

    done: bool = False
    events: int = 0
    total: int = 0
    error: str | None = None
    until: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class FraudScorer:
    """Feature engine + model + live threshold behind one lock (the engine is not thread-safe)."""

    def __init__(self, engine: FeatureEngine, threshold: ThresholdController, service: str) -> None:
        self.engine = engine
        self.threshold = threshold
        self.service = service
        self.lock = threading.Lock()
        self.warm = WarmStatus()

    def score(
        self,
        models: RiskModels,
        txs: list[Transaction],
        update: bool = True,
        path: str = "rest",
        method: ReasonMethod = "path",
    ) -> list[FraudScore | Exception]:
        """Score transactions in order; an item that cannot be scored gets its exception instead.

        With ``update`` the features of the whole list come from one call of the engine's batch path (each
        event sees the state the previous ones left); what-if calls (``update=False``, which leave the
        state unchanged) go one by one. The model and the reason codes (``method``) run once for the
        whole list."""
        t0 = time.perf_counter()
        results: list[FraudScore | Exception] = [ValueError("not scored")] * len(txs)
        feats: np.ndarray | list[np.ndarray]
        with self.lock:
            if update:
                feats, errors = self.engine.process_batch(txs)
                slots = [i for i, err in enumerate(errors) if err is None]
                for i, err in enumerate(errors):
                    if err is not None:
                        results[i] = err
            else:
                feats, slots = [], []
                for i, tx in enumerate(txs):
                    try:
                        feats.append(self.engine.process(tx, mode="all", update=False))  # type: ignore[arg-type]
                    except OutOfOrderError as exc:
                        results[i] = exc
                        continue
                    slots.append(i)
        if slots:
            scorer = models.fraud
            probs, reasons = scorer.predict(
                feats if isinstance(feats, np.ndarray) else np.vstack(feats), method=method
            )
            latency = (time.perf_counter() - t0) * 1000.0
            for j, i in enumerate(slots):
                tx = txs[i]
                thr = self.threshold.value
                alert = (
                    self.threshold.observe(tx.transaction_id, float(probs[j])) if update else probs[j] >= thr
                )
                results[i] = FraudScore(
                    transaction_id=tx.transaction_id,
                    score=float(probs[j]),
                    decision="alert" if alert else "approve",
                    threshold=thr,
                    reasons=reasons[j],
                    model_version=scorer.version,
                    latency_ms=latency,
                    customer_id=tx.customer_id,
                    terminal_id=tx.terminal_id,
                    reason_method=method,
                )
            SCORED.labels(self.service, path).inc(len(slots))
        return results

    def score_requests(self, requests: list[ScoreRequest]) -> list[FraudScore | Exception]:
        """Score queued single requests (the REST micro-batcher's batch) in arrival order; consecutive
        requests with the same model, ``update`` flag and reason method share one model call."""
        results: list[FraudScore | Exception] = []
        start = 0
        while start < len(requests):
            first = requests[start]
            end = start + 1
            while end < len(requests) and requests[end].group == first.group:
                end += 1
            txs = [r.tx for r in requests[start:end]]
            results += self.score(first.models, txs, first.update, "rest", first.method)
            start = end
        return results

    def _warm_batch(self, batch: list[Transaction]) -> None:
        with self.lock:
            _, errors = self.engine.process_batch(batch)
        bad = [e for e in errors if e is not None]
        if bad:
            raise bad[0]
        self.warm.events += len(batch)
        batch.clear()

    def feedback(self, transaction_id: int, label: int, known_at: int) -> None:
        """A fraud label became known (feedback path)."""
        with self.lock:
            self.engine.add_feedback(transaction_id, label, known_at)
        self.threshold.feedback(transaction_id, label)

    def warm_from_dataset(
        self, data_dir: Path, start: str, until: str, customers: int | None = None
    ) -> WarmStatus:
        """Fill the feature state by replaying the real transactions in [start, until).

        Labels of those transactions enter through the feedback path with their known-at time
        (7 days later); labels not yet known at ``until`` stay queued until event time reaches them.
        """
        from pipelines.financial_risk.data import LABEL_DELAY_S, epoch, event_stream, load_transactions

        t0 = time.perf_counter()
        status = self.warm
        status.until = until
        try:
            df = load_transactions(data_dir, end=until)
            df = df[df["ts"] >= epoch(start)]
            if customers is not None:
                rng = np.random.default_rng(0)
                chosen = rng.choice(np.sort(df["CUSTOMER_ID"].unique()), size=customers, replace=False)
                df = df[df["CUSTOMER_ID"].isin(chosen)]
            df = df.reset_index(drop=True)
            status.total = len(df)
            batch: list[Transaction] = []
            for ev in event_stream(df):
                if ev.kind == "label":  # queued until event time reaches it: the batch order is kept
                    with self.lock:
                        self.engine.add_feedback(ev.transaction_id, ev.label, ev.ts)
                    continue
                assert ev.tx is not None
                batch.append(ev.tx)
                if len(batch) >= WARM_BATCH:
                    self._warm_batch(batch)
            self._warm_batch(batch)
            # labels of the last 7 days: known only later in event time
            tail = df[df["ts"] + LABEL_DELAY_S >= epoch(until)]
            with self.lock:
                for tid, y, ts in zip(tail["TRANSACTION_ID"], tail["TX_FRAUD"], tail["ts"], strict=True):
                    self.engine.add_feedback(int(tid), int(y), int(ts) + LABEL_DELAY_S)
            status.done = True
        except Exception as exc:  # reported by /ready
            status.error = f"{type(exc).__name__}: {exc}"
            log.exception("feature state warm-up failed")
        status.seconds = round(time.perf_counter() - t0, 1)
        log.info("feature state warmed: %d events in %.1fs", status.events, status.seconds)
        return status
